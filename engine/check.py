"""``engine check``: a whole-net sanity check before training.

Three checks, on one small batch of the net's own data (Input tops, and data layers whose source
cannot be read, get standard normal values and zero labels):

1. **Gradients, in place.** The net runs forward once in float64; then every layer that has a
   backward is checked on the very bottoms it saw in the net: with the objective
   ``L = sum_k <w_k, top_k>`` (``w_k`` fixed random), up to ``samples`` elements of each
   checked bottom and learnable parameter are moved by ``±step`` and the central difference is
   compared with the layer's analytic gradient, within ``threshold * max(|a|, |n|, 1)``. An
   element where the two one-sided differences disagree sits on a kink (ReLU at 0, a max-pooling
   tie) and is skipped, not failed; so is one whose central difference changes with a tenth of
   the step (the function bends inside the step, as Normalize at 0 does).
2. **Statistics after initialisation.** Each layer's top mean and standard deviation on the
   batch, the fraction of dead ReLU units (zero for every item of the batch), and after one
   backward pass the standard deviation of the gradient reaching the layer's bottom (or its
   parameters). Deep nets with a badly scaled init show it here: activations that shrink to
   zero or blow up layer after layer.
3. **Overfit one batch** (done by the caller, which owns a solver: ``engine check`` runs Adam on
   the batch with the data layers replaced by Input layers holding it): the loss must fall near
   zero, else something stops the net from learning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine import caffe_pb2
from engine.blob import Blob
from engine.errors import MokaError
from engine.layer import TRAIN

# Layers whose output does not vary smoothly with their inputs: nothing to check.
NO_GRADIENT = ("Accuracy", "ArgMax", "Silence", "Threshold")


@dataclass
class LayerReport:
    """What ``engine check`` found for one layer."""

    name: str
    type: str
    top_mean: float | None = None
    top_std: float | None = None
    top_count: int = 0
    dead_fraction: float | None = None  # ReLU only: units zero for the whole batch
    grad_std: float | None = None  # of the bottom diff (or the parameter diff) after backward
    checked: int = 0  # gradient elements compared
    kinks: int = 0  # elements skipped at a non-differentiable point
    max_error: float = 0.0  # largest relative error among the compared elements
    failure: str | None = None  # the first element that failed, described

    @property
    def verdict(self) -> str:
        if self.failure:
            return "FAIL"
        if self.dead_fraction is not None and self.dead_fraction >= 0.5:
            return "warn: dead ReLUs"
        if self.top_std is not None and self.top_std < 1e-6 and self.top_count > 1:
            return "warn: no signal"
        return "ok"


@dataclass
class NetReport:
    """The whole check; ``ok`` when no gradient failed and the batch was overfit."""

    name: str
    batch: int
    layers: list[LayerReport]
    losses: list[float] = field(default_factory=list)  # the overfit run, iteration by iteration
    overfit_ratio: float = 0.05  # the final loss must be below this fraction of the first
    has_loss: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def gradients_ok(self) -> bool:
        return not any(r.failure for r in self.layers)

    @property
    def overfit_ok(self) -> bool | None:
        if not self.losses:
            return None
        return self.losses[-1] <= self.overfit_ratio * max(self.losses[0], 1e-12)

    @property
    def ok(self) -> bool:
        return self.gradients_ok and self.overfit_ok is not False

    def layer(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def __str__(self) -> str:
        return format_report(self)


# -- building the net on one batch ---------------------------------------------------------------
def prepare_param(model, batch: int | None = None,
                  input_shapes: Mapping[str, tuple[int, ...]] | None = None):
    """The net definition with ``force_backward`` on and the data layers' batch set.

    A data layer whose source cannot be read becomes an Input layer (shapes as ``engine
    summary`` works them out); returns the definition and ``{layer name: original type}``.
    """
    from engine.summary import prepare_net_param

    param, replaced = prepare_net_param(model, batch, input_shapes)
    param.force_backward = True
    return param, {name: kind for name, (kind, _) in replaced.items()}


def one_batch_param(param, net) -> tuple[caffe_pb2.NetParameter, dict[str, np.ndarray]]:
    """``param`` with its data layers made Input layers, and the batch ``net`` holds for them.

    A solver built on it sees the same batch at every iteration (Input's forward keeps what was
    written into its tops).
    """
    fixed = caffe_pb2.NetParameter()
    fixed.CopyFrom(param)
    fixed.force_backward = False
    present = set(net.layer_dict)
    feed: dict[str, np.ndarray] = {}
    for layer in fixed.layer:
        if layer.bottom or layer.name not in present:
            continue
        tops = list(layer.top)
        replacement = caffe_pb2.LayerParameter(name=layer.name, type="Input", top=tops)
        replacement.include.extend(layer.include)
        replacement.exclude.extend(layer.exclude)
        for name in tops:
            replacement.input_param.shape.add().dim.extend(net.blobs[name].shape)
            feed[name] = net.blobs[name].data.copy()
        layer.CopyFrom(replacement)
    return fixed, feed


# -- the check -----------------------------------------------------------------------------------
def check_net(model, weights: str | None = None, phase: int = TRAIN, batch: int | None = 8,
              level: int = 0, stages: Sequence[str] = (),
              input_shapes: Mapping[str, tuple[int, ...]] | None = None, samples: int = 20,
              step: float = 1e-3, threshold: float = 1e-3, seed: int = 1701,
              overfit: Callable[[caffe_pb2.NetParameter, dict[str, np.ndarray]],
                                list[float]] | None = None) -> NetReport:
    """Check the net ``model``; ``overfit(net_param, feed)`` (if given) trains on the batch and
    returns the loss at each iteration."""
    from engine.net import Net

    quiet = logging.getLogger("engine")
    level_before = quiet.level
    quiet.setLevel(max(logging.WARNING, level_before))
    try:
        param, replaced = prepare_param(model, batch, input_shapes)
        net = Net(param, phase=phase, level=level, stages=stages, dtype=np.float64,
                  rng=np.random.default_rng(seed))
    finally:
        quiet.setLevel(level_before)
    if weights:
        net.copy_from(weights)
    rng = np.random.default_rng(seed)
    labels = {t for layer in param.layer if layer.name in replaced for t in layer.top[1:]}
    for name in net.inputs:  # Input tops, and the tops of data layers that were not read
        blob = net.blobs[name]
        blob.data[...] = 0 if name in labels else rng.standard_normal(blob.shape)
    reports = [LayerReport(layer.name, replaced.get(layer.name, layer.type))
               for layer in net.layers]
    inputs = _forward_with_stats(net, reports)
    has_loss = any(any(w for w in ws) for ws in net.loss_weights)
    if has_loss:
        _backward_with_stats(net, reports)
    for i, layer in enumerate(net.layers):
        if inputs[i] and layer.type not in NO_GRADIENT and net.layer_need_backward[i]:
            _check_layer(layer, inputs[i], len(net.top_vecs[i]), net.bottom_need_backward[i],
                         reports[i], samples, step, threshold, seed)
    n = next((int(net.blobs[t].shape[0]) for t in net.blobs if net.blobs[t].num_axes), 1)
    shown = [r for r in reports if r.type != "Split"]
    report = NetReport(net.name, n, shown, has_loss=has_loss)
    report.notes = [f"data layer '{name}' ({kind}) not read: standard normal data and zero "
                    "labels instead" for name, kind in replaced.items() if name in net.layer_dict]
    if overfit is not None and has_loss:
        fixed, feed = one_batch_param(param, net)
        report.losses = list(overfit(fixed, feed))
    return report


def _forward_with_stats(net, reports: list[LayerReport]) -> list[list[np.ndarray]]:
    """Forward layer by layer; returns each layer's bottoms as it saw them."""
    inputs: list[list[np.ndarray]] = []
    for i, layer in enumerate(net.layers):
        inputs.append([b.data.copy() for b in net.bottom_vecs[i]])
        net.forward_from_to(i, i)
        top = net.top_vecs[i]
        if top and top[0].count:
            data = top[0].data
            reports[i].top_mean = float(data.mean())
            reports[i].top_std = float(data.std())
            reports[i].top_count = int(data.size)
            if layer.type == "ReLU" and data.ndim >= 2:
                units = data.reshape(data.shape[0], -1)
                reports[i].dead_fraction = float((units <= 0).all(axis=0).mean())
    return inputs


def _backward_with_stats(net, reports: list[LayerReport]) -> None:
    for weights, top in zip(net.loss_weights, net.top_vecs, strict=True):
        for w, blob in zip(weights, top, strict=True):
            if w:
                blob.diff[...] = w
    net.clear_param_diffs()
    for i in reversed(range(len(net.layers))):
        if not net.layer_need_backward[i]:
            continue
        net.backward_from_to(i, i)
        needs = net.bottom_need_backward[i]
        diffs = [b.diff for b, need in zip(net.bottom_vecs[i], needs, strict=True) if need]
        diffs = diffs or [b.diff for b in net.layers[i].blobs]
        if diffs and diffs[0].size:
            reports[i].grad_std = float(diffs[0].std())


def _check_layer(layer, inputs: list[np.ndarray], n_top: int, need: Sequence[bool],
                 report: LayerReport, samples: int, step: float, threshold: float,
                 seed: int) -> None:
    """Compare the layer's analytic gradients with central differences on ``inputs``."""
    bottom = [Blob(x.shape, np.float64) for x in inputs]
    for blob, x in zip(bottom, inputs, strict=True):
        blob.data[...] = x
    top = [Blob((), np.float64) for _ in range(n_top)]
    saved_rng = layer.rng
    saved_params = [b.data.copy() for b in layer.blobs]
    saved_diffs = [b.diff.copy() for b in layer.blobs]
    try:
        layer.reshape(bottom, top)
        weight_rng = np.random.default_rng(seed)
        weights = [weight_rng.standard_normal(t.shape) for t in top]

        def objective() -> float:
            layer.rng = np.random.default_rng(seed)  # the same dropout mask every time
            layer.reshape(bottom, top)
            layer.forward(bottom, top)
            return float(sum(np.sum(w * t.data) for w, t in zip(weights, top, strict=True)))

        base = objective()

        def differences(flat: np.ndarray, j: int, h: float) -> tuple[float, float]:
            """The right and left differences of the objective in ``flat[j]``, step ``h``."""
            x = flat[j]
            flat[j] = x + h
            plus = objective()
            flat[j] = x - h
            minus = objective()
            flat[j] = x
            return (plus - base) / h, (base - minus) / h

        for blob in layer.blobs:
            blob.diff[...] = 0
        for w, t in zip(weights, top, strict=True):
            t.diff[...] = w
        propagate = [bool(n) for n in need]
        layer.backward(top, propagate, bottom)
        targets = [(f"bottom[{j}]", b) for j, b in enumerate(bottom) if propagate[j]]
        learnable = layer.param_propagate_down or [False] * len(layer.blobs)
        targets += [(f"param[{j}]", b) for j, (b, learns) in
                    enumerate(zip(layer.blobs, learnable, strict=False)) if learns]
        analytic = [(name, blob, blob.diff.copy().reshape(-1)) for name, blob in targets]
        pick = np.random.default_rng(seed + 1)
        for name, blob, grad in analytic:
            flat = blob.data.reshape(-1)
            if not flat.size:
                continue
            chosen = pick.choice(flat.size, min(samples, flat.size), replace=False)
            for j in chosen:
                right, left = differences(flat, j, step)
                if not _close(right, left, threshold):
                    report.kinks += 1
                    continue
                numeric = (right + left) / 2
                if not _close(grad[j], numeric, threshold):
                    # if a tenth of the step gives another slope, the function bends inside
                    # the step (Normalize at x = 0 turns within sqrt(eps) = 1e-5) and the
                    # difference cannot judge; a wrong gradient keeps failing at either step
                    finer = sum(differences(flat, j, step / 10)) / 2
                    if not _close(finer, numeric, threshold):
                        report.kinks += 1
                        continue
                error = abs(grad[j] - numeric) / max(abs(grad[j]), abs(numeric), 1.0)
                report.checked += 1
                report.max_error = max(report.max_error, error)
                if error > threshold and report.failure is None:
                    report.failure = (f"{name} element {int(j)}: analytic {grad[j]:.6g}, "
                                      f"numeric {numeric:.6g}")
    finally:
        layer.rng = saved_rng
        for blob, data, diff in zip(layer.blobs, saved_params, saved_diffs, strict=True):
            blob.data[...] = data
            blob.diff[...] = diff


def _close(a: float, b: float, threshold: float) -> bool:
    return abs(a - b) <= threshold * max(abs(a), abs(b), 1.0)


# -- printing ------------------------------------------------------------------------------------
def _num(value: float | None, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


def format_report(report: NetReport) -> str:
    from engine.summary import format_table

    header = ("layer", "type", "top mean", "top std", "dead", "grad std", "gradient check",
              "verdict")
    rows = [header]
    for r in report.layers:
        if r.failure:
            grad = f"{r.checked} compared, max err {r.max_error:.2g}"
        elif r.checked or r.kinks:
            grad = f"{r.checked} ok, max err {r.max_error:.2g}"
            grad += f" ({r.kinks} kinks)" if r.kinks else ""
        else:
            grad = "-"
        dead = "-" if r.dead_fraction is None else f"{100 * r.dead_fraction:.0f}%"
        rows.append((r.name, r.type, _num(r.top_mean), _num(r.top_std), dead,
                     _num(r.grad_std), grad, r.verdict))
    lines = format_table(rows)
    lines.append("")
    failed = [r for r in report.layers if r.failure]
    for r in failed:
        lines.append(f"layer '{r.name}' ({r.type}): backward disagrees with the numerical "
                     f"gradient at {r.failure}")
    checked = sum(1 for r in report.layers if r.checked)
    lines.append(f"gradients: {'FAIL' if failed else 'ok'} ({checked} layers checked in float64 "
                 f"on a batch of {report.batch})")
    if not report.has_loss:
        lines.append("overfit one batch: skipped (the net has no loss; check the train net)")
    elif report.losses:
        first, last = report.losses[0], report.losses[-1]
        verdict = "ok" if report.overfit_ok else (
            f"FAIL (the loss did not fall below {report.overfit_ratio:.0%} of its first value; "
            "if it was still falling, try more --overfit-iterations or a larger --lr)")
        lines.append(f"overfit one batch: loss {first:.4g} -> {last:.4g} in "
                     f"{len(report.losses)} iterations: {verdict}")
    lines += report.notes
    lines.append(f"verdict: {'ok' if report.ok else 'FAIL'}")
    return "\n".join(lines)


# -- the command line (owns a solver for the overfit run) ----------------------------------------
def solver_overfit(iterations: int, base_lr: float, seed: int = 1701
                   ) -> Callable[[caffe_pb2.NetParameter, dict[str, np.ndarray]], list[float]]:
    """An ``overfit`` for :func:`check_net` that trains with the solvers package's Adam.

    Part of the command line: the engine itself never imports ``solvers`` (DESIGN.md).
    """

    def run_adam(net_param, feed: dict[str, np.ndarray]) -> list[float]:
        import solvers

        param = caffe_pb2.SolverParameter(type="Adam", base_lr=base_lr, momentum=0.9,
                                          momentum2=0.999, lr_policy="fixed",
                                          max_iter=iterations, display=0, random_seed=seed,
                                          snapshot_after_train=False)
        param.net_param.CopyFrom(net_param)
        quiet = logging.getLogger()
        before = quiet.level
        quiet.setLevel(logging.WARNING)  # the solver's per-iteration lines are not the report
        try:
            solver = solvers.get_solver(param)
            for name, array in feed.items():
                solver.net.blobs[name].data[...] = array
            losses = []
            for _ in range(iterations):
                losses.append(float(solver.net.forward_from_to()))
                solver.step(1)
            losses.append(float(solver.net.forward_from_to()))
        finally:
            quiet.setLevel(before)
        return losses

    return run_adam


def run(args) -> int:
    """Check a net before training: gradients of every layer, init statistics, overfit a batch."""
    import os

    model = args.model_file or args.model
    if not model or not os.path.isfile(model):
        raise MokaError(f"model file '{model}' not found" if model else
                        "need a net to check: engine check NET.prototxt")
    if args.weights and not os.path.isfile(args.weights):
        raise MokaError(f"weights file '{args.weights}' not found")
    stages = [s for value in args.stage or () for s in value.split(",") if s]
    overfit = None if args.overfit_iterations == 0 else \
        solver_overfit(args.overfit_iterations, args.lr)
    from engine.summary import parse_input_shapes

    report = check_net(model, args.weights, TRAIN if args.phase == "TRAIN" else 1, args.batch,
                       args.level, stages, parse_input_shapes(args.input_shape or ()),
                       samples=args.samples, overfit=overfit)
    print(report)
    return 0 if report.ok else 1


def add_commands(subparsers, add_command, net_state_flags) -> None:
    """Register ``engine check`` (from engine/cli.py)."""
    p = add_command(subparsers, run, "check")
    p.add_argument("model_file", nargs="?", metavar="NET", help="the net prototxt")
    p.add_argument("--model", help="the net prototxt (as Caffe's flag)")
    p.add_argument("--weights", metavar="W.caffemodel",
                   help="start from these weights instead of the fillers")
    p.add_argument("--phase", choices=("TRAIN", "TEST"), default="TRAIN",
                   help="the phase to build the net in (default TRAIN)")
    p.add_argument("--batch", type=int, default=8, metavar="N",
                   help="the batch size to check on (default 8)")
    p.add_argument("--input-shape", action="append", metavar="[TOP=]N,C,H,W",
                   help="the shape of a data top whose source cannot be read (repeatable)")
    p.add_argument("--samples", type=int, default=20, metavar="K",
                   help="gradient elements compared per blob (default 20)")
    p.add_argument("--overfit-iterations", type=int, default=300, metavar="N",
                   help="Adam iterations on the one batch (default 300; 0 skips the overfit "
                        "run)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    net_state_flags(p)
