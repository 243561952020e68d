"""The shipped examples under models/: every file builds, LeNet trains, fine-tuning freezes."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.cli import main
from engine.data.datum import datum_to_array, parse_datum
from engine.data.db import read_lmdb
from engine.io import read_net_binary, read_solver_param, write_text
from engine.net import Net

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
PROTOTXTS = sorted(MODELS.rglob("*.prototxt"))
SOLVERS = [p for p in PROTOTXTS if "solver" in p.name]
NETS = [p for p in PROTOTXTS if "solver" not in p.name]
ACCURACY = re.compile(r"Test net output #\d+: accuracy = ([.\deE+-]+)")
LENET_SOLVER = MODELS / "lenet/lenet_solver.prototxt"
# held-out items each example's test phase covers once (test_iter x test batch)
HELD_OUT = {"lenet": 360, "finetune_digits": 360, "lstm_sequence": 160, "python_layer": 64}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples' paths are relative to the repository root


def test_models_are_found():
    assert set(HELD_OUT) <= {p.parent.name for p in PROTOTXTS}
    assert len(SOLVERS) == 4


@pytest.mark.parametrize("path", NETS, ids=rel)
@pytest.mark.parametrize("phase", [engine.TRAIN, engine.TEST], ids=["TRAIN", "TEST"])
def test_every_net_builds_and_runs(path, phase, at_root):
    net = Net(rel(path), phase, rng=np.random.default_rng(0), allow_python=True)
    net.forward()
    assert net.layers


@pytest.mark.parametrize("path", SOLVERS, ids=rel)
def test_every_solver_parses_and_names_existing_files(path, at_root):
    param = read_solver_param(rel(path))
    assert Path(param.net).is_file()
    assert param.random_seed >= 0  # examples are reproducible
    assert param.snapshot_prefix.startswith(rel(path.parent) + "/snapshots/")
    net = Net(param.net, engine.TEST, allow_python=True)
    batch = net.blobs["data"].shape[0]
    assert batch * param.test_iter[0] == HELD_OUT[path.parent.name]  # the held-out set, once


# -- the committed data ----------------------------------------------------------------------
def read_db(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = [parse_datum(value) for _, value in read_lmdb(str(path))]
    return (np.stack([datum_to_array(d) for d in data]),
            np.array([d.label for d in data]))


def test_digit_lmdbs_hold_the_stratified_split():
    train_x, train_y = read_db(MODELS / "lenet/digits_train_lmdb")
    test_x, test_y = read_db(MODELS / "lenet/digits_test_lmdb")
    assert train_x.shape == (1437, 1, 8, 8)
    assert test_x.shape == (360, 1, 8, 8)
    assert train_x.dtype == np.uint8
    assert train_x.max() == 255  # 16 * 16 capped
    np.testing.assert_array_equal(np.bincount(test_y), [36] * 10)
    assert np.bincount(train_y).sum() == 1437
    for folder in MODELS.rglob("*_lmdb"):
        assert (folder / "data.mdb").stat().st_size < 512 * 1024


def test_parity_lmdbs_relabel_the_same_images():
    test_x, test_y = read_db(MODELS / "lenet/digits_test_lmdb")
    parity_x, parity_y = read_db(MODELS / "finetune_digits/parity_test_lmdb")
    np.testing.assert_array_equal(parity_x, test_x)
    np.testing.assert_array_equal(parity_y, test_y % 2)
    train_x, _ = read_db(MODELS / "finetune_digits/parity_train_lmdb")
    assert train_x.shape == (300, 1, 8, 8)


def test_make_digits_split_is_stratified_and_seeded():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_digits",
                                                  MODELS / "lenet/make_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    labels = np.repeat(np.arange(10), 50)
    train, test = module.stratified_split(labels, 5)
    np.testing.assert_array_equal(np.bincount(labels[test]), [5] * 10)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(500))
    again, _ = module.stratified_split(labels, 5)
    np.testing.assert_array_equal(train, again)


# -- end to end ------------------------------------------------------------------------------
def train_copy(solver: Path, folder: Path, *extra: str, **overrides) -> str:
    """Run ``engine train`` on a copy of ``solver`` that snapshots into ``folder``; the log."""
    param = read_solver_param(rel(solver))
    param.snapshot_prefix = str(folder / Path(param.snapshot_prefix).name)
    for field, value in overrides.items():
        setattr(param, field, value)
    path = folder / solver.name
    write_text(param, path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", str(path), *extra])
    assert rc == 0, err.getvalue()[-2000:]
    return err.getvalue()


def accuracies(log: str) -> list[float]:
    return [float(a) for a in ACCURACY.findall(log)]


def one_blas_thread():
    """One BLAS thread where threadpoolctl is installed (it comes with the dev extra).

    This small net gains nothing from a second thread, and on a machine busy with other work
    OpenBLAS's threads wait on each other and make training ten times slower or more.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@pytest.fixture(scope="module")
def lenet(tmp_path_factory) -> tuple[Path, str]:
    """Train with the shipped LeNet solver once; (its final .caffemodel, the log)."""
    folder = tmp_path_factory.mktemp("lenet")
    with pytest.MonkeyPatch.context() as patch, one_blas_thread():
        patch.chdir(ROOT)
        log = train_copy(LENET_SOLVER, folder)
        max_iter = read_solver_param(rel(LENET_SOLVER)).max_iter
    return folder / f"lenet_iter_{max_iter}.caffemodel", log


@pytest.mark.slow
def test_lenet_trains_to_97_percent(lenet):
    caffemodel, log = lenet
    accuracy = accuracies(log)
    assert accuracy[-1] >= 0.97, accuracy
    assert caffemodel.is_file()
    assert caffemodel.with_suffix(".solverstate").is_file()
    assert "Optimization Done." in log


@pytest.mark.slow
def test_lenet_deploy_net_classifies_with_the_trained_weights(lenet, at_root):
    caffemodel, _ = lenet
    test_x, test_y = read_db(MODELS / "lenet/digits_test_lmdb")
    net = Net(rel(MODELS / "lenet/lenet.prototxt"), engine.TEST, weights=str(caffemodel))
    net.blobs["data"].reshape(len(test_x), 1, 8, 8)
    net.reshape()
    prob = net.forward(data=test_x.astype(np.float32) * 0.00390625)["prob"]
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-5)
    assert (prob.argmax(axis=1) == test_y).mean() >= 0.97


@pytest.mark.slow
def test_finetune_keeps_frozen_layers_bit_identical(lenet, at_root, tmp_path):
    caffemodel, _ = lenet
    log = train_copy(MODELS / "finetune_digits/finetune_solver.prototxt", tmp_path,
                     "--weights", str(caffemodel), max_iter=30, test_interval=30)
    before = weights(caffemodel)
    after = weights(tmp_path / "parity_iter_30.caffemodel")
    for layer in ("conv1", "conv2", "ip1"):
        for old, new in zip(before[layer], after[layer], strict=True):
            np.testing.assert_array_equal(old, new)
    assert "ip2_parity" in after and "ip2" not in after
    assert accuracies(log)[-1] >= 0.8  # parity from frozen digit features, 30 iterations


def test_finetune_without_the_lenet_snapshot_is_one_line(at_root, tmp_path, capsys):
    missing = tmp_path / "lenet_iter_1000.caffemodel"
    rc = main(["train", rel(MODELS / "finetune_digits/finetune_solver.prototxt"),
               "--weights", str(missing)])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("engine: error:") == 1
    assert str(missing) in err
    assert "Traceback" not in err


def weights(path: Path) -> dict[str, list[np.ndarray]]:
    net = read_net_binary(str(path))
    return {layer.name: [np.array(b.data) for b in layer.blobs] for layer in net.layer
            if layer.blobs}
