"""Python layers as pycaffe runs them (python/caffe/test/test_python_layer.py's layers, written
afresh), the opt-in switches, and the shipped linear-regression example through ``engine
train``."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import python_layer
from engine.cli import main
from engine.errors import NetError
from engine.io import read_net_binary, read_solver_param, write_text
from tests.gradcheck import check_gradient
from tests.layer_helpers import make_layer, random_blob

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "models/python_layer"

# Layers in pycaffe's style: no __init__, `import engine as caffe`, the four methods.
MODULE = '''
import numpy as np
import engine as caffe


class TimesTen(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 10 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 10 * top[0].diff


class Failing(caffe.Layer):
    def setup(self, bottom, top):
        raise RuntimeError("this layer always fails")


class ParamStr(caffe.Layer):
    def setup(self, bottom, top):
        self.value = float(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.value * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = self.value * top[0].diff


class Scaled(caffe.Layer):
    """y = w * x with a learned scalar w, added the pycaffe way."""

    def setup(self, bottom, top):
        self.blobs.add_blob(1)
        self.blobs[0].data[0] = 0.5

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.blobs[0].data[0] * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] += np.sum(top[0].diff * bottom[0].data)
        if propagate_down[0]:
            bottom[0].diff[...] = self.blobs[0].data[0] * top[0].diff


class Phase(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape()

    def forward(self, bottom, top):
        top[0].data[()] = self.phase


class NotALayer:
    pass
'''


@pytest.fixture
def module(tmp_path, monkeypatch) -> str:
    """A uniquely named module of Python layers beside the test's prototxts."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the net appends its folder: undo that
    name = f"moka_pylayers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    yield name
    sys.modules.pop(name, None)


@pytest.fixture
def allowed():
    with engine.python_layers_allowed():
        yield


def net_text(module: str, layer: str, param_str: str = "", extra: str = "") -> str:
    return textwrap.dedent(f"""
        name: "pythonnet"
        force_backward: true
        layer {{ name: "data" type: "Input" top: "data"
                 input_param {{ shape {{ dim: 2 dim: 3 dim: 4 }} }} }}
        layer {{ name: "one" type: "Python" bottom: "data" top: "one"
                 python_param {{ module: "{module}" layer: "{layer}"
                                 param_str: "{param_str}" }} {extra} }}
        layer {{ name: "two" type: "Python" bottom: "one" top: "two"
                 python_param {{ module: "{module}" layer: "{layer}"
                                 param_str: "{param_str}" }} }}
        """)


def build(tmp_path: Path, text: str, phase=engine.TRAIN, **kwargs) -> engine.Net:
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return engine.Net(str(path), phase, rng=np.random.default_rng(0), **kwargs)


# -- pycaffe's layers ----------------------------------------------------------------------------
def test_forward_and_backward_run_the_users_methods(tmp_path, module):
    net = build(tmp_path, net_text(module, "TimesTen"), allow_python=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    out = net.forward(data=x)["two"]
    np.testing.assert_allclose(out, 100 * x, rtol=1e-6)
    dy = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)
    diff = net.backward(two=dy)["data"]
    np.testing.assert_allclose(diff, 100 * dy, rtol=1e-6)
    layer = net.layer_dict["one"]
    assert type(layer).__name__ == "TimesTen"
    assert isinstance(layer, engine.Layer)
    assert layer.type == "Python"


def test_param_str_reaches_setup(tmp_path, module):
    net = build(tmp_path, net_text(module, "ParamStr", "2.5"), allow_python=True)
    x = np.ones((2, 3, 4), np.float32)
    np.testing.assert_allclose(net.forward(data=x)["two"], 6.25 * x)
    assert net.layer_dict["one"].param_str == "2.5"


def test_exception_in_setup_propagates(tmp_path, module):
    with pytest.raises(RuntimeError, match="always fails"):
        build(tmp_path, net_text(module, "Failing"), allow_python=True)


@pytest.mark.parametrize("phase", [engine.TRAIN, engine.TEST])
def test_phase_is_the_nets(tmp_path, module, phase):
    text = net_text(module, "Phase").split('layer { name: "two"')[0]
    net = build(tmp_path, text, phase, allow_python=True)
    assert net.forward()["one"] == phase
    assert net.layer_dict["one"].phase == phase


def test_add_blob_makes_learnable_parameters_that_are_saved(tmp_path, module):
    net = build(tmp_path, net_text(module, "Scaled"), allow_python=True)
    assert [b.shape for b in net.params["one"]] == [(1,)]
    assert len(net.learnable_params) == 2
    x = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    net.forward(data=x)
    net.clear_param_diffs()
    net.backward(two=np.ones((2, 3, 4), np.float32))
    # d(sum w2 w1 x)/dw1 = w2 sum(x) with w1 = w2 = 0.5
    np.testing.assert_allclose(net.params["one"][0].diff, [0.5 * x.sum()], rtol=1e-5)
    net.params["one"][0].data[0] = 3.0
    net.save(str(tmp_path / "w.caffemodel"))
    saved = {layer.name: layer for layer in read_net_binary(tmp_path / "w.caffemodel").layer}
    assert list(saved["one"].blobs[0].data) == [3.0]
    again = build(tmp_path, net_text(module, "Scaled"), allow_python=True)
    again.copy_from(str(tmp_path / "w.caffemodel"))
    assert again.params["one"][0].data[0] == 3.0


def test_gradient_of_a_python_layer_with_a_parameter(tmp_path, module, allowed):
    with python_layer.python_layers_allowed(search=[tmp_path]):
        layer, top = make_layer(f'type: "Python" python_param {{ module: "{module}" '
                                'layer: "Scaled" }', [bottom := random_blob((3, 4), seed=5)])
    assert layer.blobs[0].dtype == np.float64
    assert check_gradient(layer, [bottom], top) == 13


# -- the opt-in ----------------------------------------------------------------------------------
def test_refused_unless_allowed_with_one_line(tmp_path, module):
    with pytest.raises(NetError) as info:
        build(tmp_path, net_text(module, "TimesTen"))
    message = str(info.value)
    assert "\n" not in message
    assert "layer 'one' (Python)" in message
    assert f"module '{module}'" in message
    assert "--allow-python" in message and "allow_python=True" in message


def test_process_wide_switch_and_environment(tmp_path, module, monkeypatch):
    monkeypatch.setattr(python_layer, "_allowed", None)  # restored after the test
    engine.allow_python_layers(True)
    assert build(tmp_path, net_text(module, "TimesTen")).layers[1].type == "Python"
    with pytest.raises(NetError, match="allow"):  # the argument wins over the switch
        build(tmp_path, net_text(module, "TimesTen"), allow_python=False)
    engine.allow_python_layers(False)
    with pytest.raises(NetError, match="allow"):
        build(tmp_path, net_text(module, "TimesTen"))
    monkeypatch.setattr(python_layer, "_allowed", None)
    monkeypatch.setenv("MOKA_ALLOW_PYTHON", "1")
    assert build(tmp_path, net_text(module, "TimesTen")).layers[1].type == "Python"


def test_nested_blocks_keep_the_outer_decision(tmp_path, module):
    with engine.python_layers_allowed(True), engine.python_layers_allowed(None, ["/nowhere"]):
        assert python_layer.python_layers_allowed_now()
    with engine.python_layers_allowed(False), pytest.raises(NetError, match="allow"):
        build(tmp_path, net_text(module, "TimesTen"))


@pytest.mark.parametrize("layer, match", [
    ("NoSuchClass", r"'NoSuchClass' in module '.*' .* is not found"),
    ("NotALayer", r"not a subclass of engine.Layer"),
])
def test_bad_class_names_the_module(tmp_path, module, layer, match):
    with pytest.raises(NetError, match=match):
        build(tmp_path, net_text(module, layer), allow_python=True)


def test_missing_module_is_one_line(tmp_path, module):
    with pytest.raises(NetError, match=r"layer 'one' \(Python\): cannot import "
                                       r"python_param.module 'no_such_module_here'"):
        build(tmp_path, net_text("no_such_module_here", "X"), allow_python=True)


# -- the shipped example through engine train ------------------------------------------------------
def train(tmp_path: Path, *flags: str) -> tuple[int, str]:
    param = read_solver_param(str(EXAMPLE / "solver.prototxt"))
    param.snapshot_prefix = str(tmp_path / "linreg")
    solver = tmp_path / "solver.prototxt"
    write_text(param, solver)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", str(solver), *flags])
    return rc, err.getvalue()


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop("pyloss", None)


def test_example_trains_with_allow_python(tmp_path, at_root):
    rc, log = train(tmp_path, "--allow-python")
    assert rc == 0, log[-2000:]
    losses = [float(v) for v in re.findall(r"Test net output #0: loss = ([\d.e+-]+)", log)]
    assert len(losses) == 5  # iterations 0, 50, 100, 150, 200
    assert losses[-1] < 0.01 * losses[0]
    assert losses[-1] < 0.01  # the noise floor is 0.1^2 / 2 = 0.005
    weights = {layer.name: [np.array(b.data) for b in layer.blobs]
               for layer in read_net_binary(tmp_path / "linreg_iter_200.caffemodel").layer}
    np.testing.assert_allclose(weights["fit"][0], [1.5, -2.0, 0.5, 3.0], atol=0.05)
    np.testing.assert_allclose(weights["fit"][1], [-1.0], atol=0.05)


def test_example_stops_with_one_line_without_the_flag(tmp_path, at_root, capsys):
    rc, log = train(tmp_path)
    assert rc == 1
    errors = [line for line in log.splitlines() if line.startswith("engine: error:")]
    assert len(errors) == 1
    assert "layer 'loss' (Python)" in errors[0] and "module 'pyloss'" in errors[0]
    assert "--allow-python" in errors[0]
    assert "Traceback" not in log


def test_test_and_time_take_the_flag(tmp_path, at_root, capsys):
    model = "models/python_layer/linreg.prototxt"
    assert main(["time", "--model", model, "--iterations", "2"]) == 1
    assert "--allow-python" in capsys.readouterr().err
    assert main(["time", "--model", model, "--iterations", "2", "--allow-python"]) == 0
    weights = str(tmp_path / "w.caffemodel")
    engine.Net(model, engine.TEST, allow_python=True).save(weights)
    test = ["test", "--model", model, "--weights", weights, "--iterations", "1"]
    assert main(test) == 1
    assert main([*test, "-allow-python"]) == 0  # Caffe's single-dash spelling too
    assert "loss = " in capsys.readouterr().err


def test_a_pycaffe_script_opts_in_with_one_line(tmp_path, at_root, monkeypatch):
    import engine as caffe

    monkeypatch.setattr(python_layer, "_allowed", None)  # restored after the test
    param = read_solver_param(str(EXAMPLE / "solver.prototxt"))
    param.snapshot_prefix = str(tmp_path / "linreg")
    write_text(param, tmp_path / "solver.prototxt")
    with pytest.raises(NetError, match="allow_python_layers"):
        caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    caffe.allow_python_layers(True)  # the one line
    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    solver.step(1)
    first = solver.net.blobs["loss"].data.item()
    solver.step(60)
    assert solver.net.blobs["loss"].data.item() < 0.05 * first
    assert type(solver.net.layers[-1]).__name__ == "EuclideanLossLayer"
