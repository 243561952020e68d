"""Data-parallel training over MPI: per-iteration compute, allreduce time and bytes, K ranks.

For each net (LeNet, CIFAR10-quick, AlexNet) and each K, ``mpiexec -n K`` runs this script
as K ranks of one job (``--rank``): every rank builds the same SGD solver on random in-place
input (no data loading), joins the job as ``engine train`` does (``DataParallel.attach``), warms
up, then times ``--iters`` training iterations and reports, per iteration:

  compute    forward + backward of the rank's own batch (the layer-wise allreduce calls made
             from inside backward included: they only start the transfers)
  allreduce  the wait for the gradient reduction after backward (``DataParallel.finish``): what
             the transfers cost beyond what overlapped with backward
  step       the whole iteration (compute, allreduce, the signal agreement and the update)
  bytes      parameter-gradient bytes each rank puts into the allreduce

Rank 0 gathers the medians of every rank and prints the slowest rank's. ``--model`` then prints
the scaling model of tests/benchmarks/README.md from the measured K = 1 compute times.

    python tests/benchmarks/bench_mpi.py [--nets lenet,cifar,alexnet] [--ranks 1,2,4]
                                         [--iters 5] [--warmup 1] [--overlap both|on|off]
                                         [--json FILE] [--model]

Needs the MPI extra (``pip install "moka[mpi]"``). Every rank runs one BLAS thread; with more
ranks than cores the ranks share cores (oversubscribed), which the table says. Not collected by
pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmark this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_nets import moka_prototxt  # noqa: E402  (LeNet and CIFAR10-quick, as bench_nets)

ALEXNET_BATCH = 4  # Caffe's is 256: far beyond what a numpy CPU iteration can do briefly

# BVLC's models/bvlc_alexnet/train_val.prototxt, with an Input layer instead of the LMDB
ALEXNET = """name: "AlexNet"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: BATCH dim: 3 dim: 227 dim: 227 } shape { dim: BATCH } } }
CONV(conv1, data, 96, 11, 0, 4, 1)
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1"
        lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
CONV(conv2, pool1, 256, 5, 2, 1, 2)
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "norm2" type: "LRN" bottom: "conv2" top: "norm2"
        lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool2" type: "Pooling" bottom: "norm2" top: "pool2"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
CONV(conv3, pool2, 384, 3, 1, 1, 1)
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
CONV(conv4, conv3, 384, 3, 1, 1, 2)
layer { name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }
CONV(conv5, conv4, 256, 3, 1, 1, 2)
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
FC(fc6, pool5, 4096)
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" }
FC(fc7, fc6, 4096)
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" }
FC(fc8, fc7, 1000)
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" bottom: "label" top: "loss" }
"""
LEARNED = "param { lr_mult: 1 } param { lr_mult: 2 }"
FILLERS = 'weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" }'


def alexnet_prototxt() -> str:
    lines = []
    for line in ALEXNET.replace("BATCH", str(ALEXNET_BATCH)).splitlines():
        if line.startswith(("CONV(", "FC(")):
            kind, args = line.split("(")
            name, bottom, *numbers = (a.strip() for a in args.rstrip(")").split(","))
            if kind == "CONV":
                n, k, pad, stride, group = numbers
                body = (f'type: "Convolution" {LEARNED} convolution_param {{ num_output: {n} '
                        f"kernel_size: {k} pad: {pad} stride: {stride} group: {group} "
                        f"{FILLERS} }}")
            else:
                body = (f'type: "InnerProduct" {LEARNED} inner_product_param {{ '
                        f"num_output: {numbers[0]} {FILLERS} }}")
            line = f'layer {{ name: "{name}" {body} bottom: "{bottom}" top: "{name}" }}'
        lines.append(line)
    return "\n".join(lines) + "\n"


def solver_for(name: str, overlap: bool):
    import numpy as np

    from engine import caffe_pb2
    from engine.io import parse_text
    from solvers import get_solver

    text = alexnet_prototxt() if name == "alexnet" else moka_prototxt(name)
    param = caffe_pb2.SolverParameter()
    param.net_param.CopyFrom(parse_text(text, caffe_pb2.NetParameter))
    param.type, param.lr_policy, param.base_lr = "SGD", "fixed", 0.001
    param.momentum, param.weight_decay = 0.9, 5e-4
    param.max_iter, param.display, param.snapshot = 1 << 30, 0, 0
    param.random_seed = 1701
    param.layer_wise_reduce = overlap
    solver = get_solver(param)
    rng = np.random.default_rng(0)
    net = solver.net
    net.blobs["data"].data[...] = rng.uniform(0, 1, net.blobs["data"].shape)
    classes = net.blobs[net.layers[-1].param.bottom[0]].shape[1]
    net.blobs["label"].data[...] = rng.integers(0, classes, net.blobs["label"].shape)
    return solver


# -- one rank ------------------------------------------------------------------------------------
def rank_main(args: argparse.Namespace) -> None:
    from engine import distributed

    group = distributed.connect(force=True)
    solver = solver_for(args.rank, args.overlap == "on")
    group.attach(solver)
    net = solver.net
    compute = [0.0]
    forward_backward = net.forward_backward

    def timed() -> float:
        start = time.perf_counter()
        loss = forward_backward()
        compute[0] += time.perf_counter() - start
        return loss

    net.forward_backward = timed
    rows = []
    for i in range(args.warmup + args.iters):
        compute[0] = 0.0
        start = time.perf_counter()
        solver.step(1)
        step = time.perf_counter() - start
        if i >= args.warmup:
            rows.append((compute[0], group.reduce_seconds, step))
    medians = [statistics.median(column) for column in zip(*rows, strict=True)]
    gathered = group.comm.gather(medians, root=0)
    if group.is_root:
        worst = [max(column) for column in zip(*gathered, strict=True)]
        print(json.dumps({"compute_s": worst[0], "allreduce_s": worst[1], "step_s": worst[2],
                          "bytes": group.reduce_bytes, "ranks": group.size}), flush=True)


# -- the driver ----------------------------------------------------------------------------------
def run_job(net: str, ranks: int, overlap: str, args: argparse.Namespace) -> dict:
    mpiexec = shutil.which("mpiexec", path=os.pathsep.join(
        [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if mpiexec is None:
        sys.exit('bench_mpi: no mpiexec; pip install "moka[mpi]"')
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MOKA_NUM_THREADS="1")
    command = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--rank", net,
               "--overlap", overlap, "--iters", str(args.iters), "--warmup", str(args.warmup)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"bench_mpi: {net} on {ranks} ranks failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="lenet,cifar,alexnet")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--overlap", choices=("both", "on", "off"), default="both")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--model", action="store_true", help="print the scaling model too")
    parser.add_argument("--model-from", metavar="JSON",
                        help="only print the scaling model of an earlier --json run")
    parser.add_argument("--rank", help=argparse.SUPPRESS)  # internal: one rank of a job
    args = parser.parse_args(argv)
    if args.rank:
        rank_main(args)
        return 0
    if args.model_from:
        print_model([r for r in json.loads(Path(args.model_from).read_text())
                     if r["ranks"] == 1])
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} cores, load average {os.getloadavg()[0]:.1f} at start; one BLAS thread per "
          "rank; times are the slowest rank's median over iterations")
    print(f"{'net':8} {'K':>2} {'overlap':7} {'compute ms':>10} {'allreduce ms':>12} "
          f"{'step ms':>8} {'MB/iter':>8}  note")
    modes = ("on", "off") if args.overlap == "both" else (args.overlap,)
    results = []
    for net in args.nets.split(","):
        for ranks in (int(k) for k in args.ranks.split(",")):
            for overlap in modes if ranks > 1 else ("on",):
                row = run_job(net, ranks, overlap, args) | {"net": net, "overlap": overlap}
                results.append(row)
                note = f"oversubscribed ({ranks} ranks, {cores} cores)" if ranks > cores else ""
                print(f"{net:8} {ranks:>2} {overlap:7} {row['compute_s'] * 1e3:>10.1f} "
                      f"{row['allreduce_s'] * 1e3:>12.1f} {row['step_s'] * 1e3:>8.1f} "
                      f"{row['bytes'] / 1e6:>8.2f}  {note}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.model:
        print_model([r for r in results if r["ranks"] == 1])
    return 0


# -- the scaling model (tests/benchmarks/README.md) -------------------------------------------
BACKWARD_SHARE = 2 / 3  # backward's share of forward + backward (Caffe's usual 1:2)
LATENCY_S = 20e-6  # per message step of a ring allreduce on a cluster network


def ring_allreduce_s(nbytes: float, nodes: int, bits_per_s: float) -> float:
    """Ring allreduce: 2(K-1) steps, each moving nbytes/K per node, plus their latency."""
    if nodes == 1:
        return 0.0
    steps = 2 * (nodes - 1)
    return steps * (nbytes / nodes) * 8 / bits_per_s + steps * LATENCY_S


def efficiency(step_s: float, compute_s: float, nbytes: float, nodes: int, bits_per_s: float,
               overlap: bool) -> float:
    """Weak-scaling efficiency: one node's iteration time (``step_s``: compute and update) over
    K nodes' (same batch per node). With overlap, communication hides behind backward, at best
    all of backward (``BACKWARD_SHARE`` of ``compute_s``)."""
    comm = ring_allreduce_s(nbytes, nodes, bits_per_s)
    exposed = max(0.0, comm - BACKWARD_SHARE * compute_s) if overlap else comm
    return step_s / (step_s + exposed)


def print_model(single: list[dict]) -> None:
    print("\nweak-scaling efficiency (fixed batch per node), ring allreduce, from the K=1 "
          "compute time; no overlap / overlap")
    links = (("1 GbE", 1e9), ("10 GbE", 10e9), ("100 Gb IB", 100e9))
    for row in single:
        print(f"{row['net']}: compute {row['compute_s'] * 1e3:.1f} ms, step "
              f"{row['step_s'] * 1e3:.1f} ms, {row['bytes'] / 1e6:.2f} MB of gradients")
        for label, bits in links:
            cells = []
            for nodes in (2, 8, 64):
                args = (row["step_s"], row["compute_s"], row["bytes"], nodes, bits)
                plain, hidden = efficiency(*args, False), efficiency(*args, True)
                cells.append(f"K={nodes}: {plain:4.0%} / {hidden:4.0%}")
            print(f"  {label:10} " + "   ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
