"""Moka against PyTorch (CPU, float32) on Caffe's LeNet, CIFAR10-quick and AlexNet.

Measurements, on random data that stays in place (no data loading):
  fwd+bwd  forward + backward (parameter gradients reset first), as ``caffe time`` measures;
  train    a full training iteration: forward + backward + SGD update with momentum 0.9 and
           weight decay 5e-4 -- Moka through ``solvers`` (``solver.step(1)``), PyTorch through
           ``torch.optim.SGD``;
  deploy   a TEST-phase forward of the deploy net (no loss, no gradients): Moka's
           ``net.forward()``, PyTorch's model in ``eval()`` under ``torch.no_grad()``.
LeNet and CIFAR10-quick get fwd+bwd and train, AlexNet (batch 10) fwd+bwd and deploy. Each
process also reports its peak resident memory (``ru_maxrss``: the net, its buffers and the
libraries loaded; PyTorch's libraries alone take a few hundred MB).

Every (round, net, measurement, contender) runs in a fresh process: it builds the net, warms
up, then times ``--iters`` iterations and reports their median and minimum. Contenders
alternate order from round to round, so both see the same drift of a shared machine. The table
shows the median over rounds with the ratio Moka/PyTorch of those medians, the range of the
per-round ratios (each pair ran back to back), and the best single iterations with their ratio,
which is what is left when other processes compete for the CPUs.

    python tests/benchmarks/bench_nets.py [--rounds 5] [--iters 20]
                                          [--nets lenet,cifar,alexnet] [--threads 2] [--profile]

AlexNet runs ``--iters // 4`` timed iterations (at least 3) after one warm-up.

``--profile`` times one Moka training iteration per layer (forward and backward ms, the update)
in this process and lists the hottest functions under cProfile, instead of the comparison.

PyTorch is not a dependency of Moka; run this from an environment that has both
(``pip install torch==2.13.0`` and ``pip install -e .``). Not collected by pytest (no
``test_`` prefix); a benchmark never fails a test run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTENDERS = ("moka", "torch")
MODES = {"fwdbwd": "fwd+bwd", "train": "train iteration", "deploy": "deploy forward"}
THREAD_VARIABLES = ("MOKA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

# The architectures, shared by both contenders so that they cannot drift apart:
# ("conv", num_output, kernel, pad[, stride, group]), ("pool", "MAX" | "AVE", kernel, stride),
# ("relu",), ("ip", num_output), ("lrn", local_size, alpha, beta) (across channels, k = 1),
# ("drop", ratio). ReLUs and dropouts work in place, as in Caffe's files.
NETS = {
    # Caffe's examples/mnist/lenet_train_test.prototxt
    "lenet": {
        "input": (64, 1, 28, 28),
        "layers": [("conv", 20, 5, 0), ("pool", "MAX", 2, 2), ("conv", 50, 5, 0),
                   ("pool", "MAX", 2, 2), ("ip", 500), ("relu",), ("ip", 10)],
    },
    # Caffe's examples/cifar10/cifar10_quick_train_test.prototxt
    "cifar": {
        "input": (100, 3, 32, 32),
        "layers": [("conv", 32, 5, 2), ("pool", "MAX", 3, 2), ("relu",), ("conv", 32, 5, 2),
                   ("relu",), ("pool", "AVE", 3, 2), ("conv", 64, 5, 2), ("relu",),
                   ("pool", "AVE", 3, 2), ("ip", 64), ("ip", 10)],
    },
    # Caffe's models/bvlc_alexnet (deploy.prototxt; train_val.prototxt's layers for fwd+bwd)
    "alexnet": {
        "input": (10, 3, 227, 227),
        "layers": [("conv", 96, 11, 0, 4, 1), ("relu",), ("lrn", 5, 1e-4, 0.75),
                   ("pool", "MAX", 3, 2), ("conv", 256, 5, 2, 1, 2), ("relu",),
                   ("lrn", 5, 1e-4, 0.75), ("pool", "MAX", 3, 2), ("conv", 384, 3, 1),
                   ("relu",), ("conv", 384, 3, 1, 1, 2), ("relu",), ("conv", 256, 3, 1, 1, 2),
                   ("relu",), ("pool", "MAX", 3, 2), ("ip", 4096), ("relu",), ("drop", 0.5),
                   ("ip", 4096), ("relu",), ("drop", 0.5), ("ip", 1000)],
        "modes": ("fwdbwd", "deploy"),
        "iters_divisor": 4,
    },
}
DEFAULT_MODES = ("fwdbwd", "train")
SOLVER = {"base_lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}


# -- Moka --------------------------------------------------------------------------------------
def net_modes(name: str) -> tuple[str, ...]:
    return NETS[name].get("modes", DEFAULT_MODES)


def moka_prototxt(name: str, deploy: bool = False) -> str:
    """The net as Caffe's prototxt: an Input layer for data and label, SoftmaxWithLoss on top;
    with ``deploy``, data only and no loss."""
    spec = NETS[name]
    dims = " ".join(f"dim: {d}" for d in spec["input"])
    if deploy:
        lines = [f'name: "{name}"', 'layer { name: "data" type: "Input" top: "data" '
                 f"input_param {{ shape {{ {dims} }} }} }}"]
    else:
        lines = [f'name: "{name}"',
                 'layer { name: "data" type: "Input" top: "data" top: "label" '
                 f"input_param {{ shape {{ {dims} }} shape {{ dim: {spec['input'][0]} }} }} }}"]
    bottom = "data"
    counts: dict[str, int] = {}
    learned = "param { lr_mult: 1 } param { lr_mult: 2 } "
    fillers = 'weight_filler { type: "xavier" } bias_filler { type: "constant" }'
    for kind, *args in spec["layers"]:
        counts[kind] = counts.get(kind, 0) + 1
        top = f"{kind}{counts[kind]}"
        if kind == "conv":
            n, k, pad, stride, group = (*args, 1, 1)[:5]
            body = (f'type: "Convolution" {learned}convolution_param {{ num_output: {n} '
                    f"kernel_size: {k} pad: {pad} stride: {stride} group: {group} "
                    f"{fillers} }}")
        elif kind == "pool":
            pool, k, stride = args
            body = (f'type: "Pooling" pooling_param {{ pool: {pool} kernel_size: {k} '
                    f"stride: {stride} }}")
        elif kind == "ip":
            body = (f'type: "InnerProduct" {learned}inner_product_param {{ '
                    f"num_output: {args[0]} {fillers} }}")
        elif kind == "lrn":
            size, alpha, beta = args
            body = (f'type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} '
                    f"beta: {beta} }}")
        elif kind == "drop":
            body, top = f'type: "Dropout" dropout_param {{ dropout_ratio: {args[0]} }}', bottom
        else:
            body, top = 'type: "ReLU"', bottom  # in place
        lines.append(f'layer {{ name: "{kind}{counts[kind]}" {body} bottom: "{bottom}" '
                     f'top: "{top}" }}')
        bottom = top
    if not deploy:
        lines.append(f'layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "{bottom}" '
                     'bottom: "label" top: "loss" }')
    return "\n".join(lines) + "\n"


def moka_solver(name: str):
    """An SGD solver over the net, fixed rate, nothing displayed, tested or snapshotted."""
    from engine import caffe_pb2
    from engine.io import parse_text
    from solvers import get_solver

    param = caffe_pb2.SolverParameter()
    param.net_param.CopyFrom(parse_text(moka_prototxt(name), caffe_pb2.NetParameter))
    param.type = "SGD"
    param.lr_policy = "fixed"
    param.base_lr = SOLVER["base_lr"]
    param.momentum = SOLVER["momentum"]
    param.weight_decay = SOLVER["weight_decay"]
    param.max_iter = 1 << 30
    param.display = 0
    param.snapshot = 0
    param.random_seed = 1701
    solver = get_solver(param)
    fill_inputs(solver.net, name)
    return solver


def fill_inputs(net, name: str) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.uniform(0, 1, net.blobs["data"].shape)
    if "label" in net.blobs:
        net.blobs["label"].data[...] = rng.integers(0, 10, net.blobs["label"].shape)


def moka_net(name: str, deploy: bool = False):
    """The net alone, no solver (as ``caffe time`` builds it): the training net in the TRAIN
    phase, or with ``deploy`` the deploy net in the TEST phase; Xavier weights, random input."""
    import numpy as np

    from engine import TEST, TRAIN, Net, caffe_pb2
    from engine.io import parse_text

    param = parse_text(moka_prototxt(name, deploy=deploy), caffe_pb2.NetParameter)
    net = Net(param, TEST if deploy else TRAIN, rng=np.random.default_rng(1701))
    fill_inputs(net, name)
    return net


def moka_step(name: str, mode: str) -> Callable[[], float]:
    sys.path.insert(0, str(REPO))  # benchmark this checkout
    if mode == "deploy":
        deploy = moka_net(name, deploy=True)
        output = deploy.outputs[0]

        def forward() -> float:
            return float(deploy.forward()[output].ravel()[0])
        return forward
    if mode == "train":
        solver = moka_solver(name)

        def step() -> float:
            solver.step(1)
            return solver.smoothed_loss
        return step
    net = moka_net(name)  # no solver: its momentum history is no part of fwd+bwd's memory

    def fwdbwd() -> float:
        net.clear_param_diffs()
        return net.forward_backward()
    return fwdbwd


# -- PyTorch -----------------------------------------------------------------------------------
def torch_model(name: str):
    import torch
    from torch import nn

    spec = NETS[name]
    modules: list[nn.Module] = []
    shape = spec["input"][1:]
    for kind, *args in spec["layers"]:
        if kind == "conv":
            n, k, pad, stride, group = (*args, 1, 1)[:5]
            modules.append(nn.Conv2d(shape[0], n, k, stride=stride, padding=pad, groups=group))
        elif kind == "pool":
            pool, k, stride = args
            layer = nn.MaxPool2d if pool == "MAX" else nn.AvgPool2d
            modules.append(layer(k, stride, ceil_mode=True))  # Caffe rounds pooling up
        elif kind == "ip":
            if len(shape) > 1:
                modules.append(nn.Flatten())
            modules.append(nn.Linear(int(torch.tensor(shape).prod()), args[0]))
        elif kind == "lrn":
            size, alpha, beta = args
            modules.append(nn.LocalResponseNorm(size, alpha, beta, k=1.0))  # Caffe's alpha/n
        elif kind == "drop":
            modules.append(nn.Dropout(args[0]))  # in place would break autograd after ReLU
        else:
            modules.append(nn.ReLU(inplace=True))
        with torch.no_grad():
            shape = nn.Sequential(*modules)(torch.zeros(1, *spec["input"][1:])).shape[1:]
    return nn.Sequential(*modules)


def torch_step(name: str, mode: str, threads: int) -> Callable[[], float]:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch = NETS[name]["input"]
    x = torch.rand(batch)
    if mode == "deploy":
        model = torch_model(name).eval()

        def forward() -> float:
            with torch.no_grad():
                return model(x)[0, 0].item()
        return forward
    model = torch_model(name).train()
    y = torch.randint(0, 10, (batch[0],))
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=SOLVER["base_lr"],
                                momentum=SOLVER["momentum"],
                                weight_decay=SOLVER["weight_decay"])

    def step() -> float:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        if mode == "train":
            optimizer.step()
        return loss.detach().item()
    return step


# -- one measurement in this process ----------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    if args.worker == "moka":
        step = moka_step(args.net, args.mode)
        version = "moka"
    else:
        step = torch_step(args.net, args.mode, args.threads)
        import torch
        version = torch.__version__
    warmup, iters = scaled_iterations(args.net, args.warmup, args.iters)
    for _ in range(warmup):
        step()
    times = []
    loss = float("nan")
    for _ in range(iters):
        start = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - start) * 1e3)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(json.dumps({"median_ms": statistics.median(times), "min_ms": min(times),
                      "loss": loss, "version": version, "peak_rss_mb": rss_mb}))


def scaled_iterations(name: str, warmup: int, iters: int) -> tuple[int, int]:
    """(warm-up, timed) iterations for ``name``: the big nets run fewer."""
    divisor = NETS[name].get("iters_divisor", 1)
    if divisor == 1:
        return warmup, iters
    return min(warmup, 1), max(3, iters // divisor)


def measure(contender: str, net: str, mode: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.update({name: str(args.threads) for name in THREAD_VARIABLES})
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", contender,
               "--net", net, "--mode", mode, "--iters", str(args.iters),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{contender} {net} {mode} failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the comparison ------------------------------------------------------------------------------
def compare(args: argparse.Namespace) -> dict:
    results: dict = {net: {mode: {c: [] for c in CONTENDERS} for mode in net_modes(net)}
                     for net in args.nets}
    versions = {}
    for r in range(args.rounds):
        order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
        for net in args.nets:
            for mode in net_modes(net):
                for contender in order:
                    got = measure(contender, net, mode, args)
                    results[net][mode][contender].append(got)
                    versions[contender] = got["version"]
        print(f"round {r + 1}/{args.rounds} done, load average {load_average()}",
              file=sys.stderr, flush=True)
    report(results, versions, args)
    return results


def report(results: dict, versions: dict, args: argparse.Namespace) -> None:
    """Medians over rounds and their ratio; the best times too, which contention spares."""
    import numpy as np

    print(f"Moka vs PyTorch {versions.get('torch', '?')} CPU, numpy {np.__version__}, "
          f"{args.threads} threads, {cpu_name()} ({os.cpu_count()} CPUs), "
          f"{time.strftime('%Y-%m-%d')}")
    big = scaled_iterations("alexnet", args.warmup, args.iters)
    print(f"{args.rounds} rounds x {args.iters} iterations after {args.warmup} warm-up "
          f"(AlexNet {big[1]} after {big[0]}), a fresh process per measurement, load average "
          f"{load_average()} at the end")
    print(f"{'':<24}{'median over rounds (ms)':^31}{'best iteration (ms)':^27}"
          f"{'peak RSS (MB)':^20}")
    print(f"{'net':<8}{'measure':<16}{'Moka':>9}{'PyTorch':>9}{'ratio':>7}"
          f"{'per-round':>11}{'Moka':>9}{'PyTorch':>9}{'ratio':>7}{'Moka':>9}{'PyTorch':>9}")
    caffe_lines = []
    for net, modes in results.items():
        for mode, runs in modes.items():
            moka = [run["median_ms"] for run in runs["moka"]]
            torch = [run["median_ms"] for run in runs["torch"]]
            ratios = [m / t for m, t in zip(moka, torch, strict=True)]
            best_moka = min(run["min_ms"] for run in runs["moka"])
            best_torch = min(run["min_ms"] for run in runs["torch"])
            median_moka, median_torch = statistics.median(moka), statistics.median(torch)
            rss = {c: max(run.get("peak_rss_mb", 0) for run in runs[c]) for c in CONTENDERS}
            print(f"{net:<8}{MODES[mode]:<16}{median_moka:>9.1f}{median_torch:>9.1f}"
                  f"{median_moka / median_torch:>7.2f}"
                  f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>11}"
                  f"{best_moka:>9.1f}{best_torch:>9.1f}{best_moka / best_torch:>7.2f}"
                  f"{rss['moka']:>9.0f}{rss['torch']:>9.0f}")
            caffe = CAFFE.get((net, mode))
            if caffe:
                caffe_lines.append(caffe_comparison(net, mode, caffe, moka, rss["moka"]))
    print("ratio = Moka / PyTorch; per-round: the range of the ratios of pairs run back to back;"
          " peak RSS: the largest over rounds, of the whole measuring process")
    if caffe_lines:
        print("Against BVLC Caffe 1.0 CPU (OpenBLAS), its figures quoted from the project's "
              "issue 9 (same machine type), not measured here:")
        for line in caffe_lines:
            print("  " + line)


# BVLC Caffe 1.0 CPU with OpenBLAS on this machine type (issue 9; `caffe time` and
# `/usr/bin/time -f %M`): forward+backward ms as a range, peak RSS in MB.
CAFFE = {
    ("alexnet", "fwdbwd"): {"ms": (370.0, 470.0), "rss_mb": 678.0},
    ("alexnet", "deploy"): {"rss_mb": 509.0},
    ("cifar", "fwdbwd"): {"rss_mb": 108.0},
}


def caffe_comparison(net: str, mode: str, caffe: dict, moka_ms: list[float],
                     moka_rss: float) -> str:
    parts = [f"{net} {MODES[mode]}:"]
    if "ms" in caffe:
        low, high = caffe["ms"]
        median = statistics.median(moka_ms)
        parts.append(f"time {median:.0f} ms vs Caffe's {low:.0f}-{high:.0f} ms = "
                     f"{median / high:.2f}-{median / low:.2f}x Caffe's time;")
    parts.append(f"peak RSS {moka_rss:.0f} MB vs Caffe's {caffe['rss_mb']:.0f} MB = "
                 f"{moka_rss / caffe['rss_mb']:.2f}x")
    return " ".join(parts)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- where Moka's time goes -----------------------------------------------------------------------
def profile(args: argparse.Namespace) -> None:
    """Per-layer forward/backward ms of a Moka training iteration, then cProfile's hot spots."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(args.threads)
    sys.path.insert(0, str(REPO))
    import cProfile
    import pstats

    for name in args.nets:
        solver = moka_solver(name)
        for _ in range(args.warmup):
            solver.step(1)
        per_layer(solver, name, args.iters)
        steps = []
        for _ in range(args.iters):
            start = time.perf_counter()
            solver.step(1)
            steps.append((time.perf_counter() - start) * 1e3)
        print(f"solver.step(1) median {statistics.median(steps):.2f} ms\n")
        profiler = cProfile.Profile()
        profiler.enable()
        solver.step(args.iters)
        profiler.disable()
        print(f"{name}: cProfile over {args.iters} training iterations, by own time")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(15)


def per_layer(solver, name: str, iters: int) -> None:
    net = solver.net
    clock = time.perf_counter
    count = len(net.layers)
    forward, backward = [[] for _ in range(count)], [[] for _ in range(count)]
    update, clear = [], []
    for _ in range(iters):
        t0 = clock()
        net.clear_param_diffs()
        clear.append(clock() - t0)
        for i, layer in enumerate(net.layers):
            t0 = clock()
            layer.reshape(net.bottom_vecs[i], net.top_vecs[i])
            layer.forward(net.bottom_vecs[i], net.top_vecs[i])
            forward[i].append(clock() - t0)
        for weights, top in zip(net.loss_weights, net.top_vecs, strict=True):
            for weight, blob in zip(weights, top, strict=True):
                if weight:
                    blob.diff[...] = weight
        for i in reversed(range(count)):
            t0 = clock()
            if net.layer_need_backward[i]:
                net.layers[i].backward(net.top_vecs[i], net.bottom_need_backward[i],
                                       net.bottom_vecs[i])
            backward[i].append(clock() - t0)
        t0 = clock()
        solver.apply_update()
        update.append(clock() - t0)

    def ms(values: list[float]) -> float:
        return statistics.median(values) * 1e3

    print(f"{name}: median ms per layer over {iters} training iterations")
    print(f"{'layer':<10}{'type':<16}{'top shape':<20}{'forward':>9}{'backward':>10}")
    for i, layer in enumerate(net.layers):
        shape = "x".join(map(str, net.top_vecs[i][0].shape)) if net.top_vecs[i] else ""
        print(f"{layer.name:<10}{layer.type:<16}{shape:<20}{ms(forward[i]):>9.2f}"
              f"{ms(backward[i]):>10.2f}")
    total_f = sum(ms(f) for f in forward)
    total_b = sum(ms(b) for b in backward)
    print(f"{'total':<46}{total_f:>9.2f}{total_b:>10.2f}")
    print(f"clear diffs {ms(clear):.2f} ms, SGD update {ms(update):.2f} ms, "
          f"sum {total_f + total_b + ms(clear) + ms(update):.2f} ms")


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (fresh processes each)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per process")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--nets", default="lenet,cifar,alexnet",
                        help="comma-separated: lenet,cifar,alexnet")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for PyTorch and for numpy's BLAS (OMP/OPENBLAS/MKL)")
    parser.add_argument("--profile", action="store_true",
                        help="per-layer times and cProfile of Moka's training iteration")
    parser.add_argument("--json", help="also write the raw per-round medians here")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--net", choices=sorted(NETS), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    nets = args.nets.split(",") if isinstance(args.nets, str) else args.nets
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        parser.error(f"unknown net(s) {unknown}; known: {', '.join(NETS)}")
    args.nets = nets
    if min(args.rounds, args.iters, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --iters and --threads must be >= 1, --warmup >= 0")
    return args


def check_environment(need_torch: bool) -> None:
    if importlib.util.find_spec("google.protobuf") is None:
        sys.exit(f"Moka's dependencies are missing here; install them: pip install -e {REPO}")
    if need_torch and importlib.util.find_spec("torch") is None:
        sys.exit("PyTorch is needed for the comparison and is not a Moka dependency; install "
                 "the CPU build into this environment: pip install torch==2.13.0")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    check_environment(need_torch=not args.profile)
    if args.profile:
        profile(args)
        return 0
    results = compare(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
