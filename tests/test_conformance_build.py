"""Real Caffe deploy nets from ../shared/conformance build and run forward and backward.

Every deploy net (inputs only, no data layers) whose layer types Moka registers is built with
random weights, run forward, then backward with force_backward, and checked for finite values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import engine
from engine.io import read_net_param
from engine.layer import LAYERS, layer_class
from engine.net import Net

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
NETS = sorted(p for p in CONFORMANCE.glob("*.prototxt") if "solver" not in p.name)
DATA_TYPES = {"Data", "ImageData", "HDF5Data", "WindowData", "MemoryData", "DummyData", "Python"}

pytestmark = pytest.mark.skipif(not CONFORMANCE.is_dir(),
                                reason=f"conformance corpus not found at {CONFORMANCE}")


def deploy_nets() -> list[Path]:
    layer_class("Input")  # registers the built-in layers
    chosen = []
    for path in NETS:
        types = {layer.type for layer in read_net_param(path).layer}
        if "Input" in types and not types & DATA_TYPES and types <= set(LAYERS):
            chosen.append(path)
    return chosen


def test_some_deploy_nets_are_covered():
    names = [p.name for p in deploy_nets()]
    assert any("lenet" in n for n in names), names
    assert any("cifar10_quick" in n for n in names), names


@pytest.mark.parametrize("path", deploy_nets(), ids=lambda p: p.name)
def test_deploy_net_runs_forward_and_backward(path):
    param = read_net_param(path)
    param.force_backward = True
    for layer in param.layer:  # keep the batch small: these are shape checks, not benchmarks
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = 1
    rng = np.random.default_rng(0)
    net = Net(param, engine.TEST, rng=rng)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.standard_normal(blob.shape, np.float32) * 0.1
    inputs = {name: rng.standard_normal(net.blobs[name].shape, np.float32)
              for name in net.inputs}
    outputs = net.forward(**inputs)
    assert outputs and all(np.isfinite(v).all() for v in outputs.values())
    diffs = net.backward(**{name: np.ones(net.blobs[name].shape) for name in net.outputs})
    for name in net.inputs:
        assert diffs[name].shape == net.blobs[name].shape
        assert np.isfinite(diffs[name]).all()
