"""NetSpec as pycaffe code uses it: ``import engine as caffe; from engine import layers as L``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import engine as caffe
from engine import layers as L
from engine import params as P
from engine.proto import caffe_pb2

LENET = Path(__file__).resolve().parents[2] / "models" / "lenet"
XAVIER = dict(type="xavier")
CONSTANT = dict(type="constant")
LR = [dict(lr_mult=1), dict(lr_mult=2)]


def parse(path: Path) -> caffe_pb2.NetParameter:
    return text_format.Parse(path.read_text(), caffe_pb2.NetParameter())


def reparse(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """What a reader gets back from the prototxt text that pycaffe scripts write."""
    return text_format.Parse(str(net), caffe_pb2.NetParameter())


# -- models/lenet reproduced -------------------------------------------------------------------
def digits(phase: int, source: str, batch_size: int) -> caffe.NetSpec:
    n = caffe.NetSpec()
    n.data, n.label = L.Data(name="digits", include=dict(phase=phase), source=source,
                             batch_size=batch_size, backend=P.Data.LMDB, ntop=2,
                             transform_param=dict(scale=1 / 256, mirror=False))
    return n


def test_reproduces_lenet_train_test():
    n = digits(caffe.TRAIN, "models/lenet/digits_train_lmdb", 64)
    n.conv1 = L.Convolution(n.data, param=LR, num_output=20, kernel_size=3, pad=1, stride=1,
                            weight_filler=XAVIER, bias_filler=CONSTANT)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, param=LR, num_output=50, kernel_size=3, pad=1, stride=1,
                            weight_filler=XAVIER, bias_filler=CONSTANT)
    n.pool2 = L.Pooling(n.conv2, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.ip1 = L.InnerProduct(n.pool2, param=LR, num_output=500, weight_filler=XAVIER,
                           bias_filler=CONSTANT)
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, param=LR, num_output=10, weight_filler=XAVIER,
                           bias_filler=CONSTANT)
    n.accuracy = L.Accuracy(n.ip2, n.label, include=dict(phase=caffe.TEST))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    train = n.to_proto()
    # one file, both phases: the TEST data layer shares the TRAIN one's top names
    test_data = digits(caffe.TEST, "models/lenet/digits_test_lmdb", 120).to_proto().layer
    net = caffe_pb2.NetParameter(name="LeNet")
    net.layer.extend([train.layer[0], *test_data, *train.layer[1:]])

    expected = parse(LENET / "lenet_train_test.prototxt")
    assert net == expected
    assert reparse(net) == expected


def test_reproduces_lenet_deploy():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 8, 8]))
    n.conv1 = L.Convolution(n.data, num_output=20, kernel_size=3, pad=1, stride=1)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, num_output=50, kernel_size=3, pad=1, stride=1)
    n.pool2 = L.Pooling(n.conv2, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.ip1 = L.InnerProduct(n.pool2, num_output=500)
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10)
    n.prob = L.Softmax(n.ip2)
    net = n.to_proto()
    net.name = "LeNet"
    assert net == parse(LENET / "lenet.prototxt")
    assert reparse(net) == net


# -- pycaffe's own cases, in our words ---------------------------------------------------------
def dummy_lenet(named: bool):
    """Caffe's 28x28 LeNet on DummyData; named through a NetSpec, or anonymous."""
    n = caffe.NetSpec() if named else None
    data, label = L.DummyData(shape=[dict(dim=[5, 1, 28, 28]), dict(dim=[5, 1, 1, 1])],
                              transform_param=dict(scale=1 / 255), ntop=2)
    chain = [("data", data), ("label", label)]
    x = data
    for name, make in [
        ("conv1", lambda t: L.Convolution(t, kernel_size=5, num_output=20, weight_filler=XAVIER)),
        ("pool1", lambda t: L.Pooling(t, kernel_size=2, stride=2, pool=P.Pooling.MAX)),
        ("conv2", lambda t: L.Convolution(t, kernel_size=5, num_output=50, weight_filler=XAVIER)),
        ("pool2", lambda t: L.Pooling(t, kernel_size=2, stride=2, pool=P.Pooling.MAX)),
        ("ip1", lambda t: L.InnerProduct(t, num_output=500, weight_filler=XAVIER)),
        ("relu1", lambda t: L.ReLU(t, in_place=True)),
        ("ip2", lambda t: L.InnerProduct(t, num_output=10, weight_filler=XAVIER)),
    ]:
        x = make(x)
        chain.append((name, x))
    loss = L.SoftmaxWithLoss(x, label)
    if not named:
        return loss.to_proto()
    for name, top in [*chain, ("loss", loss)]:
        setattr(n, name, top)
    return n.to_proto()


def load(net_proto, tmp_path, name="net.prototxt") -> caffe.Net:
    path = tmp_path / name
    path.write_text(str(net_proto))
    return caffe.Net(str(path), caffe.TEST)


@pytest.mark.parametrize("named", [True, False])
def test_lenet_on_dummy_data_builds_with_relu_in_place(named, tmp_path):
    proto = dummy_lenet(named)
    assert proto.layer[6].type == "ReLU"
    assert proto.layer[6].bottom == proto.layer[6].top
    net = load(proto, tmp_path)
    assert len(net.layers) == 9
    if named:
        assert [layer.name for layer in proto.layer] == [
            "data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "loss"]
        assert list(proto.layer[0].top) == ["data", "label"]
    else:  # pycaffe's made-up names: <Type><count>, a layer named after its first top
        assert [layer.name for layer in proto.layer] == [
            "DummyData1", "Convolution1", "Pooling1", "Convolution2", "Pooling2",
            "InnerProduct1", "ReLU1", "InnerProduct2", "SoftmaxWithLoss1"]
        assert list(proto.layer[0].top) == ["DummyData1", "DummyData2"]
        assert list(proto.layer[6].top) == ["InnerProduct1"]
    out = net.forward()
    assert set(out) == {"loss" if named else "SoftmaxWithLoss1"}
    assert np.isfinite(next(iter(out.values())))


def test_topless_layers_make_an_output_free_net(tmp_path):
    n = caffe.NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n.silence_data2 = L.Silence(n.data2, ntop=0)
    proto = n.to_proto()
    assert isinstance(n.silence_data, caffe.net_spec.Function)
    assert [layer.name for layer in proto.layer] == ["data", "silence_data", "silence_data2"]
    assert list(proto.layer[0].dummy_data_param.shape[0].dim) == [3]
    assert list(proto.layer[1].top) == []
    assert load(proto, tmp_path).forward() == {}


def test_a_tuple_bottom_is_a_type_error():
    data = L.DummyData(ntop=2)
    message = r"^Silence input 0 is not a Top \(type is <class 'tuple'>\)$"
    with pytest.raises(TypeError, match=message):
        L.Silence(data, ntop=0)
    L.Silence(*data, ntop=0)


# -- keyword routing ---------------------------------------------------------------------------
def one_layer(top) -> caffe_pb2.LayerParameter:
    return top.to_proto().layer[-1]


def test_kwargs_go_to_the_types_param_message_else_to_the_layer():
    x = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    layer = one_layer(L.Convolution(x, name="c", num_output=4, kernel_size=[3, 5], bias_term=False,
                                    loss_weight=0.5, propagate_down=True,
                                    exclude=[dict(stage="deploy"), dict(phase=caffe.TEST)]))
    assert layer.name == "c"
    assert layer.convolution_param.num_output == 4
    assert list(layer.convolution_param.kernel_size) == [3, 5]
    assert layer.convolution_param.HasField("bias_term") and not layer.convolution_param.bias_term
    assert list(layer.loss_weight) == [0.5]       # a single value for a repeated field
    assert list(layer.propagate_down) == [True]
    assert [(r.stage, r.phase) for r in layer.exclude] == [(["deploy"], 0), ([], caffe.TEST)]
    assert layer.exclude[1].HasField("phase") and not layer.exclude[0].HasField("phase")

    loss = one_layer(L.SoftmaxWithLoss(x, x, loss_param=dict(ignore_label=255, normalize=False),
                                       loss_weight=2))
    assert loss.loss_param.ignore_label == 255 and list(loss.loss_weight) == [2.0]

    py = one_layer(L.Python(x, module="mylayers", layer="Scale", param_str="{'k': 2}"))
    assert (py.python_param.module, py.python_param.layer) == ("mylayers", "Scale")
    assert py.python_param.param_str == "{'k': 2}"

    deconv = one_layer(L.Deconvolution(x, num_output=2, kernel_size=4, stride=2))
    assert deconv.convolution_param.stride == [2]
    explicit = one_layer(L.Deconvolution(x, convolution_param=dict(num_output=2, group=2)))
    assert explicit.convolution_param.group == 2


def test_enum_fields_take_params_constants_or_names():
    x = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX
    assert P.Pooling.AVE == 1 and P.Eltwise.PROD == caffe_pb2.EltwiseParameter.PROD
    assert P.Phase.TEST == caffe.TEST and P.Data.LMDB == caffe_pb2.DataParameter.LMDB
    assert one_layer(L.Pooling(x, pool=P.Pooling.AVE)).pooling_param.pool == P.Pooling.AVE
    assert one_layer(L.Pooling(x, pool="STOCHASTIC")).pooling_param.pool == P.Pooling.STOCHASTIC
    with pytest.raises(caffe.MokaError, match="'MEAN' is not one of MAX, AVE, STOCHASTIC"):
        L.Pooling(x, pool="MEAN").to_proto()
    with pytest.raises(AttributeError, match=r"no PollingParameter.*did you mean Pooling"):
        _ = P.Polling


def test_unknown_kwargs_name_the_layer_and_suggest():
    x = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    with pytest.raises(AttributeError, match=r"Convolution layer 'Convolution1'.*'kernal_size'"
                                             r".*did you mean kernel_size"):
        L.Convolution(x, kernal_size=3).to_proto()
    with pytest.raises(caffe.MokaError, match=r"Silence layer 'Silence1'.*no field 'axis'"):
        caffe.to_proto(L.Silence(x, axis=1, ntop=0))
    with pytest.raises(caffe.MokaError, match=r"weight_filler.*no field 'kind'.*"):
        L.InnerProduct(x, num_output=2, weight_filler=dict(kind="xavier")).to_proto()


def test_shared_bottoms_and_multiple_outputs():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6]))
    n.a, n.b, n.c = L.Slice(n.data, slice_point=[2, 4], ntop=3)
    n.sum = L.Eltwise(n.a, n.b, n.c, operation=P.Eltwise.SUM, coeff=[1, 2, 3])
    n.cat = L.Concat(n.sum, n.a, axis=1)
    proto = n.to_proto()
    assert [layer.name for layer in proto.layer] == ["data", "a", "sum", "cat"]
    assert list(proto.layer[1].top) == ["a", "b", "c"]
    assert list(proto.layer[2].bottom) == ["a", "b", "c"]
    assert list(proto.layer[3].bottom) == ["sum", "a"]
    assert list(proto.layer[1].slice_param.slice_point) == [2, 4]
    assert list(proto.layer[2].eltwise_param.coeff) == [1.0, 2.0, 3.0]
    assert n.keys() == ["data", "a", "b", "c", "sum", "cat"] and "sum" in n
    assert n["cat"] is n.cat
    with pytest.raises(AttributeError, match="no top named 'nope'"):
        _ = n.nope


def test_output_reads_back_through_the_schema_and_builds(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 6, 6]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1,
                           weight_filler=dict(type="gaussian", std=0.1), param=LR)
    n.bn = L.BatchNorm(n.conv, use_global_stats=True, in_place=True)
    n.scale = L.Scale(n.bn, bias_term=True, in_place=True)
    n.pool = L.Pooling(n.scale, pool=P.Pooling.AVE, global_pooling=True)
    n.flat = L.Flatten(n.pool)
    proto = n.to_proto()
    assert reparse(proto) == proto
    assert proto.layer[2].batch_norm_param.use_global_stats
    assert list(proto.layer[2].top) == ["conv"] and list(proto.layer[3].top) == ["conv"]
    net = load(proto, tmp_path)
    assert net.forward()["flat"].shape == (2, 4)


def test_engine_layers_is_both_the_factory_and_the_implementations():
    import engine.layers
    from engine.layers import convolution

    assert caffe.layers is engine.layers is L
    assert convolution.__name__ == "engine.layers.convolution"
    assert callable(L.Convolution) and L.Convolution.__name__ == "Convolution"
    # a CamelCase name bound in the package would shadow a factory
    assert [name for name in vars(engine.layers) if name[:1].isupper()] == []
    with pytest.raises(AttributeError):
        _ = L.not_a_module


def test_pycaffe_names_on_the_package():
    import engine.proto.caffe_pb2 as pb

    assert pb is caffe_pb2 is caffe.proto.caffe_pb2
    assert caffe.NetSpec is caffe.net_spec.NetSpec
    assert caffe.to_proto is caffe.net_spec.to_proto
    assert caffe.params is P
    assert isinstance(caffe.__version__, str) and caffe.__version__[0].isdigit()
    assert caffe.net_spec.param_name_dict()["Convolution"] == "convolution"
    assert caffe.net_spec.param_name_dict()["HDF5Data"] == "hdf5_data"
