"""Pictures of nets: pycaffe's ``caffe.draw`` and ``engine draw`` (Caffe's python/draw_net.py).

    import engine as caffe
    from engine.proto import caffe_pb2
    from google.protobuf import text_format

    net = text_format.Parse(open("train_val.prototxt").read(), caffe_pb2.NetParameter())
    caffe.draw.draw_net_to_file(net, "net.png", rankdir="LR", phase=caffe.TRAIN)

The drawing follows pycaffe's conventions: each layer is a filled box labelled with its name,
its type (``Pooling`` with its method) and, for Convolution, Deconvolution and Pooling, kernel
size, stride and pad; colours: convolutions ``#FF5050``, pooling ``#FF9900``, inner products
``#CC33FF``, in-place layers (one bottom that is also the top) ``#90EE90``, anything else
``#6495ED``. Blobs are grey octagons. Edges out of Data, Convolution, Deconvolution and
InnerProduct layers carry the batch size or ``num_output``.

Drawing needs pydot and Graphviz's ``dot`` program, an optional extra:
``pip install "moka[draw]"`` and Graphviz from the system's packages (``apt-get install
graphviz``, ``brew install graphviz``). Without them the functions raise one clear
:class:`DrawError`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
from typing import Any

from engine import caffe_pb2
from engine.errors import MokaError

__all__ = [
    "BLOB_STYLE",
    "LAYER_STYLE_DEFAULT",
    "NEURON_LAYER_STYLE",
    "DrawError",
    "RuleError",
    "choose_color_by_layertype",
    "draw_net",
    "draw_net_to_file",
    "get_edge_label",
    "get_layer_label",
    "get_layer_lr_mult",
    "get_pooling_types_dict",
    "get_pydot_graph",
]

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}

LAYER_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
                "InnerProduct": "#CC33FF"}
LEARNING_TYPES = ("Convolution", "Deconvolution", "InnerProduct")
INSTALL_HINT = ('install the draw extra (pip install "moka[draw]") and Graphviz '
                "(apt-get install graphviz, or brew install graphviz)")


class DrawError(MokaError):
    """pydot or Graphviz is missing, or Graphviz could not render the picture."""


class RuleError(MokaError, ValueError):
    """A layer with both include and exclude rules (a ValueError, as pycaffe raises)."""


def _pydot() -> Any:
    try:
        import pydot
    except ImportError:
        raise DrawError(f"drawing nets needs pydot, which is not installed: {INSTALL_HINT}"
                        ) from None
    return pydot


# -- labels and colours ------------------------------------------------------------------------
def get_pooling_types_dict() -> dict[int, str]:
    """Pooling method number → name (``{0: "MAX", 1: "AVE", 2: "STOCHASTIC"}``)."""
    return {v.number: v.name for v in caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR.values}


def get_edge_label(layer: Any) -> str:
    """The label of a layer's edges to its tops: batch size or ``num_output``, else empty."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return '""'


def get_layer_lr_mult(layer: Any) -> tuple[float, float]:
    """The weights' and bias' ``lr_mult`` of a Convolution, Deconvolution or InnerProduct."""
    if layer.type not in LEARNING_TYPES:
        raise ValueError(f"{layer.type} layers do not have a learning rate multiplier")
    specs = list(layer.param)
    if len(specs) > 2:
        raise ValueError("Could not parse the learning rate multiplier")
    mults = [spec.lr_mult for spec in specs] + [1.0] * (2 - len(specs))
    return mults[0], mults[1]


def _spatial(layer: Any) -> tuple[str, int, int]:
    """(kernel size text, stride, pad) of a Convolution, Deconvolution or Pooling layer."""
    if layer.type == "Pooling":
        p = layer.pooling_param
        if p.HasField("kernel_h") or p.HasField("kernel_w"):
            return f"{p.kernel_h}x{p.kernel_w}", p.stride, p.pad
        return str(p.kernel_size), p.stride, p.pad
    c = layer.convolution_param
    if c.HasField("kernel_h") or c.HasField("kernel_w"):
        kernel = f"{c.kernel_h}x{c.kernel_w}"
    else:
        kernel = str(c.kernel_size[0]) if len(c.kernel_size) else "1"
    stride = c.stride[0] if len(c.stride) else 1
    pad = c.pad[0] if len(c.pad) else 0
    return kernel, stride, pad


def get_layer_label(layer: Any, rankdir: str, display_lrm: bool = False) -> str:
    """A layer node's label (quoted for dot): name, (type), geometry, optionally lr_mults.

    Lines are separated by dot's ``\\n`` in a horizontal layout and by spaces in a vertical one
    (``rankdir`` TB or BT), where width is free and height is not.
    """
    separator = " " if rankdir in ("TB", "BT") else r"\n"
    parts = [layer.name]
    if layer.type == "Pooling":
        method = get_pooling_types_dict().get(layer.pooling_param.pool, "?")
        parts.append(f"({layer.type} {method})")
    else:
        parts.append(f"({layer.type})")
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        kernel, stride, pad = _spatial(layer)
        parts.append(separator.join((f"kernel size: {kernel}", f"stride: {stride}",
                                     f"pad: {pad}")))
    if display_lrm and layer.type in LEARNING_TYPES:
        weights, bias = get_layer_lr_mult(layer)
        if weights or bias:
            parts.append(f"lr mult: {weights:.1f}, {bias:.1f}")
    text = separator.join(parts).replace('"', r"\"")
    return f'"{text}"'


def choose_color_by_layertype(layertype: str) -> str:
    """A layer node's fill colour by type."""
    return LAYER_COLORS.get(layertype, LAYER_STYLE_DEFAULT["fillcolor"])


def _in_phase(layer: Any, phase: int | None) -> bool:
    """pycaffe's phase filter: include rules name the phases a layer runs in, exclude rules
    the ones it does not (a rule without a phase matches every phase)."""
    if phase is None:
        return True
    if len(layer.include) and len(layer.exclude):
        raise RuleError(f"layer {layer.name} has both include and exclude specified. Keep one "
                        "kind of rule (Caffe does not build such a net either)")

    def matches(rule: Any) -> bool:
        return not rule.HasField("phase") or rule.phase == phase

    if len(layer.include) and not any(matches(rule) for rule in layer.include):
        return False
    return not any(rule.HasField("phase") and rule.phase == phase for rule in layer.exclude)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', r"\"") + '"'


# -- the graph ---------------------------------------------------------------------------------
def get_pydot_graph(caffe_net: Any, rankdir: str, label_edges: bool = True,
                    phase: int | None = None, display_lrm: bool = False) -> Any:
    """A ``pydot.Dot`` digraph of ``caffe_net`` (a NetParameter): one node per layer (layers
    of the same name and type share one) and per blob, edges bottom → layer → top.

    ``phase`` (``caffe.TRAIN``/``caffe.TEST``) keeps only that phase's layers; None keeps all.
    """
    pydot = _pydot()
    graph = pydot.Dot(_quote(caffe_net.name or "Net"), graph_type="digraph", rankdir=rankdir)
    nodes: dict[str, Any] = {}
    edges: list[tuple[str, str, str]] = []

    def blob(name: str) -> str:
        key = _quote(f"blob {name}")
        nodes.setdefault(key, pydot.Node(key, label=_quote(name), **BLOB_STYLE))
        return key

    for layer in caffe_net.layer:
        if not _in_phase(layer, phase):
            continue
        key = _quote(f"layer {layer.name} {layer.type}")
        in_place = (len(layer.bottom) == 1 and len(layer.top) == 1
                    and layer.bottom[0] == layer.top[0])
        style = dict(NEURON_LAYER_STYLE if in_place else LAYER_STYLE_DEFAULT)
        if not in_place:
            style["fillcolor"] = choose_color_by_layertype(layer.type)
        nodes[key] = pydot.Node(key, label=get_layer_label(layer, rankdir, display_lrm), **style)
        for bottom in layer.bottom:
            edges.append((blob(bottom), key, '""'))
        label = get_edge_label(layer) if label_edges else '""'
        for top in layer.top:
            edges.append((key, blob(top), label if label == '""' else _quote(label)))
    for node in nodes.values():
        graph.add_node(node)
    for src, dst, label in edges:
        graph.add_edge(pydot.Edge(src, dst, label=label))
    return graph


def _render(graph: Any, ext: str) -> bytes:
    if ext in ("raw", "dot", "gv"):  # the dot source itself
        return graph.to_string().encode("utf-8")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # pydot prints dot's stdout and stderr
            return graph.create(format=ext)
    except FileNotFoundError:
        raise DrawError(f"Graphviz's 'dot' program was not found: {INSTALL_HINT}") from None
    except Exception as e:  # pydot reports dot's failures as assorted exception types
        said = [b for b in re.findall(r"b'(.*?)'\n", printed.getvalue() + "\n", re.DOTALL) if b]
        detail = said[-1].encode().decode("unicode_escape") if said else str(e)
        raise DrawError(f"Graphviz could not draw a '{ext}' picture: "
                        f"{' '.join(detail.split())[:400]}") from None


def draw_net(caffe_net: Any, rankdir: str, ext: str = "png", phase: int | None = None,
             display_lrm: bool = False) -> bytes:
    """The picture of ``caffe_net`` as bytes in format ``ext`` (any Graphviz ``-T`` format;
    ``raw``/``dot``: the dot source)."""
    graph = get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    return _render(graph, ext)


def draw_net_to_file(caffe_net: Any, filename: str, rankdir: str = "LR",
                     phase: int | None = None, display_lrm: bool = False) -> None:
    """Write the picture of ``caffe_net`` to ``filename`` in the format its extension names
    (``.png``, ``.svg``, ``.pdf``...; ``.raw`` writes the dot source)."""
    filename = os.fspath(filename)
    ext = filename.rsplit(".", 1)[-1] if "." in os.path.basename(filename) else "png"
    data = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    with open(filename, "wb") as f:
        f.write(data)


# -- engine draw ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Draw a net prototxt to an image file (Caffe's python/draw_net.py)."""
    from engine.io import read_net_param
    from engine.layer import TEST, TRAIN

    phase = {"TRAIN": TRAIN, "TEST": TEST, "ALL": None}[args.phase]
    net = read_net_param(args.input_net_proto_file)
    print(f"Drawing net to {args.output_image_file}")
    draw_net_to_file(net, args.output_image_file, args.rankdir, phase, args.display_lrm)
    return 0


def add_commands(subparsers: Any, add_command: Any, net_state_flags: Any = None) -> None:
    """Register ``engine draw`` (called from engine/cli.py's ``build_parser``)."""
    p = add_command(subparsers, run, "draw")
    p.add_argument("input_net_proto_file", metavar="NET", help="the net prototxt")
    p.add_argument("output_image_file", metavar="OUT.png",
                   help="the picture to write; its extension picks the format (.png, .svg, "
                        ".pdf, ...; .raw for the dot source)")
    p.add_argument("--rankdir", default="LR",
                   help="layout direction: LR (default), RL, TB or BT (Graphviz's rankdir)")
    p.add_argument("--phase", choices=("TRAIN", "TEST", "ALL"), default="ALL",
                   help="draw only this phase's layers (default ALL)")
    p.add_argument("--display_lrm", action="store_true",
                   help="show the learning layers' lr_mult values")
