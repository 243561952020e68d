"""``engine check``: in-net gradient checks, init statistics and the overfit-one-batch run."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.blob import Blob
from engine.check import check_net, solver_overfit
from engine.cli import main
from engine.layer import LAYERS, NeuronLayer, register_layer

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "models" / "lenet" / "lenet_train_test.prototxt"

if "CheckTestWrongBackward" not in LAYERS:

    @register_layer
    class CheckTestWrongBackward(NeuronLayer):
        """y = 2x, but backward claims dy/dx = 3: the bug engine check must catch."""

        def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
            top[0].data[...] = 2 * bottom[0].data

        def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                     bottom: list[Blob]) -> None:
            if propagate_down[0]:
                bottom[0].diff[...] = 3 * top[0].diff


BROKEN = """
name: "broken"
layer { name: "in" type: "Input" top: "x" top: "target"
  input_param { shape { dim: 4 dim: 5 } shape { dim: 4 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "wrong" type: "CheckTestWrongBackward" bottom: "h" top: "h" }
layer { name: "act" type: "TanH" bottom: "h" top: "a" }
layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "target" top: "loss" }
"""


def test_a_wrong_backward_is_flagged(tmp_path):
    path = tmp_path / "broken.prototxt"
    path.write_text(BROKEN)
    report = check_net(path)
    wrong = report.layer("wrong")
    assert wrong.failure is not None and wrong.verdict == "FAIL"
    assert "bottom[0]" in wrong.failure
    assert wrong.max_error > 0.1  # 3 against 2: a third off
    for name in ("ip", "act", "loss"):
        assert report.layer(name).failure is None, name
        assert report.layer(name).checked > 0
    assert not report.ok
    assert "layer 'wrong' (CheckTestWrongBackward): backward disagrees" in str(report)


def test_cli_exit_status_follows_the_verdict(tmp_path, capsys):
    path = tmp_path / "broken.prototxt"
    path.write_text(BROKEN)
    assert main(["check", str(path), "--overfit-iterations", "0"]) == 1
    out = capsys.readouterr().out
    assert "verdict: FAIL" in out
    fixed = tmp_path / "fixed.prototxt"
    fixed.write_text(BROKEN.replace("CheckTestWrongBackward", "ReLU"))
    assert main(["check", str(fixed), "--overfit-iterations", "0"]) == 0
    assert "verdict: ok" in capsys.readouterr().out


def test_lenet_passes_and_overfits_one_batch(monkeypatch):
    monkeypatch.chdir(ROOT)  # the net names its LMDBs from the repository root
    report = check_net(LENET, batch=8, samples=10, overfit=solver_overfit(60, 5e-3))
    assert report.gradients_ok, str(report)
    checked = {r.name for r in report.layers if r.checked}
    assert {"conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "loss"} <= checked
    assert report.losses[0] > 1.5  # ~ln(10) at initialisation
    assert report.losses[-1] < 0.05 * report.losses[0]
    assert report.overfit_ok and report.ok
    assert report.layer("relu1").dead_fraction is not None


def deep_tanh(filler: str, depth: int = 8) -> str:
    layers = ['layer { name: "in" type: "Input" top: "h0" '
              'input_param { shape { dim: 32 dim: 100 } } }']
    for k in range(1, depth + 1):
        layers.append(f'layer {{ name: "fc{k}" type: "InnerProduct" bottom: "h{k - 1}" '
                      f'top: "z{k}" inner_product_param {{ num_output: 100 bias_term: false '
                      f'weight_filler {{ {filler} }} }} }}')
        layers.append(f'layer {{ name: "tanh{k}" type: "TanH" bottom: "z{k}" top: "h{k}" }}')
    return "\n".join(layers) + "\n"


def test_statistics_show_the_collapse_of_a_small_gaussian_init(tmp_path):
    """Input std 1; each 100-wide layer multiplies the std by ~sqrt(100) * 0.01 = 0.1 under
    gaussian(0.01): gone after 8 layers. Xavier (variance 1 / fan_in) keeps the pre-activation
    scale, so only tanh's own squashing trims the std, by 10-25% a layer."""
    stds = {}
    for name, filler in (("gaussian", 'type: "gaussian" std: 0.01'),
                         ("xavier", 'type: "xavier"')):
        path = tmp_path / f"{name}.prototxt"
        path.write_text(deep_tanh(filler))
        report = check_net(path, batch=None, samples=2)
        stds[name] = [report.layer(f"tanh{k}").top_std for k in range(1, 9)]
    small = np.array(stds["gaussian"])
    assert np.all(small[1:] < 0.3 * small[:-1])  # shrinks layer after layer
    assert small[-1] < 1e-5
    xavier = np.array(stds["xavier"])
    assert np.all(xavier[1:] > 0.75 * xavier[:-1])  # roughly steady
    assert xavier[-1] > 0.2 and xavier[-1] > 1e4 * small[-1]


def test_a_net_without_loss_skips_the_overfit_run(tmp_path, capsys):
    path = tmp_path / "deploy.prototxt"
    path.write_text(BROKEN.replace("CheckTestWrongBackward", "ReLU")
                    .split('layer { name: "loss"')[0])
    assert main(["check", str(path), "--overfit-iterations", "5"]) == 0
    out = capsys.readouterr().out
    assert "overfit one batch: skipped (the net has no loss" in out
    assert "gradients: ok" in out


def test_unreadable_data_becomes_random_data_and_zero_labels(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text("""
layer { name: "d" type: "Data" top: "data" top: "label"
  data_param { source: "no_such_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "y"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "label" top: "loss" }
""")
    assert main(["check", "net.prototxt", "--input-shape", "data=64,2,3,3", "--batch", "4",
                 "--overfit-iterations", "50", "--lr", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "data layer 'd' (Data) not read: standard normal data and zero labels" in out
    assert re.search(r"^d\s+Data\s", out, re.MULTILINE)
    assert "verdict: ok" in out
    assert main(["check", "net.prototxt"]) == 1  # no size for the data: says how to give it
    assert "--input-shape data=N,C,H,W" in capsys.readouterr().err


def test_a_function_that_bends_inside_the_step_is_skipped_not_failed(tmp_path):
    """Normalize on all-zero channels: x / sqrt(x^2 + 1e-10) turns from -1 to 1 within 1e-5 of
    0, so a 1e-3 central difference reads slope 1e3 where the true one is 1e5; a tenth of the
    step reads another slope, which marks the element as not judged."""
    path = tmp_path / "zero_norm.prototxt"
    path.write_text("""
layer { name: "in" type: "Input" top: "x" top: "target"
  input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } shape { dim: 2 dim: 3 dim: 2 dim: 2 } } }
layer { name: "zero" type: "Power" bottom: "x" top: "z" power_param { scale: 0 } }
layer { name: "norm" type: "Normalize" bottom: "z" top: "n" norm_param { across_spatial: false } }
layer { name: "loss" type: "EuclideanLoss" bottom: "n" bottom: "target" top: "loss" }
""")
    norm = check_net(path).layer("norm")
    assert norm.failure is None and norm.kinks > 0  # test_a_wrong_backward_is_flagged: still fails


def test_a_slow_overfit_fails_and_says_what_to_try(tmp_path):
    path = tmp_path / "deploy.prototxt"
    path.write_text(BROKEN.replace("CheckTestWrongBackward", "ReLU"))
    report = check_net(path, overfit=lambda param, feed: [1.0, 0.5, 0.1])
    assert not report.ok
    assert ("loss 1 -> 0.1 in 3 iterations: FAIL (the loss did not fall below 5% of its first "
            "value; if it was still falling, try more --overfit-iterations or a larger --lr)"
            in str(report))
