"""Peak resident memory (max RSS) of Moka on the nets of issue 9, each run in a fresh process.

Cases (Caffe's figures, measured with ``/usr/bin/time -f %M`` on the same machine type, are the
reference the issue quotes):

  alexnet-fwdbwd   ``engine time`` on BVLC AlexNet's deploy prototxt, batch 10, 1 iteration
                   (every layer's forward, then every layer's backward, as ``caffe time``)
  alexnet-deploy   ``engine.Net(deploy, TEST, recycle=True)`` and one ``forward`` of batch 10
  alexnet-keep     the same with every blob kept (``recycle=False``, pycaffe's default)
  cifar-fwdbwd     ``engine time`` on CIFAR10-quick's deploy prototxt, batch 100, 1 iteration
  cifar-train      CIFAR10-quick as a training net (a label input, SoftmaxWithLoss for Softmax),
                   batch 100, one ``forward_backward``: convolutions keep their columns for
                   backward (no Caffe figure: Caffe's would need its data layer)

Weights are the fillers' random values (no caffemodel is read, as in ``caffe time``). Each case
runs ``--rounds`` times, each time in a new interpreter; the peak RSS is the worker's own
``getrusage(RUSAGE_SELF).ru_maxrss`` at exit. The table gives the median and range in MB
(10^6 bytes) and the ratio to Caffe's figure.

    PYTHONPATH=$PWD python tests/benchmarks/bench_memory.py [--rounds 3] [--cases a,b]
                                                             [--iterations 1]

With ``--iterations N`` the ``engine time`` cases run N iterations and the table also gives
their average forward-backward ms (``engine time``'s own figure, as ``caffe time``'s), compared
with Caffe's AlexNet time quoted in issue 9.

Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = next((p / "shared" / "conformance" for p in REPO.parents
                    if (p / "shared" / "conformance").is_dir()), REPO / "conformance")
ALEXNET = "BVLC__caffe__models__bvlc_alexnet__deploy.prototxt"
CIFAR = "BVLC__caffe__examples__cifar10__cifar10_quick.prototxt"
# case -> (prototxt, batch, what the worker runs, Caffe's peak RSS in MB or None)
CASES = {
    "alexnet-fwdbwd": (ALEXNET, 10, "time", 678),
    "alexnet-deploy": (ALEXNET, 10, "recycle", 509),
    "alexnet-keep": (ALEXNET, 10, "keep", 509),
    "cifar-fwdbwd": (CIFAR, 100, "time", 108),
    "cifar-train": (CIFAR, 100, "train", None),
}

# caffe time's AlexNet b10 forward-backward on this machine type, ms (issue 9)
CAFFE_ALEXNET_MS = (370.0, 470.0)

WORKER = r"""
import resource, sys
import numpy as np
mode, path = sys.argv[1], sys.argv[2]
if mode == "time":
    from engine.cli import main
    rc = main(["time", "--model", path, "--iterations", sys.argv[3]])
elif mode == "train":
    import engine
    net = engine.Net(path, engine.TRAIN)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["label"].data[...] = rng.integers(0, 10, net.blobs["label"].shape)
    net.forward_backward()
else:
    import engine
    kwargs = {"recycle": True} if mode == "recycle" else {}  # keep: pycaffe's default
    net = engine.Net(path, engine.TEST, **kwargs)
    inputs = {n: np.random.default_rng(0).standard_normal(net.blobs[n].shape, np.float32)
              for n in net.inputs}
    net.forward(**inputs)
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def with_batch(source: Path, batch: int, folder: Path, train: bool = False) -> Path:
    """A copy of ``source`` whose Input layers have batch ``batch`` (and with ``train``, a
    label input and SoftmaxWithLoss in place of Softmax)."""
    from google.protobuf import text_format

    from engine.io import read_net_param

    param = read_net_param(source)
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
            if train:
                layer.top.append("label")
                layer.input_param.shape.add().dim.append(batch)
        if train and layer.type == "Softmax":
            layer.type = "SoftmaxWithLoss"
            layer.bottom.append("label")
    out = folder / f"b{batch}{'_train' if train else ''}_{source.name}"
    out.write_text(text_format.MessageToString(param))
    return out


def measure(mode: str, path: Path, iterations: int) -> tuple[float, float | None]:
    """Peak RSS in MB of one fresh worker process, and for ``engine time`` its average
    forward-backward ms over ``iterations``."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", WORKER, mode, str(path), str(iterations)],
                          env=env, capture_output=True, text=True, cwd=REPO, check=False)
    fwdbwd = None
    for line in done.stderr.splitlines():
        if "Average Forward-Backward:" in line:
            fwdbwd = float(line.split("Average Forward-Backward:")[1].split()[0])
    for line in done.stdout.splitlines():
        if line.startswith("PEAK_KB"):
            return int(line.split()[1]) * 1024 / 1e6, fwdbwd
    raise RuntimeError(f"worker {mode} {path.name} failed:\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--iterations", type=int, default=1,
                        help="engine time's iterations (its forward-backward ms is reported)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    names = args.cases.split(",")
    results: dict[str, list[float]] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {n: with_batch(CONFORMANCE / CASES[n][0], CASES[n][1], Path(tmp),
                               CASES[n][2] == "train") for n in names}
        for _ in range(args.rounds):
            for name in names:
                peak, fwdbwd = measure(CASES[name][2], paths[name], args.iterations)
                results[name].append(peak)
                if fwdbwd is not None:
                    times[name].append(fwdbwd)
    print(f"{'case':16} {'median MB':>10} {'range':>15} {'Caffe MB':>9} {'ratio':>6}"
          f"{'fwd+bwd ms':>12} {'range':>13}")
    for name in names:
        values = results[name]
        med = statistics.median(values)
        caffe = CASES[name][3]
        ratio = f"{med / caffe:.2f}" if caffe else "-"
        span = f"{min(values):.0f}-{max(values):.0f}"
        ms = times[name]
        timing = (f"{statistics.median(ms):12.1f} {f'{min(ms):.1f}-{max(ms):.1f}':>13}" if ms
                  else f"{'-':>12} {'':>13}")
        print(f"{name:16} {med:10.0f} {span:>15} {caffe or '-':>9} {ratio:>6}{timing}")
    if times.get("alexnet-fwdbwd"):
        ms = statistics.median(times["alexnet-fwdbwd"])
        low, high = CAFFE_ALEXNET_MS
        print(f"alexnet-fwdbwd: engine time's forward-backward {ms:.1f} ms vs caffe time's "
              f"{low:.0f}-{high:.0f} ms (issue 9) = {ms / high:.2f}-{ms / low:.2f}x Caffe's time")

if __name__ == "__main__":
    main()
