"""Legacy upgrades (engine/upgrade.py) on small hand-written nets and solvers."""

from __future__ import annotations

import logging

import pytest
from google.protobuf import text_format

from engine import caffe_pb2
from engine.errors import ParseError
from engine.upgrade import (
    SOLVER_TYPES,
    V0_LAYER_TYPES,
    V1_LAYER_TYPES,
    net_needs_upgrade,
    solver_needs_upgrade,
    upgrade_net,
    upgrade_snapshot_prefix,
    upgrade_solver,
)


def net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def layer(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def upgraded(text: str) -> caffe_pb2.NetParameter:
    return upgrade_net(net(text), "test.prototxt")


def assert_current(param: caffe_pb2.NetParameter) -> None:
    assert not len(param.layers)
    assert not len(param.input) and not len(param.input_dim) and not len(param.input_shape)
    assert all(layer.type for layer in param.layer)


# -- V0 ----------------------------------------------------------------------------------------
V0_PADDED = """
name: "v0"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers {
  layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2 group: 1
          biasterm: false blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
          weight_filler { type: "gaussian" std: 0.01 } }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "pad2" type: "padding" pad: 1 } bottom: "conv1" top: "pad2" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 }
         bottom: "pad2" top: "pool1" }
"""


def test_v0_padding_layers_fold_into_conv_and_pool() -> None:
    param = upgraded(V0_PADDED)
    assert_current(param)
    assert [(lay.name, lay.type) for lay in param.layer] == [
        ("input", "Input"), ("conv1", "Convolution"), ("pool1", "Pooling")]
    conv, pool = param.layer[1], param.layer[2]
    assert list(conv.bottom) == ["data"] and list(pool.bottom) == ["conv1"]
    assert list(conv.convolution_param.pad) == [2]
    assert pool.pooling_param.pad == 1
    assert pool.pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    expected = text_format.Parse(
        'num_output: 4 kernel_size: 3 stride: 2 group: 1 bias_term: false pad: 2 '
        'weight_filler { type: "gaussian" std: 0.01 }', caffe_pb2.ConvolutionParameter())
    assert conv.convolution_param == expected
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert list(param.layer[0].input_param.shape[0].dim) == [1, 3, 8, 8]


V0_FIELD_CASES = [
    ('type: "innerproduct" num_output: 10 biasterm: false bias_filler { value: 1 }',
     'type: "InnerProduct" inner_product_param { num_output: 10 bias_term: false '
     'bias_filler { value: 1 } }'),
    ('type: "pool" pool: STOCHASTIC kernelsize: 2 stride: 2 pad: 1',
     'type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 pad: 1 }'),
    ('type: "lrn" local_size: 3 alpha: 0.5 beta: 0.25 k: 2',
     'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.25 k: 2 }'),
    ('type: "dropout" dropout_ratio: 0.3', 'type: "Dropout" dropout_param { dropout_ratio: 0.3 }'),
    ('type: "data" source: "db" batchsize: 64 rand_skip: 5 meanfile: "m.binaryproto" '
     'cropsize: 227 mirror: true scale: 0.5',
     'type: "Data" data_param { source: "db" batch_size: 64 rand_skip: 5 } transform_param { '
     'mean_file: "m.binaryproto" crop_size: 227 mirror: true scale: 0.5 }'),
    ('type: "images" source: "list.txt" batchsize: 2 shuffle_images: true new_height: 32 '
     'new_width: 48 rand_skip: 1',
     'type: "ImageData" image_data_param { source: "list.txt" batch_size: 2 shuffle: true '
     'new_height: 32 new_width: 48 rand_skip: 1 }'),
    ('type: "window_data" source: "w.txt" batchsize: 8 det_fg_threshold: 0.6 '
     'det_bg_threshold: 0.4 det_fg_fraction: 0.5 det_context_pad: 16 det_crop_mode: "square"',
     'type: "WindowData" window_data_param { source: "w.txt" batch_size: 8 fg_threshold: 0.6 '
     'bg_threshold: 0.4 fg_fraction: 0.5 context_pad: 16 crop_mode: "square" }'),
    ('type: "hdf5_data" source: "h5.txt" batchsize: 4',
     'type: "HDF5Data" hdf5_data_param { source: "h5.txt" batch_size: 4 }'),
    ('type: "hdf5_output" hdf5_output_param { file_name: "out.h5" }',
     'type: "HDF5Output" hdf5_output_param { file_name: "out.h5" }'),
    ('type: "infogain_loss" source: "H.binaryproto"',
     'type: "InfogainLoss" infogain_loss_param { source: "H.binaryproto" }'),
    ('type: "concat" concat_dim: 0', 'type: "Concat" concat_param { concat_dim: 0 }'),
    ('type: "softmax_loss"', 'type: "SoftmaxWithLoss"'),
]


@pytest.mark.parametrize(("v0", "v2"), V0_FIELD_CASES)
def test_v0_fields_move_to_their_param_messages(v0: str, v2: str) -> None:
    param = upgraded(f'layers {{ layer {{ name: "l" {v0} }} top: "t" }}')
    assert_current(param)
    assert param.layer[0] == layer(f'name: "l" top: "t" {v2}')


def test_v0_blobs_and_net_fields_carry_over() -> None:
    param = upgraded("""
        name: "n" force_backward: true
        layers { layer { name: "ip" type: "innerproduct" num_output: 2
                         blobs { num: 1 channels: 1 height: 2 width: 3 data: [1, 2, 3, 4, 5, 6] }
                         blobs { num: 1 channels: 1 height: 1 width: 2 data: [7, 8] } }
                 top: "ip" }""")
    assert param.name == "n" and param.force_backward
    blobs = param.layer[0].blobs
    assert [(b.height, b.width, list(b.data)) for b in blobs] == [
        (2, 3, [1, 2, 3, 4, 5, 6]), (1, 2, [7, 8])]


def test_v0_field_of_another_type_is_ignored_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, "engine.upgrade"):
        param = upgraded('layers { layer { name: "r" type: "relu" num_output: 3 } top: "r" }')
    assert param.layer[0] == layer('name: "r" type: "ReLU" top: "r"')
    assert "'num_output' does not apply to type 'relu'" in caplog.text


@pytest.mark.parametrize(("text", "match"), [
    ('layers { layer { name: "x" type: "convolution" } top: "x" }', "unknown type 'convolution'"),
    ('layers { layer { name: "x" type: "relu" } bottom: "nowhere" top: "x" }',
     "reads blob 'nowhere'"),
    ('input: "d" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "d" top: "p" } '
     'layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }',
     "only conv and pool layers"),
])
def test_v0_fatal_problems_raise(text: str, match: str) -> None:
    with pytest.raises(ParseError, match=match) as info:
        upgraded(text)
    assert str(info.value).startswith("test.prototxt: ")


def test_every_v0_type_maps_to_a_v1_enum() -> None:
    names = set(caffe_pb2.V1LayerParameter.LayerType.keys())
    assert set(V0_LAYER_TYPES.values()) <= names


# -- data transformation -------------------------------------------------------------------------
@pytest.mark.parametrize(("v1_type", "field"), [
    ("DATA", "data_param"), ("IMAGE_DATA", "image_data_param"),
    ("WINDOW_DATA", "window_data_param")])
def test_v1_data_layer_transform_fields_move(v1_type: str, field: str) -> None:
    param = upgraded(f'layers {{ name: "d" type: {v1_type} top: "d" {field} {{ source: "s" '
                     'scale: 0.25 mean_file: "m" crop_size: 7 mirror: true } }')
    out = param.layer[0]
    assert out.transform_param == text_format.Parse(
        'scale: 0.25 mean_file: "m" crop_size: 7 mirror: true',
        caffe_pb2.TransformationParameter())
    assert getattr(out, field) == text_format.Parse('source: "s"', type(getattr(out, field))())


def test_current_format_data_param_is_left_alone() -> None:
    # Caffe only rewrites V1 layers; a current-format net is returned untouched.
    param = net('layer { name: "d" type: "Data" top: "d" data_param { scale: 0.5 } }')
    assert not net_needs_upgrade(param)
    assert upgrade_net(param).layer[0].data_param.scale == 0.5


# -- V1 → V2 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("enum_name", caffe_pb2.V1LayerParameter.LayerType.keys())
def test_every_v1_enum_type_upgrades(enum_name: str) -> None:
    param = upgraded(f'layers {{ name: "l" type: {enum_name} }}')
    assert param.layer[0].type == V1_LAYER_TYPES[enum_name]
    assert enum_name == "NONE" or param.layer[0].type


@pytest.mark.parametrize(("enum_name", "type_name"), [
    ("CONVOLUTION", "Convolution"), ("INNER_PRODUCT", "InnerProduct"),
    ("SOFTMAX_LOSS", "SoftmaxWithLoss"), ("HDF5_DATA", "HDF5Data"), ("TANH", "TanH"),
    ("ABSVAL", "AbsVal"), ("SIGMOID_CROSS_ENTROPY_LOSS", "SigmoidCrossEntropyLoss"),
    ("IM2COL", "Im2col"), ("DECONVOLUTION", "Deconvolution")])
def test_v1_type_names(enum_name: str, type_name: str) -> None:
    assert V1_LAYER_TYPES[enum_name] == type_name


def test_v1_layer_fields_become_param_specs_and_copies() -> None:
    param = upgraded("""
        layers {
          name: "conv" type: CONVOLUTION bottom: "a" top: "b" top: "c"
          blobs_lr: 1 blobs_lr: 2 weight_decay: 1
          param: "w_shared" param: "b_shared" blob_share_mode: PERMISSIVE
          loss_weight: 0.5 loss_weight: 0
          include { phase: TRAIN } exclude { stage: "deploy" }
          convolution_param { num_output: 3 kernel_size: 1 }
          transform_param { scale: 2 } loss_param { ignore_label: 4 }
          blobs { shape { dim: 1 } data: 9 }
        }""")
    expected = layer("""
        name: "conv" type: "Convolution" bottom: "a" top: "b" top: "c"
        param { name: "w_shared" share_mode: PERMISSIVE lr_mult: 1 decay_mult: 1 }
        param { name: "b_shared" lr_mult: 2 }
        loss_weight: 0.5 loss_weight: 0
        include { phase: TRAIN } exclude { stage: "deploy" }
        convolution_param { num_output: 3 kernel_size: 1 }
        transform_param { scale: 2 } loss_param { ignore_label: 4 }
        blobs { shape { dim: 1 } data: 9 }""")
    assert param.layer[0] == expected
    assert not param.layer[0].param[1].HasField("decay_mult")  # stays at its default of 1


def test_v1_every_param_message_is_copied() -> None:
    v1_fields = caffe_pb2.V1LayerParameter.DESCRIPTOR.fields_by_name
    params = [name for name in v1_fields if name.endswith("_param")]
    text = " ".join(f"{name} {{ }}" for name in params)
    out = upgraded(f'layers {{ name: "x" type: RELU {text} }}').layer[0]
    assert all(out.HasField(name) for name in params)


def test_layer_and_layers_together_is_an_error() -> None:
    with pytest.raises(ParseError, match=r"both 'layer'.*and 'layers'"):
        upgraded('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }')


def test_v1_upgrade_is_logged_with_the_file(caplog) -> None:
    with caplog.at_level(logging.INFO, "engine.upgrade"):
        upgraded('layers { name: "a" type: RELU }')
    assert ("Attempting to upgrade input file specified using deprecated V1LayerParameter: "
            "test.prototxt") in caplog.text


# -- inputs --------------------------------------------------------------------------------------
def test_input_dims_become_an_input_layer_placed_first() -> None:
    param = upgraded("""
        input: "data" input_dim: 2 input_dim: 3 input_dim: 4 input_dim: 5
        input: "label" input_dim: 2 input_dim: 1 input_dim: 1 input_dim: 1
        layer { name: "r" type: "ReLU" bottom: "data" top: "r" }""")
    assert_current(param)
    assert param.layer[0] == layer("""
        name: "input" type: "Input" top: "data" top: "label"
        input_param { shape { dim: [2, 3, 4, 5] } shape { dim: [2, 1, 1, 1] } }""")
    assert param.layer[1].name == "r"


def test_input_shape_becomes_an_input_layer() -> None:
    param = upgraded('input: "x" input_shape { dim: [4, 10] } '
                     'layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y" }')
    assert [lay.type for lay in param.layer] == ["Input", "InnerProduct"]
    assert list(param.layer[0].input_param.shape[0].dim) == [4, 10]


def test_input_without_dims_is_dropped() -> None:
    # Old .caffemodel files name their inputs without shapes; Caffe just strips them.
    param = upgraded('input: "data" layer { name: "r" type: "ReLU" bottom: "data" top: "r" }')
    assert_current(param)
    assert [lay.name for lay in param.layer] == ["r"]


@pytest.mark.parametrize(("text", "match"), [
    ('input: "a" input_dim: 1 input_dim: 2', "4 input_dim values"),
    ('input: "a" input: "b" input_shape { dim: 1 }', "one input_shape per input")])
def test_input_count_mismatch(text: str, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        upgraded(text)


# -- BatchNorm -----------------------------------------------------------------------------------
def test_batch_norm_with_three_params_is_frozen() -> None:
    param = upgraded("""
        layer { name: "bn" type: "BatchNorm" param { name: "m" lr_mult: 1 } param { lr_mult: 1 }
                param { lr_mult: 1 decay_mult: 1 } }
        layer { name: "bn2" type: "BatchNorm" param { lr_mult: 1 } }""")
    assert [(p.name, p.lr_mult, p.decay_mult) for p in param.layer[0].param] == [
        ("m", 0, 0), ("", 0, 0), ("", 0, 0)]
    assert param.layer[1].param[0].lr_mult == 1


@pytest.mark.parametrize(("text", "needs"), [
    ('layer { name: "a" type: "ReLU" }', False),
    ('layer { name: "a" type: "BatchNorm" }', False),
    ('layer { name: "a" type: "BatchNorm" param {} param {} param {} }', True),
    ('layers { name: "a" type: RELU }', True),
    ('layers { layer { name: "a" type: "relu" } }', True),
    ('input: "x" input_dim: [1, 1, 1, 1]', True),
    ('input: "x"', True),
])
def test_net_needs_upgrade(text: str, needs: bool) -> None:
    param = net(text)
    assert net_needs_upgrade(param) is needs
    assert not net_needs_upgrade(upgrade_net(param))


def test_current_net_is_unchanged() -> None:
    text = ('name: "n" layer { name: "c" type: "Convolution" top: "c" '
            'param { lr_mult: 3 } convolution_param { num_output: 1 kernel_size: 1 } }')
    assert upgrade_net(net(text)) == net(text)


# -- solvers -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("enum_name", "type_name"), sorted(SOLVER_TYPES.items()))
def test_solver_type_enum_becomes_type_string(enum_name: str, type_name: str) -> None:
    solver = text_format.Parse(f"solver_type: {enum_name}", caffe_pb2.SolverParameter())
    assert solver_needs_upgrade(solver)
    upgrade_solver(solver, "s.prototxt")
    assert solver.type == type_name and not solver.HasField("solver_type")


def test_every_solver_enum_is_mapped() -> None:
    assert set(SOLVER_TYPES) == set(caffe_pb2.SolverParameter.SolverType.keys())


def test_solver_type_and_type_together_is_an_error() -> None:
    solver = text_format.Parse('solver_type: ADAM type: "Adam"', caffe_pb2.SolverParameter())
    with pytest.raises(ParseError, match=r"s\.prototxt: both 'solver_type'"):
        upgrade_solver(solver, "s.prototxt")


def test_solver_inline_nets_are_upgraded() -> None:
    solver = text_format.Parse(
        'net_param { layers { name: "a" type: RELU } } '
        'test_net_param { input: "x" input_dim: [1, 1, 1, 1] }', caffe_pb2.SolverParameter())
    assert solver_needs_upgrade(solver)
    upgrade_solver(solver)
    assert solver.net_param.layer[0].type == "ReLU"
    assert solver.test_net_param[0].layer[0].type == "Input"
    assert not solver_needs_upgrade(solver)


def test_snapshot_prefix_defaults(tmp_path) -> None:
    solver = caffe_pb2.SolverParameter()
    upgrade_snapshot_prefix(solver, "models/lenet/solver.prototxt")
    assert solver.snapshot_prefix == "models/lenet/solver"
    solver.snapshot_prefix = str(tmp_path)
    upgrade_snapshot_prefix(solver, "models/lenet/solver.prototxt")
    assert solver.snapshot_prefix == str(tmp_path / "solver")
    upgrade_snapshot_prefix(solver, "other.prototxt")  # a plain prefix is kept
    assert solver.snapshot_prefix == str(tmp_path / "solver")
