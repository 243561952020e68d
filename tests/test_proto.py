"""The Caffe schema: generated module is fresh, and numbers/defaults match BVLC Caffe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from engine import caffe_pb2
from engine.protobuf_compat import is_packed, is_repeated, is_required

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "engine" / "caffe_pb2.py"


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "moka_proto_generate", REPO / "proto" / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _field(message: str, name: str):
    return getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[name]


# --------------------------------------------------------------------------- staleness


def test_generated_module_is_fresh(tmp_path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools not installed: cannot regenerate engine/caffe_pb2.py")
    fresh = _load_generator().generate(tmp_path)
    assert fresh.read_bytes() == COMMITTED.read_bytes(), (
        "engine/caffe_pb2.py is stale: run `python proto/generate.py`"
    )


# --------------------------------------------------------------------------- field numbers

# (message, field, Caffe's field number)
NUMBERS = [
    ("BlobShape", "dim", 1),
    ("BlobProto", "num", 1),
    ("BlobProto", "data", 5),
    ("BlobProto", "diff", 6),
    ("BlobProto", "shape", 7),
    ("BlobProto", "double_data", 8),
    ("BlobProto", "double_diff", 9),
    ("Datum", "data", 4),
    ("Datum", "label", 5),
    ("Datum", "float_data", 6),
    ("Datum", "encoded", 7),
    ("NetParameter", "name", 1),
    ("NetParameter", "layers", 2),
    ("NetParameter", "input", 3),
    ("NetParameter", "input_dim", 4),
    ("NetParameter", "input_shape", 8),
    ("NetParameter", "layer", 100),
    ("LayerParameter", "phase", 10),
    ("LayerParameter", "loss_weight", 5),
    ("LayerParameter", "param", 6),
    ("LayerParameter", "blobs", 7),
    ("LayerParameter", "propagate_down", 11),
    ("LayerParameter", "include", 8),
    ("LayerParameter", "exclude", 9),
    ("ParamSpec", "lr_mult", 3),
    ("ParamSpec", "decay_mult", 4),
    ("SolverParameter", "net", 24),
    ("SolverParameter", "net_param", 25),
    ("SolverParameter", "train_net", 1),
    ("SolverParameter", "test_iter", 3),
    ("SolverParameter", "test_interval", 4),
    ("SolverParameter", "base_lr", 5),
    ("SolverParameter", "lr_policy", 8),
    ("SolverParameter", "snapshot_prefix", 15),
    ("SolverParameter", "random_seed", 20),
    ("SolverParameter", "solver_type", 30),
    ("SolverParameter", "delta", 31),
    ("SolverParameter", "average_loss", 33),
    ("SolverParameter", "stepvalue", 34),
    ("SolverParameter", "clip_gradients", 35),
    ("SolverParameter", "iter_size", 36),
    ("SolverParameter", "snapshot_format", 37),
    ("SolverParameter", "rms_decay", 38),
    ("SolverParameter", "momentum2", 39),
    ("SolverParameter", "type", 40),
    ("SolverParameter", "layer_wise_reduce", 41),
    ("SolverParameter", "weights", 42),
    ("SolverState", "iter", 1),
    ("SolverState", "learned_net", 2),
    ("SolverState", "history", 3),
    ("SolverState", "current_step", 4),
    ("SolverState", "moka_resume", 1000),
    ("SolverState", "moka_sha256", 1001),
    ("MokaResumeState", "learned_net_size", 9),
    ("MokaResumeState", "learned_net_sha256", 10),
    ("ConvolutionParameter", "stride", 6),
    ("ConvolutionParameter", "dilation", 18),
    ("ConvolutionParameter", "group", 5),
    ("PoolingParameter", "global_pooling", 12),
    ("PoolingParameter", "round_mode", 13),
    ("DataParameter", "backend", 8),
    ("DataParameter", "prefetch", 10),
    ("SliceParameter", "axis", 3),
    ("ConcatParameter", "axis", 2),
    ("SPPParameter", "engine", 6),
    ("V1LayerParameter", "layer", 1),
    ("V1LayerParameter", "type", 5),
    ("V1LayerParameter", "blobs_lr", 7),
    ("V1LayerParameter", "weight_decay", 8),
    ("V1LayerParameter", "include", 32),
    ("V1LayerParameter", "loss_weight", 35),
    ("V1LayerParameter", "transform_param", 36),
    ("V1LayerParameter", "loss_param", 42),
    ("V1LayerParameter", "param", 1001),
    ("V1LayerParameter", "blob_share_mode", 1002),
    ("V0LayerParameter", "kernelsize", 8),
    ("V0LayerParameter", "k", 22),
    ("V0LayerParameter", "blobs", 50),
    ("V0LayerParameter", "det_context_pad", 58),
    ("V0LayerParameter", "concat_dim", 65),
    ("V0LayerParameter", "hdf5_output_param", 1001),
]


@pytest.mark.parametrize(("message", "name", "number"), NUMBERS)
def test_field_number(message, name, number):
    assert _field(message, name).number == number


# Every per-type field of LayerParameter, with Caffe's numbers (102..148).
LAYER_PARAMS = {
    "transform_param": 100,
    "loss_param": 101,
    "accuracy_param": 102,
    "argmax_param": 103,
    "concat_param": 104,
    "contrastive_loss_param": 105,
    "convolution_param": 106,
    "data_param": 107,
    "dropout_param": 108,
    "dummy_data_param": 109,
    "eltwise_param": 110,
    "exp_param": 111,
    "hdf5_data_param": 112,
    "hdf5_output_param": 113,
    "hinge_loss_param": 114,
    "image_data_param": 115,
    "infogain_loss_param": 116,
    "inner_product_param": 117,
    "lrn_param": 118,
    "memory_data_param": 119,
    "mvn_param": 120,
    "pooling_param": 121,
    "power_param": 122,
    "relu_param": 123,
    "sigmoid_param": 124,
    "softmax_param": 125,
    "slice_param": 126,
    "tanh_param": 127,
    "threshold_param": 128,
    "window_data_param": 129,
    "python_param": 130,
    "prelu_param": 131,
    "spp_param": 132,
    "reshape_param": 133,
    "log_param": 134,
    "flatten_param": 135,
    "reduction_param": 136,
    "embed_param": 137,
    "tile_param": 138,
    "batch_norm_param": 139,
    "elu_param": 140,
    "bias_param": 141,
    "scale_param": 142,
    "input_param": 143,
    "crop_param": 144,
    "parameter_param": 145,
    "recurrent_param": 146,
    "swish_param": 147,
    "clip_param": 148,
}

# The segmentation forks' per-type fields: the fork's number, or 1000 + it where BVLC Caffe
# later took that number (see the comments in proto/caffe.proto).
SEGMENTATION_FORK_PARAMS = {
    "bn_param": 45,  # SegNet (alexgkendall/caffe-segnet), ENet (TimoSaemann/caffe-enet)
    "dense_image_data_param": 46,  # ENet; SegNet's 138 is BVLC's tile_param
    "upsample_param": 1137,  # SegNet 137 (BVLC embed_param), ENet 147 (BVLC swish_param)
    "interp_param": 1143,  # DeepLab v2 / PSPNet 143 (BVLC input_param)
}

# The detection and mobile forks' per-type fields, with the forks' numbers.
FORK_LAYER_PARAMS = {
    "shuffle_channel_param": 164,  # ShuffleNet ports (farmingyard/ShuffleNet)
    "annotated_data_param": 200,  # SSD (weiliu89/caffe, branch ssd), 200-207
    "multibox_loss_param": 201,
    "permute_param": 202,
    "prior_box_param": 203,
    "detection_output_param": 204,
    "detection_evaluate_param": 205,
    "norm_param": 206,
    "video_data_param": 207,
}

# Every per-type field of the legacy V1LayerParameter, with its V1 numbers.
V1_PARAMS = {
    "concat_param": 9,
    "convolution_param": 10,
    "data_param": 11,
    "dropout_param": 12,
    "hdf5_data_param": 13,
    "hdf5_output_param": 14,
    "image_data_param": 15,
    "infogain_loss_param": 16,
    "inner_product_param": 17,
    "lrn_param": 18,
    "pooling_param": 19,
    "window_data_param": 20,
    "power_param": 21,
    "memory_data_param": 22,
    "argmax_param": 23,
    "eltwise_param": 24,
    "threshold_param": 25,
    "dummy_data_param": 26,
    "accuracy_param": 27,
    "hinge_loss_param": 29,
    "relu_param": 30,
    "slice_param": 31,
    "mvn_param": 34,
    "transform_param": 36,
    "tanh_param": 37,
    "sigmoid_param": 38,
    "softmax_param": 39,
    "contrastive_loss_param": 40,
    "exp_param": 41,
    "loss_param": 42,
}


def test_layer_parameter_type_fields_complete():
    fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    got = {n: f.number for n, f in fields.items() if n.endswith("_param")}
    assert got == LAYER_PARAMS | SEGMENTATION_FORK_PARAMS | FORK_LAYER_PARAMS


def test_v1_layer_parameter_type_fields_complete():
    fields = caffe_pb2.V1LayerParameter.DESCRIPTOR.fields_by_name
    got = {n: f.number for n, f in fields.items() if n.endswith("_param")}
    assert got == V1_PARAMS


def test_v1_layer_type_enum():
    values = caffe_pb2.V1LayerParameter.LayerType
    assert values.Value("NONE") == 0
    assert values.Value("CONVOLUTION") == 4
    assert values.Value("INNER_PRODUCT") == 14
    assert values.Value("POOLING") == 17
    assert values.Value("SOFTMAX_LOSS") == 21
    assert values.Value("ABSVAL") == 35
    assert values.Value("DECONVOLUTION") == 39
    assert len(values.keys()) == 40


# --------------------------------------------------------------------------- defaults


def _enum(message: str, enum: str, name: str) -> int:
    return (
        getattr(caffe_pb2, message).DESCRIPTOR.enum_types_by_name[enum].values_by_name[name].number
    )


# (message, field, Caffe's default)
DEFAULTS = [
    ("PoolingParameter", "pool", _enum("PoolingParameter", "PoolMethod", "MAX")),
    ("PoolingParameter", "round_mode", _enum("PoolingParameter", "RoundMode", "CEIL")),
    ("PoolingParameter", "stride", 1),
    ("DataParameter", "backend", _enum("DataParameter", "DB", "LEVELDB")),
    ("DataParameter", "prefetch", 4),
    ("SolverParameter", "type", "SGD"),
    ("SolverParameter", "delta", 1e-8),
    ("SolverParameter", "momentum2", 0.999),
    ("SolverParameter", "rms_decay", 0.99),
    ("SolverParameter", "regularization_type", "L2"),
    ("SolverParameter", "clip_gradients", -1.0),
    ("SolverParameter", "average_loss", 1),
    ("SolverParameter", "iter_size", 1),
    ("SolverParameter", "random_seed", -1),
    ("SolverParameter", "test_initialization", True),
    ("SolverParameter", "snapshot_after_train", True),
    ("SolverParameter", "layer_wise_reduce", True),
    ("SolverParameter", "solver_mode", _enum("SolverParameter", "SolverMode", "GPU")),
    (
        "SolverParameter",
        "snapshot_format",
        _enum("SolverParameter", "SnapshotFormat", "BINARYPROTO"),
    ),
    ("SolverParameter", "solver_type", _enum("SolverParameter", "SolverType", "SGD")),
    ("FillerParameter", "type", "constant"),
    ("FillerParameter", "std", 1.0),
    ("FillerParameter", "max", 1.0),
    ("FillerParameter", "sparse", -1),
    ("FillerParameter", "variance_norm", _enum("FillerParameter", "VarianceNorm", "FAN_IN")),
    ("LossParameter", "normalization", _enum("LossParameter", "NormalizationMode", "VALID")),
    ("NetState", "phase", caffe_pb2.TEST),
    ("ParamSpec", "lr_mult", 1.0),
    ("ParamSpec", "decay_mult", 1.0),
    ("ConvolutionParameter", "bias_term", True),
    ("ConvolutionParameter", "group", 1),
    ("ConvolutionParameter", "axis", 1),
    ("LRNParameter", "local_size", 5),
    ("LRNParameter", "beta", 0.75),
    ("BatchNormParameter", "moving_average_fraction", 0.999),
    ("BatchNormParameter", "eps", 1e-5),
    ("MVNParameter", "eps", 1e-9),
    ("DropoutParameter", "dropout_ratio", 0.5),
    ("EltwiseParameter", "operation", _enum("EltwiseParameter", "EltwiseOp", "SUM")),
    ("ExpParameter", "base", -1.0),
    ("FlattenParameter", "end_axis", -1),
    ("ReshapeParameter", "num_axes", -1),
    ("CropParameter", "axis", 2),
    ("ImageDataParameter", "batch_size", 1),
    ("ImageDataParameter", "is_color", True),
    ("WindowDataParameter", "crop_mode", "warp"),
    ("WindowDataParameter", "fg_fraction", 0.25),
    ("HingeLossParameter", "norm", _enum("HingeLossParameter", "Norm", "L1")),
    ("ReductionParameter", "operation", _enum("ReductionParameter", "ReductionOp", "SUM")),
    ("V0LayerParameter", "biasterm", True),
    ("V0LayerParameter", "det_crop_mode", "warp"),
    ("V0LayerParameter", "concat_dim", 1),
]


@pytest.mark.parametrize(("message", "name", "default"), DEFAULTS)
def test_default(message, name, default):
    field = _field(message, name)
    assert field.has_default_value
    if isinstance(default, float):
        assert field.default_value == pytest.approx(default, rel=1e-6)
    else:
        assert field.default_value == default


# --------------------------------------------------------------------------- labels, packing


def test_packed_fields_are_exactly_caffes():
    packed = set()
    for message in caffe_pb2.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            if is_packed(field):
                packed.add(f"{message.name}.{field.name}")
    assert packed == {
        "BlobShape.dim",
        "BlobProto.data",
        "BlobProto.diff",
        "BlobProto.double_data",
        "BlobProto.double_diff",
        "MokaLayerState.order",
    }


def test_labels():
    assert is_repeated(_field("V1LayerParameter", "blobs_lr"))
    assert is_repeated(_field("V1LayerParameter", "blob_share_mode"))
    assert is_repeated(_field("LayerParameter", "propagate_down"))
    assert not is_repeated(_field("LayerParameter", "phase"))
    assert not is_required(_field("LayerParameter", "phase"))
    assert is_required(_field("ClipParameter", "min"))
    assert is_required(_field("ClipParameter", "max"))
    assert _field("Datum", "channels").type == _field("Datum", "channels").TYPE_INT32
    assert _field("BlobShape", "dim").type == _field("BlobShape", "dim").TYPE_INT64
    assert _field("SolverParameter", "random_seed").type == _field("BlobShape", "dim").TYPE_INT64


def test_package_and_top_level_enum():
    assert caffe_pb2.DESCRIPTOR.package == "caffe"
    assert caffe_pb2.TRAIN == 0
    assert caffe_pb2.TEST == 1


# --------------------------------------------------------------------------- Moka extension


def test_moka_resume_is_skipped_by_a_caffe_only_schema():
    """A reader with only Caffe's SolverState (no field 1000) still parses our snapshots."""
    state = caffe_pb2.SolverState(iter=7, learned_net="x.caffemodel", current_step=2)
    state.history.add().data.extend([1.0, 2.0])
    state.moka_resume.solver_rng = '{"bit_generator": "PCG64"}'
    state.moka_resume.loss_window.extend([0.5, 0.25])
    layer = state.moka_resume.layer_state.add(net_index=0, layer_name="data", cursor=3)
    layer.order.extend([2, 0, 1])
    blob = state.SerializeToString()

    file_proto = descriptor_pb2.FileDescriptorProto()
    caffe_pb2.DESCRIPTOR.CopyToProto(file_proto)
    for message in file_proto.message_type:
        if message.name == "SolverState":
            kept = [f for f in message.field if f.number < 1000]
            del message.field[:]
            message.field.extend(kept)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    solver_state = pool.FindMessageTypeByName("caffe.SolverState")
    if hasattr(message_factory, "GetMessageClass"):
        caffe_only = message_factory.GetMessageClass(solver_state)
    else:  # protobuf < 4.22
        caffe_only = message_factory.MessageFactory(pool).GetPrototype(solver_state)

    plain = caffe_only.FromString(blob)
    assert plain.iter == 7
    assert plain.learned_net == "x.caffemodel"
    assert plain.current_step == 2
    assert list(plain.history[0].data) == [1.0, 2.0]

    again = caffe_pb2.SolverState.FromString(blob)
    assert list(again.moka_resume.layer_state[0].order) == [2, 0, 1]
    assert again.moka_resume.loss_window == pytest.approx([0.5, 0.25])


def test_segmentation_fork_messages():
    """The fork messages' own field numbers, as the forks define them."""
    numbers = {
        caffe_pb2.UpsampleParameter: {"scale": 1, "scale_h": 2, "scale_w": 3, "pad_out_h": 4,
                                      "pad_out_w": 5, "upsample_h": 6, "upsample_w": 7},
        caffe_pb2.BNParameter: {"scale_filler": 1, "shift_filler": 2, "bn_mode": 3, "eps": 4,
                                "frozen": 5, "engine": 6, "slope_filler": 1001,
                                "bias_filler": 1002, "momentum": 1003},
        caffe_pb2.InterpParameter: {"height": 1, "width": 2, "zoom_factor": 3,
                                    "shrink_factor": 4, "pad_beg": 5, "pad_end": 6},
        caffe_pb2.DenseImageDataParameter: {
            "source": 1, "batch_size": 2, "rand_skip": 3, "shuffle": 4, "new_height": 5,
            "new_width": 6, "is_color": 7, "mean_file": 8, "root_folder": 9, "mirror": 10,
            "crop_width": 11, "crop_height": 12, "label_divide_factor": 13},
    }
    for message, expected in numbers.items():
        got = {f.name: f.number for f in message.DESCRIPTOR.fields}
        assert got == expected, message.DESCRIPTOR.name
    assert caffe_pb2.UpsampleParameter().scale == 2
    assert caffe_pb2.BNParameter.INFERENCE == 1
    assert caffe_pb2.PoolingParameter.DESCRIPTOR.fields_by_name["ceil_mode"].number == 1013
    assert caffe_pb2.PoolingParameter().ceil_mode is True
    loss = caffe_pb2.LossParameter.DESCRIPTOR.fields_by_name
    assert loss["class_weighting"].number == 4
    assert loss["weight_by_label_freqs"].number == 1003
    dropout = caffe_pb2.DropoutParameter.DESCRIPTOR.fields_by_name
    assert dropout["sample_weights_test"].number == 2
