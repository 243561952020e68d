"""engine.parallel: batch ranges on threads; conv, pool and ReLU give bit-identical results for
any thread count (exact resume depends on it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import threadpoolctl
from layer_helpers import blob_of, make_layer

from engine import depthwise_kernels, kernels, parallel
from engine.layers import normalization
from engine.layers import pooling as pooling_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def threads(monkeypatch):
    """Set the thread count (even tiny arrays are split); restored afterwards."""
    monkeypatch.setattr(parallel, "MIN_THREAD_WORK", 1)
    previous = parallel.num_threads()

    def use(n: int) -> None:
        parallel.set_num_threads(n)

    yield use
    parallel.set_num_threads(previous)


@pytest.mark.parametrize(("n_threads", "n", "block_work", "expected_workers"), [
    (1, 10, None, {0}), (2, 10, None, {0, 1}), (3, 10, 2, {0, 1, 2}), (4, 3, None, {0, 1, 2}),
    (2, 1, None, {0}),
])
def test_ranges_cover_the_batch_once(threads, n_threads, n, block_work, expected_workers):
    threads(n_threads)
    calls = []
    parallel.for_batch_blocks(lambda w, a, b: calls.append((w, a, b)), n, 1, block_work)
    covered = sorted(i for _, a, b in calls for i in range(a, b))
    assert covered == list(range(n))
    assert {w for w, _, _ in calls} == expected_workers
    if block_work:
        assert max(b - a for _, a, b in calls) <= block_work


def test_little_work_stays_on_the_calling_thread(monkeypatch):
    previous = parallel.set_num_threads(4)
    try:
        names = []
        parallel.for_batch_chunks(lambda a, b: names.append(threading.current_thread().name),
                                  8, parallel.MIN_THREAD_WORK // 8)
        assert names == [threading.current_thread().name]
    finally:
        parallel.set_num_threads(previous)


def test_errors_reach_the_caller_after_every_range_ran(threads):
    threads(2)
    done = []

    def fn(start, stop):
        if start == 0:
            raise ValueError("boom")
        done.append(start)

    with pytest.raises(ValueError, match="boom"):
        parallel.for_batch_chunks(fn, 4, 1)
    assert done == [2]


def test_nested_calls_run_inline(threads):
    threads(2)
    inner = []

    def outer(start, stop):
        parallel.for_batch_chunks(lambda a, b: inner.append((start, a, b)), stop - start, 1)

    parallel.for_batch_chunks(outer, 4, 1)
    assert sorted(inner) == [(0, 0, 2), (2, 0, 2)]


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("0", 1), (" 2 ", 2)])
def test_thread_count_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("MOKA_NUM_THREADS", value)
    assert parallel._threads_from_environment() == expected


def test_bad_thread_count_is_an_error(monkeypatch):
    monkeypatch.setenv("MOKA_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="MOKA_NUM_THREADS"):
        parallel._threads_from_environment()


def run_layer(text: str, x: np.ndarray, dy_seed: int = 1):
    """Forward and backward in float32; returns (top data, bottom diff, param diffs)."""
    bottom = blob_of(x, np.float32)
    layer, top = make_layer(text, [bottom], dtype=np.float32, seed=3)
    layer.forward([bottom], top)
    top[0].diff[...] = np.random.default_rng(dy_seed).standard_normal(top[0].shape)
    for blob in layer.blobs:
        blob.diff[...] = 0
    layer.backward(top, [True], [bottom])
    return top[0].data.copy(), bottom.diff.copy(), [b.diff.copy() for b in layer.blobs]


LAYERS = [
    'type: "Convolution" convolution_param { num_output: 6 kernel_size: 3 pad: 1 '
    'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
    'type: "Convolution" convolution_param { num_output: 4 kernel_size: 5 pad: 2 group: 2 '
    'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
    'type: "Convolution" convolution_param { num_output: 4 kernel_size: 2 stride: 2 '
    'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
    'type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 4 '
    'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }',  # depthwise
    'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }',
    'type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }',
    'type: "ReLU"',
    'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }',
]


@pytest.mark.parametrize("text", LAYERS)
def test_results_do_not_depend_on_the_thread_count(threads, monkeypatch, text):
    monkeypatch.setattr(pooling_module, "POOL_BLOCK_WORK", 200)  # several blocks per thread
    monkeypatch.setattr(kernels, "CONV_BLOCK_BYTES", 20000)  # convolution over batch blocks
    monkeypatch.setattr(kernels, "DW_BLOCK_INNER", 250)  # weight gradient from blocks of 2-3
    monkeypatch.setattr(normalization, "LRN_BLOCK_WORK", 600)
    monkeypatch.setattr(depthwise_kernels, "BLOCK_WORK", 250)  # planes in blocks of 2
    # integers in the input make ties, so the max pool's first-maximum rule is exercised too
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (7, 4, 11, 10)) + rng.standard_normal((7, 4, 11, 10)) * (rng.random(
        (7, 4, 11, 10)) < 0.5)
    runs = []
    for n in (1, 2, 3):
        threads(n)
        runs.append(run_layer(text, x))
    for other in runs[1:]:
        np.testing.assert_array_equal(other[0], runs[0][0])
        np.testing.assert_array_equal(other[1], runs[0][1])
        for a, b in zip(other[2], runs[0][2], strict=True):
            np.testing.assert_array_equal(a, b)


def blas_threads() -> set[int]:
    return {info["num_threads"] for info in threadpoolctl.threadpool_info()
            if info["user_api"] == "blas"}


def test_blocks_run_with_one_blas_thread_each_and_blas_gets_its_count_back(threads):
    threads(2)
    seen = {}

    def run(worker: int, start: int, stop: int) -> None:
        with parallel.single_threaded_blas():  # nested: leaves the count to the outermost
            pass
        seen[worker] = (start, stop, blas_threads())
    parallel.for_each_block(run, 3)
    assert sorted(seen.values()) == [(0, 1, {1}), (1, 3, {1})]
    assert blas_threads() == {2}
    seen.clear()
    threads(1)
    parallel.for_each_block(run, 3)
    assert list(seen.values()) == [(0, 3, {1})]


# -- one thread configuration, however numpy and engine are imported --------------------------
def thread_configuration_of(code: str, **env: str) -> dict:
    """``parallel.thread_configuration()`` in a fresh interpreter that first runs ``code``."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("MOKA_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT")}
    environment.update(env, PYTHONPATH=str(REPO))
    script = f"{code}\nimport json\nfrom engine import parallel\n" \
             "print(json.dumps(parallel.thread_configuration()))"
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True,
                          text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.splitlines()[-1])


def test_import_order_does_not_change_the_thread_configuration():
    engine_first = thread_configuration_of("import engine\nimport numpy")
    numpy_first = thread_configuration_of("import numpy\nimport engine")
    assert numpy_first == engine_first
    assert engine_first["moka_threads"] == min(parallel.usable_cpus(),
                                               parallel.DEFAULT_MAX_THREADS)
    assert [b["threads"] for b in engine_first["blas"]] == [parallel.usable_cpus()] * len(
        engine_first["blas"])
    if parallel.blas_thread_timeout() is not None:  # OpenBLAS: idle workers sleep soon
        assert engine_first["openblas_thread_timeout"] == int(parallel.BLAS_THREAD_TIMEOUT)


def test_moka_num_threads_sets_blas_too_whatever_blas_variables_say():
    for code in ("import numpy\nimport engine", "import engine"):
        got = thread_configuration_of(code, MOKA_NUM_THREADS="3", OPENBLAS_NUM_THREADS="1",
                                      OMP_NUM_THREADS="1")
        assert got["moka_threads"] == 3
        assert {b["threads"] for b in got["blas"]} <= {3}


def test_set_num_threads_sets_blas_threads():
    try:
        parallel.set_num_threads(1)
        config = parallel.thread_configuration()
        assert config["moka_threads"] == 1
        assert all(b["threads"] == 1 for b in config["blas"])
    finally:
        parallel.set_num_threads(None)
    assert parallel.blas_num_threads() == parallel._threads_from_environment()


def test_single_threaded_blas_restores_the_count():
    try:
        parallel.set_num_threads(2)
        with parallel.single_threaded_blas():
            assert all(b["threads"] == 1 for b in parallel.thread_configuration()["blas"])
        with pytest.raises(RuntimeError), parallel.single_threaded_blas():
            raise RuntimeError
        assert all(b["threads"] == 2 for b in parallel.thread_configuration()["blas"])
    finally:
        parallel.set_num_threads(None)


def test_threads_flag_sets_both_counts():
    from engine import cli

    try:
        for argv in (["device_query", "--threads", "1"], ["-threads", "1", "device_query"],
                     ["device_query", "-threads=1"]):
            parallel.set_num_threads(None)
            assert cli.main(argv) == 0
            assert parallel.num_threads() == parallel.blas_num_threads() == 1
        assert cli.main(["device_query", "--threads", "0"]) == 2
    finally:
        parallel.set_num_threads(None)
