"""Legacy nets and solvers → the current schema, as Caffe's ``src/caffe/util/upgrade_proto.cpp``.

Every net read (text or binary) goes through :func:`upgrade_net`, which runs Caffe's steps in
Caffe's order:

1. V0 → V1: ``layers { layer { type: "conv" kernelsize: 5 ... } }`` becomes
   ``layers { type: CONVOLUTION convolution_param { kernel_size: 5 } }``; ``padding`` layers
   are folded into the pad of the conv/pool layer they feed.
2. Data transformation: ``scale/mean_file/crop_size/mirror`` of V1 data layers move into
   ``transform_param``.
3. V1 → V2: ``layers`` with enum types become ``layer`` with string types; ``blobs_lr``,
   ``weight_decay``, ``param`` and ``blob_share_mode`` become ``param { ... }`` entries.
4. Net-level ``input`` + ``input_dim`` / ``input_shape`` become an ``Input`` layer placed first.
5. BatchNorm layers with the old three ``param`` entries get ``lr_mult: 0 decay_mult: 0``.

Solvers: the enum ``solver_type`` becomes the string ``type``; a missing or directory
``snapshot_prefix`` is filled in from the solver file's name. Problems Caffe treats as fatal
raise :class:`~engine.errors.ParseError` naming the file; the ones Caffe logs and skips are
logged as warnings.
"""

from __future__ import annotations

import logging
import os

from google.protobuf.descriptor import FieldDescriptor

from engine import caffe_pb2
from engine.errors import ParseError
from engine.protobuf_compat import is_repeated

log = logging.getLogger(__name__)

NetParameter = caffe_pb2.NetParameter
SolverParameter = caffe_pb2.SolverParameter

# V0 type string → V1 enum name (Caffe's UpgradeV0LayerType; anything else is fatal).
V0_LAYER_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION",
    "data": "DATA", "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING",
    "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT", "tanh": "TANH", "window_data": "WINDOW_DATA",
}

# V1 enum name → current type string (Caffe's UpgradeV1LayerType).
V1_LAYER_TYPES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# Legacy SolverParameter.solver_type enum name → type string.
SOLVER_TYPES = {
    "SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad", "RMSPROP": "RMSProp",
    "ADADELTA": "AdaDelta", "ADAM": "Adam",
}

_CONV_IP = {"conv": "convolution_param", "innerproduct": "inner_product_param"}
_CONV_POOL = {"conv": "convolution_param", "pool": "pooling_param"}
_LRN = {"lrn": "lrn_param"}
_WINDOW = {"window_data": "window_data_param"}
_ANY = {"*": "transform_param"}  # transformation fields move whatever the layer type

# V0LayerParameter field → (field name in the V1 *_param, {V0 type: V1 *_param field}).
_V0_FIELDS: dict[str, tuple[str, dict[str, str]]] = {
    "num_output": ("num_output", _CONV_IP),
    "biasterm": ("bias_term", _CONV_IP),
    "weight_filler": ("weight_filler", _CONV_IP),
    "bias_filler": ("bias_filler", _CONV_IP),
    "pad": ("pad", _CONV_POOL),
    "kernelsize": ("kernel_size", _CONV_POOL),
    "group": ("group", {"conv": "convolution_param"}),
    "stride": ("stride", _CONV_POOL),
    "pool": ("pool", {"pool": "pooling_param"}),
    "dropout_ratio": ("dropout_ratio", {"dropout": "dropout_param"}),
    "local_size": ("local_size", _LRN),
    "alpha": ("alpha", _LRN),
    "beta": ("beta", _LRN),
    "k": ("k", _LRN),
    "source": ("source", {
        "data": "data_param", "hdf5_data": "hdf5_data_param", "images": "image_data_param",
        "window_data": "window_data_param", "infogain_loss": "infogain_loss_param"}),
    "scale": ("scale", _ANY),
    "meanfile": ("mean_file", _ANY),
    "cropsize": ("crop_size", _ANY),
    "mirror": ("mirror", _ANY),
    "batchsize": ("batch_size", {
        "data": "data_param", "hdf5_data": "hdf5_data_param", "images": "image_data_param",
        "window_data": "window_data_param"}),
    "rand_skip": ("rand_skip", {"data": "data_param", "images": "image_data_param"}),
    "shuffle_images": ("shuffle", {"images": "image_data_param"}),
    "new_height": ("new_height", {"images": "image_data_param"}),
    "new_width": ("new_width", {"images": "image_data_param"}),
    "concat_dim": ("concat_dim", {"concat": "concat_param"}),
    "det_fg_threshold": ("fg_threshold", _WINDOW),
    "det_bg_threshold": ("bg_threshold", _WINDOW),
    "det_fg_fraction": ("fg_fraction", _WINDOW),
    "det_context_pad": ("context_pad", _WINDOW),
    "det_crop_mode": ("crop_mode", _WINDOW),
}
_V0_COPIED = {"name", "type", "blobs", "blobs_lr", "weight_decay"}

_DATA_TYPES = {"DATA": "data_param", "IMAGE_DATA": "image_data_param",
               "WINDOW_DATA": "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def _copies(repeated) -> list:
    """Detached copies of a repeated message field's items (safe to keep after clearing it)."""
    out = []
    for item in repeated:
        copy = type(item)()
        copy.CopyFrom(item)
        out.append(copy)
    return out


def _assign(message, field: str, value) -> None:
    """Set ``message.field`` to ``value`` whatever the field's label and kind."""
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    if is_repeated(descriptor):
        getattr(message, field).append(value)
    elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, field).CopyFrom(value)
    else:
        setattr(message, field, value)


# -- what needs doing ----------------------------------------------------------------------------
def _needs_v0(net: NetParameter) -> bool:
    return any(layer.HasField("layer") for layer in net.layers)


def _needs_data(net: NetParameter) -> bool:
    V1 = caffe_pb2.V1LayerParameter
    for layer in net.layers:
        param_field = _DATA_TYPES.get(V1.LayerType.Name(layer.type)) if layer.type else None
        if param_field and any(getattr(layer, param_field).HasField(f)
                               for f in _TRANSFORM_FIELDS):
            return True
    return False


def _needs_batch_norm(net: NetParameter) -> bool:
    # Caffe rewrites every 3-param BatchNorm; one already at zero needs nothing.
    return any(layer.type == "BatchNorm" and len(layer.param) == 3
               and any(p.lr_mult or p.decay_mult for p in layer.param) for layer in net.layer)


def net_needs_upgrade(net: NetParameter) -> bool:
    """True if ``net`` uses any legacy form :func:`upgrade_net` rewrites."""
    return (bool(len(net.layers)) or bool(len(net.input)) or bool(len(net.input_dim))
            or bool(len(net.input_shape)) or _needs_batch_norm(net))


# -- V0 → V1 ---------------------------------------------------------------------------------
def _fold_padding_layers(net: NetParameter, source: str) -> None:
    """Drop V0 ``padding`` layers, moving their pad into the conv/pool layer they feed."""
    producer: dict[str, int] = {name: -1 for name in net.input}  # blob → index of last writer
    original = _copies(net.layers)
    kept = []
    for i, connection in enumerate(original):
        v0 = connection.layer
        for j, blob in enumerate(connection.bottom):
            if blob not in producer:
                raise ParseError(f"{_where(source)}V0 layer '{v0.name}' reads blob '{blob}', "
                                 "which no earlier layer or input produces")
            src = original[producer[blob]] if producer[blob] >= 0 else None
            if src is None or src.layer.type != "padding":
                continue
            if v0.type not in ("conv", "pool"):
                raise ParseError(f"{_where(source)}V0 padding layer '{src.layer.name}' feeds "
                                 f"'{v0.name}' of type '{v0.type}'; only conv and pool layers "
                                 "can absorb a padding layer")
            if len(connection.bottom) != 1 or len(src.bottom) != 1 or len(src.top) != 1:
                raise ParseError(f"{_where(source)}V0 padding layer '{src.layer.name}' and the "
                                 f"layer '{v0.name}' it feeds must each have one bottom and "
                                 "one top")
            connection.layer.pad = src.layer.pad
            connection.bottom[j] = src.bottom[0]
        if v0.type != "padding":
            kept.append(connection)
        for blob in connection.top:
            producer[blob] = i
    del net.layers[:]
    net.layers.extend(kept)


def _upgrade_v0_layer(connection, out, source: str) -> None:
    """Fill the V1 layer ``out`` from a V0 ``layers { layer { ... } bottom top }`` entry."""
    V1 = caffe_pb2.V1LayerParameter
    out.bottom.extend(connection.bottom)
    out.top.extend(connection.top)
    v0 = connection.layer
    kind = v0.type
    if v0.HasField("name"):
        out.name = v0.name
    if v0.HasField("type"):
        if kind not in V0_LAYER_TYPES:
            raise ParseError(f"{_where(source)}V0 layer '{v0.name}' has unknown type '{kind}' "
                             f"(known V0 types: {', '.join(sorted(V0_LAYER_TYPES))})")
        out.type = V1.LayerType.Value(V0_LAYER_TYPES[kind])
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for field, value in v0.ListFields():
        name = field.name
        if name in _V0_COPIED:
            continue
        if name == "hdf5_output_param" and kind == "hdf5_output":
            out.hdf5_output_param.CopyFrom(value)
            continue
        target, routes = _V0_FIELDS.get(name, ("", {}))
        param_field = routes.get("*") or routes.get(kind)
        if not param_field:
            log.warning("%sV0 layer '%s': field '%s' does not apply to type '%s'; ignored",
                        _where(source), v0.name, name, kind)
            continue
        if name == "pool":  # V0 and V1 PoolMethod enums share their numbers
            value = caffe_pb2.PoolingParameter.PoolMethod.Value(
                caffe_pb2.V0LayerParameter.PoolMethod.Name(value))
        _assign(getattr(out, param_field), target, value)


def _upgrade_v0(net: NetParameter, source: str) -> None:
    log.info("Attempting to upgrade input file specified using deprecated V0LayerParameter: %s",
             source)
    _fold_padding_layers(net, source)
    old = NetParameter()
    old.CopyFrom(net)
    net.Clear()  # as Caffe: only name, layers, inputs and force_backward survive
    if old.HasField("name"):
        net.name = old.name
    for connection in old.layers:
        _upgrade_v0_layer(connection, net.layers.add(), source)
    net.input.extend(old.input)
    net.input_dim.extend(old.input_dim)
    if old.HasField("force_backward"):
        net.force_backward = old.force_backward
    log.info("Successfully upgraded file specified using deprecated V0LayerParameter")


# -- data transformation -----------------------------------------------------------------------
def _upgrade_data_transform(net: NetParameter, source: str) -> None:
    log.info("Attempting to upgrade input file specified using deprecated transformation "
             "parameters: %s", source)
    V1 = caffe_pb2.V1LayerParameter
    for layer in net.layers:
        param_field = _DATA_TYPES.get(V1.LayerType.Name(layer.type)) if layer.type else None
        if not param_field:
            continue
        legacy = getattr(layer, param_field)
        for field in _TRANSFORM_FIELDS:
            if legacy.HasField(field):
                setattr(layer.transform_param, field, getattr(legacy, field))
                legacy.ClearField(field)
    log.info("Successfully upgraded file specified using deprecated data transformation "
             "parameters.")


# -- V1 → V2 ---------------------------------------------------------------------------------
def _param_spec(layer, i: int):
    while len(layer.param) <= i:
        layer.param.add()
    return layer.param[i]


def _upgrade_v1_layer(v1, out, source: str) -> None:
    V1 = caffe_pb2.V1LayerParameter
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    if v1.HasField("name"):
        out.name = v1.name
    out.include.extend(v1.include)
    out.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        out.type = V1_LAYER_TYPES[V1.LayerType.Name(v1.type)]
    out.blobs.extend(v1.blobs)
    for i, name in enumerate(v1.param):
        _param_spec(out, i).name = name
    for i, mode in enumerate(v1.blob_share_mode):  # the two DimCheckMode enums agree
        _param_spec(out, i).share_mode = mode
    for i, lr in enumerate(v1.blobs_lr):
        _param_spec(out, i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        _param_spec(out, i).decay_mult = decay
    out.loss_weight.extend(v1.loss_weight)
    for field, value in v1.ListFields():
        if field.name.endswith("_param"):
            getattr(out, field.name).CopyFrom(value)
    if v1.HasField("layer"):
        log.warning("%sV1 layer '%s' still holds a V0 layer; ignored", _where(source), v1.name)


def _upgrade_v1(net: NetParameter, source: str) -> None:
    if len(net.layer):
        raise ParseError(f"{_where(source)}the net has both 'layer' (current) and 'layers' "
                         "(V1) entries; write every layer in one form")
    log.info("Attempting to upgrade input file specified using deprecated V1LayerParameter: %s",
             source)
    old_layers = list(net.layers)
    for v1 in old_layers:
        _upgrade_v1_layer(v1, net.layer.add(), source)
    net.ClearField("layers")
    log.info("Successfully upgraded file specified using deprecated V1LayerParameter")


# -- inputs and BatchNorm ------------------------------------------------------------------------
def _upgrade_input(net: NetParameter, source: str) -> None:
    """Net-level ``input`` fields → an ``Input`` layer placed first (Caffe's UpgradeNetInput)."""
    log.info("Attempting to upgrade input file specified using deprecated input fields: %s",
             source)
    names, dims, shapes = list(net.input), list(net.input_dim), list(net.input_shape)
    if shapes and len(shapes) != len(names):
        raise ParseError(f"{_where(source)}{len(names)} net input(s) but {len(shapes)} "
                         "input_shape entries; give one input_shape per input")
    if not shapes and dims and len(dims) != 4 * len(names):
        raise ParseError(f"{_where(source)}{len(names)} net input(s) but {len(dims)} input_dim "
                         "values; give 4 input_dim values (N, C, H, W) per input")
    if names and (shapes or dims):
        layer = caffe_pb2.LayerParameter(name="input", type="Input", top=names)
        for i in range(len(names)):
            shape = layer.input_param.shape.add()
            if shapes:
                shape.CopyFrom(shapes[i])
            else:
                shape.dim.extend(dims[4 * i:4 * i + 4])
        rest = _copies(net.layer)
        del net.layer[:]
        net.layer.append(layer)
        net.layer.extend(rest)
    # An input without dims is a legacy .caffemodel's; dropping it is all that is needed.
    for field in ("input", "input_dim", "input_shape"):
        net.ClearField(field)
    log.info("Successfully upgraded file specified using deprecated input fields.")


def _upgrade_batch_norm(net: NetParameter, source: str) -> None:
    log.info("Attempting to upgrade batch norm layers using deprecated params: %s", source)
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:  # statistics are not learned: Caffe zeroes both multipliers
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
    log.info("Successfully upgraded batch norm layers using deprecated params.")


def upgrade_net(net: NetParameter, source: str = "") -> NetParameter:
    """Upgrade ``net`` in place to the current format and return it.

    ``source`` (usually the file name) prefixes log lines and errors.
    """
    if _needs_v0(net):
        _upgrade_v0(net, source)
    if _needs_data(net):
        _upgrade_data_transform(net, source)
    if len(net.layers):
        _upgrade_v1(net, source)
    if len(net.input) or len(net.input_dim) or len(net.input_shape):
        _upgrade_input(net, source)
    if _needs_batch_norm(net):
        _upgrade_batch_norm(net, source)
    return net


# -- solvers ---------------------------------------------------------------------------------
def solver_needs_upgrade(solver: SolverParameter) -> bool:
    """True if ``solver`` sets ``solver_type`` or holds an inline net in a legacy form."""
    nets = [*solver.test_net_param]
    nets += [getattr(solver, f) for f in ("net_param", "train_net_param") if solver.HasField(f)]
    return solver.HasField("solver_type") or any(net_needs_upgrade(n) for n in nets)


def upgrade_solver(solver: SolverParameter, source: str = "") -> SolverParameter:
    """Upgrade ``solver`` in place: ``solver_type`` enum → ``type`` string; inline nets too."""
    if solver.HasField("solver_type"):
        if solver.HasField("type"):
            raise ParseError(f"{_where(source)}both 'solver_type' (deprecated enum) and 'type' "
                             f"are set; keep only type: \"{solver.type}\"")
        log.info("Attempting to upgrade input file specified using deprecated 'solver_type' "
                 "field (enum)': %s", source)
        enum_name = SolverParameter.SolverType.Name(solver.solver_type)
        solver.type = SOLVER_TYPES[enum_name]
        solver.ClearField("solver_type")
        log.info("Successfully upgraded file specified using deprecated 'solver_type' field "
                 "(enum) to 'type' field (string).")
    # Caffe leaves inline nets alone (and then drops their V1 layers); we upgrade them.
    for field in ("net_param", "train_net_param"):
        if solver.HasField(field):
            upgrade_net(getattr(solver, field), f"{source} ({field})")
    for i, net in enumerate(solver.test_net_param):
        upgrade_net(net, f"{source} (test_net_param #{i})")
    return solver


def upgrade_snapshot_prefix(solver: SolverParameter, solver_file: str | os.PathLike) -> None:
    """Caffe's default prefix: the solver path minus its extension; a directory gets the stem."""
    solver_file = os.fspath(solver_file)
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = os.path.splitext(solver_file)[0]
        log.info("snapshot_prefix was not specified and is set to %s", solver.snapshot_prefix)
    elif os.path.isdir(solver.snapshot_prefix):
        stem = os.path.splitext(os.path.basename(solver_file))[0]
        solver.snapshot_prefix = os.path.join(solver.snapshot_prefix, stem)
        log.info("snapshot_prefix was a directory and is replaced to %s", solver.snapshot_prefix)
