"""Reading and writing Caffe's files (engine/io.py): errors, upgrades on read, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from google.protobuf import text_format

from engine import caffe_pb2
from engine import io as mio
from engine.blob import blob_proto_array, blob_proto_shape, legacy_shape_matches
from engine.errors import MokaError, ParseError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def model(seed: int = 0) -> caffe_pb2.NetParameter:
    """A small current-format net with weights, as a .caffemodel holds it."""
    rng = np.random.default_rng(seed)
    net = caffe_pb2.NetParameter(name="tiny")
    conv = net.layer.add(name="conv", type="Convolution", bottom=["data"], top=["conv"])
    for shape in [(4, 3, 3, 3), (4,)]:
        blob = conv.blobs.add()
        blob.shape.dim.extend(shape)
        blob.data.extend(rng.standard_normal(int(np.prod(shape))).astype(np.float32).tolist())
    net.layer.add(name="relu", type="ReLU", bottom=["conv"], top=["conv"])
    return net


# -- text errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "where", "what"), [
    ('name: "n"\nlayer {\n    nme: "conv1"\n}\n', "3:5", "did you mean 'name'?"),
    ('layer {\n  name: "c"\n  convolution_param { kernel_siz: 3 }\n}\n', "3:23",
     "did you mean 'kernel_size'"),
    ('layer {\n  name: "p"\n  pooling_param { pool: MAXX }\n}\n', "3:25",
     "did you mean MAX?"),
    ('layer {\n  name: "c"\n  kernel_size: 3\n}\n', "3:3",
     "belongs inside a block such as convolution_param"),
    ('layer {\n  name: "c"\n  blobs_lr: 1\n}\n', "3:3", "param { lr_mult: ... }"),
    ('layers {\n  name: "c"\n  type: "Convolution"\n}\n', "3:9", "did you mean CONVOLUTION"),
    ('layer {\n  name: "c"\n  top: "x"\n', "1:7", "'layer {' opened on line 1 is never closed"),
    ('layer {\n  name: c\n}\n', "2:9", "Expected string but found: 'c'; strings take quotes"),
    ('layer {\n  type: CONVOLUTION\n}\n', "2:9", 'quoted strings: type: "Convolution"'),
    ('input_dim: 1.5\n', "1:12", "Couldn't parse integer"),
])
def test_text_errors_name_file_line_and_column(tmp_path: Path, text: str, where: str,
                                               what: str) -> None:
    path = write(tmp_path / "net.prototxt", text)
    with pytest.raises(ParseError) as info:
        mio.read_net_param(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{where}: "), message
    assert what in message
    assert "\n" not in message


def test_unknown_field_without_close_match_has_no_hint() -> None:
    with pytest.raises(ParseError) as info:
        mio.parse_text("zzzzqqq: 1", caffe_pb2.NetParameter)
    assert str(info.value) == ('<string>:1:1: Message type "caffe.NetParameter" has no field '
                               'named "zzzzqqq"')


def test_enum_error_lists_the_valid_values() -> None:
    with pytest.raises(ParseError, match=r"did you mean AVE\?.*valid: MAX, AVE, STOCHASTIC"):
        mio.parse_text("pool: ave", caffe_pb2.PoolingParameter, "p.prototxt")


@pytest.mark.parametrize(("make", "match"), [
    (lambda d: d / "missing.prototxt", "missing.prototxt: no such file"),
    (lambda d: d, "is a directory"),
    (lambda d: d / "model.caffemodel", "binary file, not a text prototxt"),
])
def test_unreadable_text_files(tmp_path: Path, make, match: str) -> None:
    mio.write_binary(model(), tmp_path / "model.caffemodel")
    with pytest.raises(ParseError, match=match):
        mio.read_net_param(make(tmp_path))


def test_read_text_keeps_latin1_comments(tmp_path: Path) -> None:
    path = tmp_path / "n.prototxt"
    path.write_bytes(b'# caf\xe9\nname: "n"\n')
    assert mio.read_text(path, caffe_pb2.NetParameter()).name == "n"


# -- read_net_param ------------------------------------------------------------------------------
V1_TEXT = 'name: "v1" layers { name: "r" type: RELU bottom: "x" top: "x" }'


def test_read_net_param_accepts_paths_text_and_messages(tmp_path: Path) -> None:
    path = write(tmp_path / "v1.prototxt", V1_TEXT)
    by_str, by_path = mio.read_net_param(str(path)), mio.read_net_param(path)
    by_text = mio.read_net_param(V1_TEXT)
    assert by_str == by_path == by_text
    assert by_text.layer[0].type == "ReLU" and not len(by_text.layers)
    assert mio.read_net_param("name: 'x'", is_text=True).name == "x"


def test_read_net_param_message_is_not_mutated() -> None:
    legacy = text_format.Parse(V1_TEXT, caffe_pb2.NetParameter())
    out = mio.read_net_param(legacy)
    assert out is not legacy and len(legacy.layers) == 1 and out.layer[0].type == "ReLU"
    current = model()
    assert mio.read_net_param(current) is current


def test_read_net_param_rejects_other_messages() -> None:
    with pytest.raises(MokaError, match="expected a NetParameter"):
        mio.read_net_param(caffe_pb2.SolverParameter())


def test_missing_path_is_not_mistaken_for_text() -> None:
    with pytest.raises(ParseError, match=r"nowhere/net\.prototxt: no such file"):
        mio.read_net_param("nowhere/net.prototxt")


# -- caffemodels -------------------------------------------------------------------------------
def test_caffemodel_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.caffemodel"
    mio.write_binary(model(), path)
    assert mio.read_net_binary(path) == model()


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_caffemodel(tmp_path: Path, keep: float) -> None:
    data = model().SerializeToString()
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ParseError, match="truncated") as info:
        mio.read_net_binary(path)
    assert str(path) in str(info.value)


def test_blob_shorter_than_its_shape_is_reported(tmp_path: Path) -> None:
    net = model()
    del net.layer[0].blobs[0].data[-5:]
    mio.write_binary(net, tmp_path / "bad.caffemodel")
    with pytest.raises(ParseError, match=r"layer 'conv' blob 0 declares shape \(4, 3, 3, 3\) "
                                         r"\(108 values\) but holds 103"):
        mio.read_net_binary(tmp_path / "bad.caffemodel")


def test_other_binary_files_are_not_nets(tmp_path: Path) -> None:
    mean = caffe_pb2.BlobProto(num=1, channels=3, height=2, width=2, data=[0.5] * 12)
    mio.write_blob_proto(mean, tmp_path / "mean.binaryproto")
    with pytest.raises(ParseError, match="not a NetParameter"):
        mio.read_net_binary(tmp_path / "mean.binaryproto")
    with pytest.raises(ParseError, match="no such file"):
        mio.read_net_binary(tmp_path / "missing.caffemodel")


def test_v1_caffemodel_with_legacy_blobs_is_upgraded(tmp_path: Path) -> None:
    legacy = text_format.Parse("""
        name: "old"
        input: "data"
        layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip" blobs_lr: 1 blobs_lr: 2
                 blobs { num: 1 channels: 1 height: 2 width: 3 data: [1, 2, 3, 4, 5, 6] }
                 blobs { num: 1 channels: 1 height: 1 width: 2 data: [7, 8] } }""",
                               caffe_pb2.NetParameter())
    mio.write_binary(legacy, tmp_path / "old.caffemodel")
    net = mio.read_net_binary(tmp_path / "old.caffemodel")
    assert not len(net.layers) and not len(net.input)
    (ip,) = net.layer
    assert ip.type == "InnerProduct" and [p.lr_mult for p in ip.param] == [1, 2]
    weight, bias = ip.blobs
    assert blob_proto_shape(weight) == (1, 1, 2, 3) and legacy_shape_matches(weight, (2, 3))
    assert legacy_shape_matches(bias, (2,))
    np.testing.assert_array_equal(blob_proto_array(weight, (2, 3)), [[1, 2, 3], [4, 5, 6]])


def test_v0_caffemodel_blobs_are_kept(tmp_path: Path) -> None:
    legacy = text_format.Parse("""
        layers { layer { name: "conv1" type: "conv" num_output: 1 kernelsize: 1
                         blobs { num: 1 channels: 1 height: 1 width: 1 data: 3 } }
                 bottom: "data" top: "conv1" }""", caffe_pb2.NetParameter())
    legacy.input.append("data")
    mio.write_binary(legacy, tmp_path / "v0.caffemodel")
    (conv,) = mio.read_net_binary(tmp_path / "v0.caffemodel").layer
    assert conv.type == "Convolution" and list(conv.blobs[0].data) == [3]


# -- HDF5 models -------------------------------------------------------------------------------
def test_hdf5_model_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.caffemodel.h5"
    mio.write_net_hdf5(model(), path)
    assert path.read_bytes().startswith(mio.HDF5_SIGNATURE)
    net = mio.read_net_binary(path)
    by_name = {layer.name: layer for layer in net.layer}
    assert set(by_name) == {"conv", "relu"} and not len(by_name["relu"].blobs)
    for got, want in zip(by_name["conv"].blobs, model().layer[0].blobs, strict=True):
        assert list(got.shape.dim) == list(want.shape.dim)
        np.testing.assert_array_equal(got.data, want.data)


def test_hdf5_model_written_by_caffe_layout(tmp_path: Path) -> None:
    path = tmp_path / "caffe.h5"  # the extension does not matter; the signature does
    with h5py.File(path, "w") as f:
        f.create_dataset("data/fc/0", data=np.arange(6, dtype=np.float32).reshape(2, 3))
        f.create_dataset("data/fc/1", data=np.ones(2, np.float64))
        f.create_dataset("data/shared/1", data=np.zeros(2, np.float32))  # 0 owned elsewhere
    net = mio.read_net_binary(path)
    fc, shared = net.layer
    assert list(fc.blobs[0].shape.dim) == [2, 3] and list(fc.blobs[0].data) == [0, 1, 2, 3, 4, 5]
    assert list(fc.blobs[1].double_data) == [1, 1]
    assert len(shared.blobs) == 2 and not len(shared.blobs[0].data)


def test_hdf5_without_data_group(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("iter", data=3)
    with pytest.raises(ParseError, match="no /data group"):
        mio.read_net_binary(tmp_path / "x.h5")


# -- solvers -----------------------------------------------------------------------------------
def test_read_solver_param_upgrades(tmp_path: Path) -> None:
    path = write(tmp_path / "lenet_solver.prototxt", 'solver_type: NESTEROV\nbase_lr: 0.01\n')
    solver = mio.read_solver_param(path)
    assert solver.type == "Nesterov" and not solver.HasField("solver_type")
    assert solver.snapshot_prefix == str(tmp_path / "lenet_solver")
    again = mio.read_solver_param(solver)
    assert again == solver and again is not solver


def test_read_solver_param_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "s.prototxt", 'solver_type: ADAM\ntype: "Adam"\n')
    with pytest.raises(ParseError, match="both 'solver_type'"):
        mio.read_solver_param(path)
    path = write(tmp_path / "s.prototxt", 'base_lr: 0.1\nlr_polcy: "fixed"\n')
    with pytest.raises(ParseError, match=r"s\.prototxt:2:1: .*did you mean 'lr_policy'"):
        mio.read_solver_param(path)


# -- binaryproto -------------------------------------------------------------------------------
@pytest.mark.parametrize("blob", [
    caffe_pb2.BlobProto(num=1, channels=3, height=2, width=2, data=np.arange(12.0).tolist()),
    caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2, 2]), double_data=[0.5, 1, 2, 3]),
])
def test_binaryproto_round_trip(tmp_path: Path, blob: caffe_pb2.BlobProto) -> None:
    path = tmp_path / "mean.binaryproto"
    mio.write_blob_proto(blob, path)
    assert mio.read_blob_proto(path) == blob


def test_binaryproto_errors(tmp_path: Path) -> None:
    path = tmp_path / "mean.binaryproto"
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=4, width=4, data=[1.0] * 48)
    path.write_bytes(blob.SerializeToString()[:100])
    with pytest.raises(ParseError, match="truncated"):
        mio.read_blob_proto(path)
    mio.write_blob_proto(caffe_pb2.BlobProto(num=1, channels=3, height=4, width=4,
                                             data=[1.0] * 47), path)
    with pytest.raises(ParseError, match=r"shape \(1, 3, 4, 4\) \(48 values\) but holds 47"):
        mio.read_blob_proto(path)
    mio.write_blob_proto(caffe_pb2.BlobProto(), path)
    with pytest.raises(ParseError, match="holds no blob values"):
        mio.read_blob_proto(path)
    with pytest.raises(ParseError, match="no such file"):
        mio.read_blob_proto(tmp_path / "none.binaryproto")


@pytest.mark.parametrize(("dtype", "field"), [(np.float32, "data"), (np.float64, "double_data"),
                                              (np.int32, "data")])
@pytest.mark.parametrize("diff", [False, True])
def test_fill_blob_proto_matches_extend(dtype, field: str, diff: bool) -> None:
    array = (np.arange(300).reshape(3, 100) - 7.25).astype(dtype)
    fast = caffe_pb2.BlobProto(data=[1.5]) if field == "data" else caffe_pb2.BlobProto()
    mio.fill_blob_proto(fast, array, diff=diff)
    slow = caffe_pb2.BlobProto(data=[1.5]) if field == "data" else caffe_pb2.BlobProto()
    name = field.replace("data", "diff") if diff else field
    getattr(slow, name).extend(array.ravel().tolist())
    assert fast == slow
    mio.fill_blob_proto(fast, np.zeros(0, dtype), diff=diff)
    assert fast == slow


# -- atomic writes -----------------------------------------------------------------------------
def test_write_text_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "net.prototxt"
    mio.write_text(model(), path)
    assert mio.read_net_param(path) == model()
    assert path.read_text().startswith('name: "tiny"\nlayer {\n  name: "conv"')


def _no_temp_files(directory: Path) -> bool:
    return sorted(p.name for p in directory.iterdir()) == ["net.caffemodel"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch, failing: str) -> None:
    path = tmp_path / "net.caffemodel"
    mio.write_binary(model(0), path)
    old = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(MokaError, match=r"cannot write .*net\.caffemodel: No space left"):
        mio.write_binary(model(1), path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert _no_temp_files(tmp_path)


def test_failed_serialisation_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "net.caffemodel"
    mio.write_binary(model(0), path)
    old = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"), mio._atomic_target(path) as tmp:
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("boom")
    assert path.read_bytes() == old
    assert _no_temp_files(tmp_path)


def test_write_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(MokaError, match=r"cannot write .*nowhere/net\.prototxt"):
        mio.write_text(model(), tmp_path / "nowhere" / "net.prototxt")


def test_written_files_get_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "net.caffemodel"
    mio.write_binary(model(), path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
