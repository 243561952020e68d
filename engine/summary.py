"""``engine summary``: a net's shapes, parameters, cost and receptive fields, without running it.

The net is built inside :func:`engine.blob.shape_only`, so every layer's own ``setup`` and
``reshape`` work out the shapes (Caffe's formulas: pooling rounds up, grouped and dilated
convolution, deconvolution) while no activation or weight is allocated or filled. Data layers
that read files are replaced by Input layers of the shape their parameters give
(``batch_size`` and ``crop_size`` / ``new_height`` x ``new_width``, or the record in the source
when it is readable), or of the shape ``--input-shape`` names.

Conventions (documented in the printed totals too):

- *multiply-adds* (MACs) per image count the weight products of Convolution
  (``weights * output positions``), Deconvolution (``weights * input positions``) and
  InnerProduct (``weights * rows``); element-wise layers (ReLU, pooling, LRN, ...) and bias adds
  are not counted. FLOPs per image = 2 x multiply-adds.
- *activation memory* is each top's float32 bytes for the whole batch; an in-place top (a layer
  whose top is its bottom) adds nothing, and the Split layers the net inserts are not shown.
- *training memory* = 2 x activations (data and diff) + 3 x parameters (weights, gradients and
  one solver history, as SGD with momentum keeps).
- *receptive field* and *effective stride* are in input pixels, for tops with spatial axes,
  through Convolution, Deconvolution, Pooling and WITHIN_CHANNEL LRN; layers that keep the
  spatial size pass them on; Concat/Eltwise take the largest of their bottoms.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine import caffe_pb2
from engine.blob import shape_only
from engine.errors import MokaError, NetError
from engine.layer import TEST
from engine.layers.convolution import Convolution
from engine.layers.deconvolution import Deconvolution
from engine.layers.pooling import Pooling

FLOAT_BYTES = 4
# Data layers whose setup reads files: replaced by Input layers for the summary.
FILE_DATA_LAYERS = ("Data", "ImageData", "HDF5Data", "WindowData", "DenseImageData")


@dataclass
class LayerRow:
    """One layer of the summary."""

    name: str
    type: str
    tops: list[tuple[str, tuple[int, ...]]]
    params: int  # learnable values owned by this layer (shared ones count at their owner)
    shared: bool  # some parameter blob is shared with an earlier layer
    macs: int  # multiply-adds per image
    activation_bytes: int  # new top memory for the batch (0 for in-place tops)
    receptive_field: tuple[int, ...] | None = None  # of the first spatial top, per axis
    stride: tuple[float, ...] | None = None


@dataclass
class Summary:
    """A net's rows and totals; ``str(summary)`` is the table ``engine summary`` prints."""

    name: str
    batch: int
    rows: list[LayerRow]
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def model_mb(self) -> float:
        return self.params * FLOAT_BYTES / 2**20

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def flops(self) -> int:
        """FLOPs per image: two per multiply-add."""
        return 2 * self.macs

    @property
    def activation_bytes(self) -> int:
        return sum(r.activation_bytes for r in self.rows)

    @property
    def training_bytes(self) -> int:
        return 2 * self.activation_bytes + 3 * self.params * FLOAT_BYTES

    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def __str__(self) -> str:
        return format_summary(self)


# -- building the net for its shapes ---------------------------------------------------------------
def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["data=1,3,224,224", "2,3,32,32"]`` → ``{"data": ..., "": ...}`` ('' = first data top)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, _, dims = spec.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            raise MokaError(f"--input-shape '{spec}': give [TOP=]N,C,H,W with positive "
                            "integers, e.g. data=1,3,224,224")
        shapes[name.strip()] = shape
    return shapes


def _data_shapes(layer, batch: int | None, given: Mapping[str, tuple[int, ...]],
                 first: bool) -> tuple[list[tuple[int, ...]], list[str]] | None:
    """The tops' shapes of a file-reading data layer and what was assumed for them, or None to
    build the layer as it is (its source is readable and no shape was given)."""
    tops = list(layer.top)
    named = [given.get(t) for t in tops]
    if first and named[0] is None and "" in given:
        named[0] = given[""]
    if named[0] is None and _source_readable(layer):
        return None
    batch_size = _batch_size(layer)
    n = batch or batch_size
    assumed: list[str] = []
    if named[0] is not None:
        shapes = [named[0] if batch is None else (batch, *named[0][1:])]
    else:
        shapes = [_image_shape(layer, n)]
        if layer.type != "ImageData":
            assumed.append(f"3 channels for '{tops[0]}'")
    for name, shape in zip(tops[1:], named[1:], strict=True):
        if shape is not None:
            shapes.append(shape if batch is None else (batch, *shape[1:]))
        else:
            shapes.append((shapes[0][0],))  # the label
            if layer.type == "HDF5Data":
                assumed.append(f"one value per item for '{name}'")
    return shapes, assumed


def _source_readable(layer) -> bool:
    param = {"Data": layer.data_param, "ImageData": layer.image_data_param,
             "HDF5Data": layer.hdf5_data_param}.get(layer.type)
    return param is not None and bool(param.source) and os.path.exists(param.source)


def _batch_size(layer) -> int:
    for name in ("data_param", "image_data_param", "hdf5_data_param", "window_data_param"):
        if layer.HasField(name):
            return int(getattr(layer, name).batch_size) or 1
    return 1


def _image_shape(layer, n: int) -> tuple[int, ...]:
    crop = layer.transform_param.crop_size or layer.data_param.crop_size
    channels = 3
    if layer.type == "ImageData":
        p = layer.image_data_param
        channels = 3 if p.is_color else 1
        if not crop and p.new_height and p.new_width:
            return (n, channels, int(p.new_height), int(p.new_width))
    if layer.type == "WindowData":
        crop = crop or layer.window_data_param.crop_size
    if crop:
        return (n, channels, int(crop), int(crop))
    top = layer.top[0] if layer.top else "data"
    if layer.type == "HDF5Data":
        why = "its source cannot be read"
    else:
        why = (f"its source cannot be read and its parameters give no image size (no crop_size"
               f"{' or new_height/new_width' if layer.type == 'ImageData' else ''})")
    raise MokaError(f"layer '{layer.name}' ({layer.type}): {why}; give the shape with "
                    f"--input-shape {top}=N,C,H,W")


def _as_input(layer, shapes: list[tuple[int, ...]]):
    out = caffe_pb2.LayerParameter()
    out.name = layer.name
    out.type = "Input"
    out.top.extend(layer.top)
    out.include.extend(layer.include)
    out.exclude.extend(layer.exclude)
    for shape in shapes:
        out.input_param.shape.add().dim.extend(shape)
    return out


def prepare_net_param(model, batch: int | None = None,
                      input_shapes: Mapping[str, tuple[int, ...]] | None = None):
    """The net with file-reading data layers made Input layers and the batch size applied.

    Returns the NetParameter and ``{layer name: (original type, what was assumed)}`` of the
    layers replaced.
    """
    from engine.io import read_net_param

    source = read_net_param(model)
    net = caffe_pb2.NetParameter()
    net.CopyFrom(source)
    given = dict(input_shapes or {})
    replaced: dict[str, tuple[str, list[str]]] = {}
    first = True
    for i, layer in enumerate(net.layer):
        if layer.bottom:
            continue
        if layer.type in FILE_DATA_LAYERS or (layer.type not in ("Input", "MemoryData",
                                                                 "DummyData")
                                              and any(t in given for t in layer.top)):
            found = _data_shapes(layer, batch, given, first)
            if found is not None:
                replaced[layer.name] = (layer.type, found[1])
                net.layer[i].CopyFrom(_as_input(layer, found[0]))
            elif batch is not None:
                set_batch_size(net.layer[i], batch)
        elif layer.type == "Input":
            resize_input(net.layer[i], batch, given, first)
        elif batch is not None:
            set_batch_size(net.layer[i], batch)
        first = False
    return net, replaced


def set_batch_size(layer, batch: int) -> None:
    """Set the batch size of a data layer's parameters (DummyData: every shape's first dim)."""
    for name in ("data_param", "image_data_param", "hdf5_data_param", "memory_data_param",
                 "window_data_param"):
        if layer.HasField(name):
            getattr(layer, name).batch_size = batch
    if layer.HasField("dummy_data_param"):
        p = layer.dummy_data_param
        for shape in p.shape:
            if shape.dim:
                shape.dim[0] = batch
        for i in range(len(p.num)):
            p.num[i] = batch


def resize_input(layer, batch: int | None, given: Mapping[str, tuple[int, ...]] = {},
                 first: bool = False) -> None:
    """Give an Input layer's tops the shapes in ``given`` and the batch size ``batch``."""
    p = layer.input_param
    shapes = [tuple(s.dim) for s in p.shape]
    if len(shapes) == 1:
        shapes = shapes * len(layer.top)
    shapes += [()] * (len(layer.top) - len(shapes))
    for j, name in enumerate(layer.top):
        if name in given or (first and j == 0 and "" in given):
            shapes[j] = given.get(name) or given[""]
        if batch is not None and shapes[j]:
            shapes[j] = (batch, *shapes[j][1:])
    del p.shape[:]
    for shape in shapes:
        p.shape.add().dim.extend(shape)


def build_shape_net(model, phase: int = TEST, batch: int | None = None, level: int = 0,
                    stages: Sequence[str] = (),
                    input_shapes: Mapping[str, tuple[int, ...]] | None = None):
    """A Net whose blobs have their shapes and no memory (see :func:`engine.blob.shape_only`)."""
    from engine.net import Net

    quiet = logging.getLogger("engine")  # the build's per-layer lines are not the summary
    level_before = quiet.level
    quiet.setLevel(max(logging.WARNING, level_before))
    try:
        param, replaced = prepare_net_param(model, batch, input_shapes)
        with shape_only():
            net = Net(param, phase=phase, level=level, stages=stages,
                      rng=np.random.default_rng(0))
    finally:
        quiet.setLevel(level_before)
    net.replaced_data_layers = replaced
    return net


# -- the summary -----------------------------------------------------------------------------------
def summarize(model, phase: int = TEST, batch: int | None = None, level: int = 0,
              stages: Sequence[str] = (),
              input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Summary:
    """Summarise the net ``model`` (a prototxt path or NetParameter) as built in ``phase``."""
    net = build_shape_net(model, phase, batch, level, stages, input_shapes)
    owners = {id(b) for b in net.learnable_params}
    n = _batch_of(net)
    replaced: dict[str, tuple[str, list[str]]] = net.replaced_data_layers
    fields: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {}
    rows: list[LayerRow] = []
    for i, layer in enumerate(net.layers):
        bottoms = net.bottom_names[layer.name]
        tops = net.top_names[layer.name]
        top_blobs = net.top_vecs[i]
        rf = _receptive_field(layer, [net.blobs[b] for b in bottoms], top_blobs,
                              [fields.get(b) for b in bottoms])
        first_rf = None
        for name, blob in zip(tops, top_blobs, strict=True):
            if rf is not None and blob.num_axes >= 3 and len(rf[0]) == blob.num_axes - 2:
                fields[name] = rf
                first_rf = first_rf or rf
        if layer.type == "Split":
            continue
        new_tops = [(name, blob) for j, (name, blob) in enumerate(zip(tops, top_blobs,
                                                                      strict=True))
                    if not (j < len(bottoms) and bottoms[j] == name)]
        shared = any(id(b) not in owners for b in layer.blobs)
        rows.append(LayerRow(
            name=layer.name, type=replaced.get(layer.name, (layer.type,))[0],
            tops=[(name, tuple(blob.shape)) for name, blob in zip(tops, top_blobs, strict=True)],
            params=sum(b.count for b in layer.blobs if id(b) in owners),
            shared=shared,
            macs=_macs(layer, net.bottom_vecs[i], top_blobs, n),
            activation_bytes=sum(blob.count for _, blob in new_tops) * FLOAT_BYTES,
            receptive_field=first_rf[0] if first_rf else None,
            stride=first_rf[1] if first_rf else None))
    notes = [f"data layer '{name}' ({kind}) not read: shapes from its parameters or "
             "--input-shape" + (f" (assumed: {', '.join(assumed)})" if assumed else "")
             for name, (kind, assumed) in replaced.items() if name in net.layer_dict]
    return Summary(net.name, n, rows, notes)


def _batch_of(net) -> int:
    for layer, top in zip(net.layers, net.top_vecs, strict=True):
        if not net.bottom_names[layer.name] and top and top[0].num_axes:
            return max(int(top[0].shape[0]), 1)
    return 1


def _macs(layer, bottom, top, n: int) -> int:
    """Multiply-adds per image of a Convolution, Deconvolution or InnerProduct layer."""
    if not layer.blobs or not top:
        return 0
    weights = layer.blobs[0].count
    if layer.type == "InnerProduct":
        outputs = int(layer.param.inner_product_param.num_output) or 1
        return weights * (top[0].count // outputs) // n
    geom = getattr(layer, "geom", None)
    if isinstance(layer, Convolution) and geom is not None:  # depthwise forks' too
        spatial = len(geom.kernel)
        positions = 0
        for b, t in zip(bottom, top, strict=True):
            where = b if isinstance(layer, Deconvolution) else t
            outer = int(np.prod(where.shape[:where.num_axes - spatial - 1], dtype=np.int64))
            positions += outer * int(np.prod(where.shape[where.num_axes - spatial:],
                                             dtype=np.int64))
        return weights * positions // n
    return 0


Field = tuple[tuple[int, ...], tuple[float, ...]]


def _receptive_field(layer, bottom, top, fields: list[Field | None]) -> Field | None:
    """(receptive field, effective stride) per spatial axis of the layer's tops, or None."""
    if not bottom:
        if top and top[0].num_axes >= 3:
            k = top[0].num_axes - 2
            return (1,) * k, (1.0,) * k
        return None
    known = [(f, b) for f, b in zip(fields, bottom, strict=True) if f is not None]
    if not known or not top or top[0].num_axes < 3:
        return None
    (rf, jump), source = max(known, key=lambda fb: fb[0][0])
    if isinstance(layer, Convolution) and hasattr(layer, "geom"):
        g = layer.geom
        ext = [d * (k - 1) + 1 for k, d in zip(g.kernel, g.dilation, strict=True)]
        if len(ext) != len(rf):
            return None
        if not isinstance(layer, Deconvolution):
            rf = tuple(r + (e - 1) * j for r, e, j in zip(rf, ext, jump, strict=True))
            jump = tuple(j * s for j, s in zip(jump, g.stride, strict=True))
        else:
            rf = tuple(r + (math.ceil(e / s) - 1) * j
                       for r, e, s, j in zip(rf, ext, g.stride, jump, strict=True))
            jump = tuple(j / s for j, s in zip(jump, g.stride, strict=True))
        return rf, jump
    if isinstance(layer, Pooling) and len(rf) == 2:
        if getattr(layer, "global_pooling", False) or getattr(layer, "kernel", None) is None:
            kernel, stride = tuple(source.shape[2:]), (1, 1)
        else:
            kernel, stride = tuple(layer.kernel), tuple(layer.stride)
        rf = tuple(r + (k - 1) * j for r, k, j in zip(rf, kernel, jump, strict=True))
        return rf, tuple(j * s for j, s in zip(jump, stride, strict=True))
    if layer.type == "LRN" and layer.param.lrn_param.norm_region == 1:  # WITHIN_CHANNEL
        size = int(layer.param.lrn_param.local_size)
        return tuple(r + (size - 1) * j for r, j in zip(rf, jump, strict=True)), jump
    if layer.type == "Crop" or top[0].shape[2:] == source.shape[2:]:
        return rf, jump
    return None


# -- printing --------------------------------------------------------------------------------------
def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _count_text(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:g}"


def _bytes_text(value: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def _field_text(values: tuple | None) -> str:
    if values is None:
        return "-"
    parts = [f"{v:g}" for v in values]
    return parts[0] if len(set(parts)) == 1 else "x".join(parts)


def format_table(rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """Text lines of ``rows`` (the first is the header, underlined) in padded columns two spaces
    apart; the columns in ``right`` are right-aligned."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if c in right else cell.ljust(w)
                 for c, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if len(lines) == 1:
            lines.append("-" * len(lines[0]))
    return lines


def format_summary(summary: Summary) -> str:
    """The table and totals as ``engine summary`` prints them."""
    header = ("layer", "type", "top shape", "params", "mult-adds", "activations", "RF",
              "stride")
    lines: list[tuple[str, ...]] = [header]
    for r in summary.rows:
        params = f"{r.params:,}" + (" +shared" if r.shared else "") if (r.params or r.shared) \
            else "-"
        tops = r.tops or [("", ())]
        for j, (_, shape) in enumerate(tops):
            if j == 0:
                lines.append((r.name, r.type, _shape_text(shape), params,
                              _count_text(r.macs) if r.macs else "-",
                              _bytes_text(r.activation_bytes) if r.activation_bytes else "-",
                              _field_text(r.receptive_field), _field_text(r.stride)))
            else:
                lines.append(("", "", _shape_text(shape), "", "", "", "", ""))
    out = format_table(lines, right={3, 4, 5, 6, 7})
    out.append("")
    out += [f"net '{summary.name}', batch {summary.batch}, {len(summary.rows)} layers",
            f"parameters:         {summary.params:,}",
            f"model size:         {summary.model_mb:.2f} MB (float32)",
            f"FLOPs per image:    {_count_text(summary.flops)} "
            f"({_count_text(summary.macs)} multiply-adds; conv, deconv and inner product)",
            f"activation memory:  {_bytes_text(summary.activation_bytes)} for the batch",
            f"training memory:    {_bytes_text(summary.training_bytes)} (estimate: 2 x "
            "activations + 3 x parameters)"]
    out += summary.notes
    return "\n".join(out)


def summary_command(model: str, phase: int, batch: int | None, level: int,
                    stages: Sequence[str], input_shape: Sequence[str]) -> str:
    """What ``engine summary`` prints; a net that cannot be built raises a NetError."""
    if not os.path.isfile(model):
        raise NetError(f"model file '{model}' not found (working directory: {os.getcwd()})")
    if batch is not None and batch < 1:
        raise MokaError(f"--batch must be at least 1; got {batch}")
    return format_summary(summarize(model, phase, batch, level, stages,
                                    parse_input_shapes(input_shape)))


# -- the command line ------------------------------------------------------------------------------
def run(args) -> int:
    """Show a net's layers, shapes, parameters, cost and receptive fields without running it."""
    phase = TEST if args.phase == "TEST" else 0
    stages = [s for value in args.stage or () for s in value.split(",") if s]
    print(summary_command(args.model_file or args.model or "", phase, args.batch, args.level,
                          stages, args.input_shape or ()))
    return 0


def add_commands(subparsers, add_command, net_state_flags) -> None:
    """Register ``engine summary`` (called from engine/cli.py's ``build_parser``)."""
    p = add_command(subparsers, run, "summary")
    p.add_argument("model_file", nargs="?", metavar="NET", help="the net prototxt")
    p.add_argument("--model", help="the net prototxt (as Caffe's flag)")
    p.add_argument("--phase", choices=("TRAIN", "TEST"), default="TEST",
                   help="the phase to build the net in (default TEST)")
    p.add_argument("--batch", type=int, metavar="N", help="override the batch size of every input")
    p.add_argument("--input-shape", action="append", metavar="[TOP=]N,C,H,W",
                   help="the shape of a data or input top (repeatable); without TOP, the first")
    net_state_flags(p)
