"""Hostile input: absurd shapes refused before allocation, unbalanced braces, unknown fillers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import engine
from engine import caffe_pb2
from engine.blob import Blob, MemoryBudget, format_bytes, memory_budget
from engine.cli import main
from engine.errors import LayerError, ParseError, ResourceError
from engine.io import parse_text, read_net_param
from engine.net import memory_limit, parse_memory_limit

REPO = Path(__file__).resolve().parent.parent
LENET = (REPO / "models/lenet/lenet.prototxt").read_text()


def write_net(tmp_path: Path, text: str, name: str = "net.prototxt") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if a blob buffer bigger than 1 GiB is ever requested."""
    real = np.zeros

    def guarded(shape, *args, **kwargs):
        count = int(np.prod(shape, dtype=object)) if np.ndim(shape) else int(shape)
        assert count < (1 << 28), f"allocated {shape} before refusing"
        return real(shape, *args, **kwargs)

    monkeypatch.setattr("engine.blob.np.zeros", guarded)


@pytest.mark.parametrize(("old", "new", "layer", "shape"), [
    ("dim: 1 dim: 1 dim: 8 dim: 8", "dim: 1 dim: 1 dim: 1000000000000 dim: 8", "data",
     "(1, 1, 1000000000000, 8)"),
    ("num_output: 500", "num_output: 1000000000", "ip1", "(1000000000, 200)"),
    ("num_output: 20", "num_output: 1000000000", "conv1", "(1000000000, 1, 3, 3)"),
])
def test_absurd_shapes_are_refused_before_allocation(tmp_path, no_allocation, old, new, layer,
                                                     shape):
    path = write_net(tmp_path, LENET.replace(old, new, 1))
    with memory_limit(1 << 30), pytest.raises(LayerError) as info:
        engine.Net(path, engine.TEST)
    message = str(info.value)
    assert info.value.layer_name == layer
    assert message.startswith(f"{path}:")  # the file, then the line where the layer begins
    assert f"layer '{layer}'" in message and shape in message
    assert "memory limit of 1.0 GiB" in message and "needs" in message


def test_the_default_limit_is_the_available_memory(tmp_path, no_allocation):
    path = write_net(tmp_path, LENET.replace("num_output: 500", "num_output: 4000000000"))
    with pytest.raises(LayerError, match=r"layer 'ip1'.*\(4000000000, 200\).*memory limit"):
        engine.Net(path, engine.TEST)


def test_a_limit_given_to_the_net_wins_and_a_fitting_net_builds(tmp_path):
    path = write_net(tmp_path, LENET)
    with pytest.raises(LayerError, match=r"layer 'ip1'.*memory limit of 100.0 KiB"):
        engine.Net(path, engine.TEST, memory_limit="100K")
    net = engine.Net(path, engine.TEST, memory_limit="64M")
    assert net.forward()["prob"].shape == (1, 10)


def test_a_batch_grown_past_the_limit_in_forward_names_the_layer(tmp_path):
    net = engine.Net(write_net(tmp_path, LENET), engine.TEST, memory_limit="2M")
    net.blobs["data"].reshape(4000, 1, 8, 8)  # the input itself is the caller's, outside the net
    with pytest.raises(LayerError, match=r"layer 'conv1'.*forward.*memory limit"):
        net.forward()


@pytest.mark.parametrize(("old", "new", "layer"), [
    ("dim: 1 dim: 1 dim: 8", "dim: 1 dim: 0 dim: 8", "data"),
    ("dim: 1 dim: 1 dim: 8", "dim: 0 dim: 1 dim: 8", "data"),
])
def test_zero_sized_axes_are_refused_at_setup(tmp_path, old, new, layer):
    path = write_net(tmp_path, LENET.replace(old, new, 1))
    with pytest.raises(LayerError, match=f"layer '{layer}'.*zero-sized axis") as info:
        engine.Net(path, engine.TEST)
    assert str(info.value).startswith(path)


def test_negative_dims_are_refused_with_the_layer_named(tmp_path):
    path = write_net(tmp_path, LENET.replace("dim: 1 dim: 1 dim: 8", "dim: 1 dim: -3 dim: 8"))
    with pytest.raises(LayerError, match=r"layer 'data'.*non-negative"):
        engine.Net(path, engine.TEST)


def test_the_budget_counts_data_and_diff_and_only_growth():
    budget = MemoryBudget(limit=10_000)
    with memory_budget(budget):
        blob = Blob((10, 10))
        assert budget.used == 2 * 100 * 4
        blob.reshape(5, 10)  # shrinking keeps the buffer: nothing charged
        assert budget.used == 800
        with pytest.raises(ResourceError) as info:
            blob.reshape(100, 100)
    assert info.value.shape == (100, 100) and info.value.nbytes == 2 * (10_000 - 100) * 4
    assert blob.shape == (5, 10)  # refused before anything changed


def test_memory_limit_spellings():
    assert parse_memory_limit("512M") == 512 << 20
    assert parse_memory_limit("1.5G") == 3 << 29
    assert parse_memory_limit("4096") == 4096
    assert parse_memory_limit("none") is None
    assert parse_memory_limit("available") == "available"
    for bad in ("-1", "lots", "0", "inf"):
        with pytest.raises(engine.MokaError, match="memory limit"):
            parse_memory_limit(bad)
    assert format_bytes(3 << 40) == "3.0 TiB"


def test_cli_memory_limit_flag(tmp_path, capsys):
    path = write_net(tmp_path, LENET)
    assert main(["time", "--model", path, "--iterations", "1", "--memory-limit", "100K",
                 "-q"]) == 1
    err = capsys.readouterr().err
    assert "layer 'ip1'" in err and "memory limit of 100.0 KiB" in err
    assert "internal error" not in err
    assert main(["time", "--model", path, "--iterations", "1", "-q"]) == 0  # flag not sticky


def test_cli_num_output_1e9_is_a_clear_error(tmp_path, capsys):
    path = write_net(tmp_path, LENET.replace("num_output: 500", "num_output: 1000000000"))
    assert main(["time", "--model", path, "--iterations", "1", "-q"]) == 1
    err = capsys.readouterr().err
    assert "internal error" not in err and "MemoryError" not in err
    assert "layer 'ip1'" in err and "(1000000000, 200)" in err


# -- parse errors -------------------------------------------------------------------------------
def _drop_closing_brace_of(text: str, layer: str) -> tuple[str, int]:
    """``text`` without the ``}`` closing layer ``layer``; returns it and the layer's line."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if f'name: "{layer}"' in line) - 1
    assert lines[start].startswith("layer {")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("}"))
    del lines[end]
    return "".join(lines), start + 1


def test_a_missing_brace_in_the_middle_names_the_open_block(tmp_path):
    text, line = _drop_closing_brace_of(LENET, "conv1")
    path = write_net(tmp_path, text)
    with pytest.raises(ParseError) as info:
        read_net_param(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:")
    assert f"'layer {{' opened on line {line} is never closed" in message
    assert "has no field named" not in message  # protobuf blames the next, healthy, layer


def test_a_stray_closing_brace_is_reported_as_such():
    text = LENET.replace("stride: 2 }", "stride: 2 }}", 1)
    with pytest.raises(ParseError, match=r"<string>:\d+:\d+: unbalanced braces: this '}' closes"):
        parse_text(text, caffe_pb2.NetParameter)


def test_braces_in_strings_and_comments_do_not_count():
    text = '# a { in a comment\nname: "a { b"\nlayer { name: "x" type: "Input" top: "x" }\n'
    net = parse_text(text, caffe_pb2.NetParameter)
    assert net.name == "a { b"
    bad = text + 'layer { name: "}" bottom: "x" top: "x" type: "ReLU"\n'
    with pytest.raises(ParseError, match=r"4:7: unbalanced braces.*'layer {' opened on line 4"):
        parse_text(bad, caffe_pb2.NetParameter)


def test_an_unknown_filler_names_the_layer_and_the_file(tmp_path):
    text = LENET.replace("num_output: 500 }", 'num_output: 500 weight_filler { type: "Foo" } }')
    path = write_net(tmp_path, text)
    with pytest.raises(LayerError) as info:
        engine.Net(path, engine.TEST)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert "layer 'ip1' (InnerProduct)" in message and "unknown filler type 'Foo'" in message
    assert "xavier" in message  # the known ones


def test_layer_errors_from_a_file_give_the_layer_line(tmp_path):
    text = LENET.replace('bottom: "pool2"', 'bottom: "pool9"')
    path = write_net(tmp_path, text)
    line = text.splitlines().index('  name: "ip1"') + 1
    with pytest.raises(engine.errors.NetError, match=rf"^{path}:{line}: layer 'ip1'.*'pool9'"):
        engine.Net(path, engine.TEST)


def test_two_layers_with_one_name_are_refused(tmp_path):
    text = LENET.replace('name: "ip2"', 'name: "ip1"')
    with pytest.raises(LayerError, match=r"layer .ip1. \(InnerProduct\): another layer .* name"):
        engine.Net(write_net(tmp_path, text), engine.TEST)


def test_a_caffemodel_with_a_negative_dim_is_a_parse_error(tmp_path):
    net = engine.Net(write_net(tmp_path, LENET), engine.TEST)
    proto = net.to_proto()
    proto.layer[1].blobs[0].shape.dim[1] = -1
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ParseError, match=rf"{path}: layer 'conv1' blob 0: .*non-negative"):
        engine.Net(write_net(tmp_path, LENET), engine.TEST, weights=str(path))


def test_a_damaged_hdf5_caffemodel_is_a_parse_error(tmp_path):
    from engine.io import write_net_hdf5

    net = engine.Net(write_net(tmp_path, LENET), engine.TEST)
    path = tmp_path / "m.caffemodel.h5"
    write_net_hdf5(net.to_proto(), path)
    data = bytearray(path.read_bytes())
    for offset in range(512, len(data)):  # everything after the superblock
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(ParseError, match=str(path)):
        engine.Net(write_net(tmp_path, LENET), engine.TEST, weights=str(path))


def test_a_huge_padded_max_pooling_kernel_costs_what_its_input_does():
    from layer_helpers import make_layer, random_blob

    x = random_blob((2, 3, 8, 8), seed=3)
    layer, top = make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 2000 '
                            'stride: 1 pad: 1000 }', [x], n_top=2)
    assert top[0].shape == (2, 3, 9, 9)
    assert len(layer.offsets) <= 16 * 16  # not 2000 * 2000 kernel offsets
    layer.forward([x], top)
    # every window covers the whole 8x8 input: each output is the channel's maximum
    expected = x.data.max(axis=(2, 3), keepdims=True)
    np.testing.assert_array_equal(top[0].data, np.broadcast_to(expected, top[0].shape))
    flat = x.data.reshape(2, 3, -1).argmax(axis=-1)
    np.testing.assert_array_equal(top[1].data, np.broadcast_to(flat[..., None, None], (2, 3, 9, 9)))


def test_a_moved_brace_blames_the_open_block_not_the_next_layer(tmp_path):
    text, line = _drop_closing_brace_of(LENET, "conv1")
    path = write_net(tmp_path, text + "}\n")  # balanced again, but conv1 swallows pool1
    with pytest.raises(ParseError) as info:
        read_net_param(path)
    message = str(info.value)
    assert f"the block 'layer {{' opened on line {line} is still open here" in message
    assert "a '}' is probably missing above this line" in message
    assert "python_param" not in message  # no hint at a healthy field


def test_a_test_net_is_charged_for_data_a_train_net_for_data_and_diff(tmp_path):
    path = write_net(tmp_path, LENET)
    with pytest.raises(LayerError, match=r"\(500, 200\) needs 390.6 KiB \(data\);"):
        engine.Net(path, engine.TEST, memory_limit="100K")
    with pytest.raises(LayerError, match=r"\(500, 200\) needs 781.2 KiB \(data and diff\);"):
        engine.Net(path, engine.TRAIN, memory_limit="100K")
    test_net = engine.Net(path, engine.TEST, memory_limit="64M")
    train_net = engine.Net(path, engine.TRAIN, memory_limit="64M")
    assert train_net._budget.used == 2 * test_net._budget.used > 0


def test_an_absurd_spp_pyramid_is_refused_at_setup(tmp_path):
    text = LENET.replace(
        'layer {\n  name: "conv1"',
        'layer { name: "spp" type: "SPP" bottom: "data" top: "spp" '
        'spp_param { pyramid_height: 2147483647 } }\nlayer {\n  name: "conv1"', 1)
    with pytest.raises(LayerError, match=r"layer 'spp' \(SPP\): pyramid_height 2147483647"):
        engine.Net(write_net(tmp_path, text), engine.TEST)


def test_damaged_image_bytes_are_a_data_error_wherever_the_damage_is():
    from engine.data.image import decode_image, encode_image
    from engine.errors import DataError

    png = encode_image(np.random.default_rng(0).integers(0, 256, (3, 6, 5), np.uint8), "PNG")
    for offset in range(8, len(png)):  # after the signature: one byte inserted, one flipped
        for data in (png[:offset] + b"\x00" + png[offset:],
                     png[:offset] + bytes([png[offset] ^ 0xA5]) + png[offset + 1:]):
            try:
                image = decode_image(data, where="im.png")
            except DataError as exc:
                assert str(exc).startswith("im.png: cannot decode")
            else:
                assert image.dtype == np.uint8 and image.ndim == 3
    # an IDAT chunk whose length falls short: Pillow reads the next "chunk" mid-data and raises
    # SyntaxError("broken PNG file")
    start = png.index(b"IDAT") - 4
    length = int.from_bytes(png[start:start + 4], "big")
    short = png[:start] + (length - 9).to_bytes(4, "big") + png[start + 4:]
    with pytest.raises(DataError, match=r"^im.png: cannot decode the image bytes \(broken PNG"):
        decode_image(short, where="im.png")


def test_an_unknown_dummy_data_filler_is_refused_at_setup_with_the_layer(tmp_path):
    text = ('layer { name: "noise" type: "DummyData" top: "x" dummy_data_param { '
            'shape { dim: 2 dim: 3 } data_filler { type: "Foo" } } }\n')
    path = write_net(tmp_path, text)
    with pytest.raises(LayerError, match=r"^.*net.prototxt:1: layer 'noise' \(DummyData\): "
                                         r"data_filler 0: unknown filler type 'Foo'"):
        engine.Net(path, engine.TEST)
