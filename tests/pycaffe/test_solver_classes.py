"""pycaffe's solver classes: ``caffe.SGDSolver(path)`` and friends, as pycaffe scripts use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import engine as caffe
from engine import caffe_pb2

NET = """name: 'tiny' force_backward: true
layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: 'gaussian' std: 1 } data_filler { type: 'constant' value: 1 } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 2 weight_filler { type: 'gaussian' std: 0.1 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip' bottom: 'label' top: 'loss' }
"""

CLASSES = {"SGD": "SGDSolver", "Nesterov": "NesterovSolver", "AdaGrad": "AdaGradSolver",
           "RMSProp": "RMSPropSolver", "AdaDelta": "AdaDeltaSolver", "Adam": "AdamSolver"}


def write_solver(folder: Path, rule: str = "SGD", **fields) -> str:
    (folder / "net.prototxt").write_text(NET)
    param = caffe_pb2.SolverParameter(
        net=str(folder / "net.prototxt"), test_iter=[1], test_interval=10, base_lr=0.01,
        momentum=0.9, weight_decay=0.0005, lr_policy="inv", gamma=0.0001, power=0.75,
        display=0, max_iter=12, snapshot_after_train=False, random_seed=7, type=rule,
        snapshot_prefix=str(folder / "snapshots" / "sub" / "tiny"))
    if rule in ("AdaGrad", "RMSProp", "AdaDelta"):
        param.momentum = 0.9 if rule == "AdaDelta" else 0.0
        param.rms_decay = 0.98
    if rule == "Adam":
        param.momentum2 = 0.999
    for name, value in fields.items():
        setattr(param, name, value)
    path = folder / "solver.prototxt"
    path.write_text(str(param))
    return str(path)


def test_step_counts_iterations_and_exposes_nets_and_param(tmp_path):
    solver = caffe.SGDSolver(write_solver(tmp_path))
    assert solver.iter == 0
    assert isinstance(solver.net, caffe.Net)
    assert len(solver.test_nets) == 1
    assert solver.param.base_lr == pytest.approx(0.01)
    assert solver.lr == pytest.approx(0.01)
    before = solver.net.params["ip"][0].data.copy()
    solver.step(3)
    assert solver.iter == 3
    assert not np.array_equal(solver.net.params["ip"][0].data, before)
    # the test net shares the training weights
    np.testing.assert_array_equal(solver.test_nets[0].params["ip"][0].data,
                                  solver.net.params["ip"][0].data)


def test_solve_runs_to_max_iter(tmp_path):
    solver = caffe.SGDSolver(write_solver(tmp_path))
    solver.solve()
    assert solver.iter == 12


def test_apply_update_is_one_sgd_step(tmp_path):
    solver = caffe.SGDSolver(write_solver(tmp_path))
    weights = solver.net.layers[1].blobs[0]
    weights.data[...] = 0
    weights.diff[...] = 1
    solver.apply_update()
    np.testing.assert_allclose(weights.data, -0.01, rtol=1e-6)
    assert solver.iter == 0  # Caffe's ApplyUpdate leaves the counter to step()


def test_callbacks_run_at_start_and_when_gradients_are_ready(tmp_path):
    solver = caffe.SGDSolver(write_solver(tmp_path))
    events = []
    solver.add_callback(lambda: events.append(("start", solver.iter)),
                        lambda: events.append(("ready", solver.iter,
                                               float(np.abs(solver.net.params["ip"][0].diff)
                                                     .sum()))))
    solver.step(2)
    assert [e[:2] for e in events] == [("start", 0), ("ready", 0), ("start", 1), ("ready", 1)]
    assert all(e[2] > 0 for e in events if e[0] == "ready")  # gradients are in the diffs


def test_snapshot_creates_the_folder_and_restore_resumes(tmp_path):
    path = write_solver(tmp_path)
    solver = caffe.SGDSolver(path)
    solver.step(4)
    solver.snapshot()
    folder = tmp_path / "snapshots" / "sub"
    assert (folder / "tiny_iter_4.caffemodel").is_file()
    assert (folder / "tiny_iter_4.solverstate").is_file()
    solver.step(3)
    resumed = caffe.SGDSolver(path)
    resumed.restore(str(folder / "tiny_iter_4.solverstate"))
    assert resumed.iter == 4
    resumed.step(3)
    np.testing.assert_array_equal(resumed.net.params["ip"][0].data,
                                  solver.net.params["ip"][0].data)


def test_solve_with_resume_file(tmp_path):
    path = write_solver(tmp_path)
    solver = caffe.SGDSolver(path)
    solver.step(5)
    solver.snapshot()
    resumed = caffe.SGDSolver(path)
    resumed.solve(str(tmp_path / "snapshots" / "sub" / "tiny_iter_5.solverstate"))
    assert resumed.iter == 12


def test_periodic_snapshots_into_a_missing_folder(tmp_path):
    solver = caffe.SGDSolver(write_solver(tmp_path, snapshot=5))  # Caffe would refuse
    solver.step(5)
    assert (tmp_path / "snapshots" / "sub" / "tiny_iter_5.caffemodel").is_file()


@pytest.mark.parametrize("rule", list(CLASSES))
def test_each_class_uses_its_rule_and_get_solver_follows_type(tmp_path, rule):
    path = write_solver(tmp_path, rule)
    solver_class = getattr(caffe, CLASSES[rule])
    solver = solver_class(path)
    assert isinstance(solver, caffe.SGDSolver)  # as in pycaffe, every class is an SGDSolver
    solver.step(2)
    assert solver.iter == 2
    assert type(caffe.get_solver(path)) is solver_class
    reference = caffe.get_solver(path)
    reference.step(2)
    np.testing.assert_array_equal(reference.net.params["ip"][0].data,
                                  solver.net.params["ip"][0].data)


def test_the_class_not_the_file_decides_the_rule(tmp_path):
    path = write_solver(tmp_path, "Adam")
    sgd = caffe.SGDSolver(path)
    adam = caffe.AdamSolver(path)
    assert type(sgd).update_elements is not type(adam).update_elements
    sgd.step(1)
    adam.step(1)
    assert not np.array_equal(sgd.net.params["ip"][0].data, adam.net.params["ip"][0].data)


def test_python_layers_in_solver_nets_follow_allow_python(tmp_path):
    path = write_solver(tmp_path)
    net = (tmp_path / "net.prototxt").read_text()
    (tmp_path / "net.prototxt").write_text(net.replace(
        "layer { type: 'SoftmaxWithLoss'",
        "layer { type: 'Python' name: 'py' bottom: 'ip' top: 'ip2' python_param { "
        "module: 'no_such_module_for_moka' layer: 'X' } }\nlayer { type: 'SoftmaxWithLoss'"))
    with pytest.raises(caffe.MokaError, match="allow"):
        caffe.SGDSolver(path)
    with pytest.raises(caffe.MokaError, match="no_such_module_for_moka"):
        caffe.SGDSolver(path, allow_python=True)  # allowed: now the import is what fails


def test_nccl_callback_is_inert_as_in_a_cpu_build(tmp_path):
    solver = caffe.SGDSolver(write_solver(tmp_path))
    nccl = caffe.NCCL(solver, b"uid")
    solver.add_callback(nccl)
    solver.net.after_backward(nccl)
    solver.step(1)
    assert solver.iter == 1


def test_solver_names_are_listed_on_engine():
    assert {"SGDSolver", "AdamSolver", "get_solver", "Classifier", "io"} <= set(dir(caffe))
