"""Prefetching data layers: the next batch is read on a background thread, the batches (and the
random stream) are those of a run without prefetching, and exact resume holds with it on."""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest
from layer_helpers import make_layer
from PIL import Image

from engine.data import array_to_datum, prefetch, write_lmdb
from engine.layer import TEST, TRAIN

N = 7  # records; batches of 3 cross the end of the data (and of a file) at different places


@pytest.fixture(params=[True, False], ids=["prefetch", "no-prefetch"])
def prefetching(request):
    previous = prefetch.set_enabled(request.param)
    yield request.param
    prefetch.set_enabled(previous)


@pytest.fixture
def sources(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (N, 5, 6, 3), dtype=np.uint8)  # HWC
    write_lmdb(str(tmp_path / "db"), [
        (b"%03d" % i, array_to_datum(im.transpose(2, 0, 1), i).SerializeToString())
        for i, im in enumerate(images)])
    lines = []
    for i, im in enumerate(images):
        Image.fromarray(im, "RGB").save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png {i}\n")
    (tmp_path / "list.txt").write_text("".join(lines))
    files = []
    for name, rows in (("a.h5", 4), ("b.h5", 3)):
        with h5py.File(tmp_path / name, "w") as f:
            f["x"] = rng.normal(size=(rows, 2, 3))
            f["y"] = rng.normal(size=(rows,))
        files.append(str(tmp_path / name))
    (tmp_path / "h5.txt").write_text("\n".join(files) + "\n")
    return tmp_path


RANDOM = "transform_param { crop_size: 4 mirror: true scale: 0.5 }"
FIXED = "transform_param { crop_size: 4 mean_value: 10 mean_value: 20 mean_value: 30 }"


def layer_text(kind: str, folder, transform: str = RANDOM) -> str:
    if kind == "Data":
        return (f'type: "Data" top: "data" top: "label" {transform} '
                f'data_param {{ source: "{folder / "db"}" backend: LMDB batch_size: 3 }}')
    if kind == "ImageData":
        return (f'type: "ImageData" top: "data" top: "label" {transform} image_data_param {{ '
                f'source: "{folder / "list.txt"}" root_folder: "{folder}/" batch_size: 3 '
                "shuffle: true }")
    return (f'type: "HDF5Data" top: "x" top: "y" hdf5_data_param {{ '
            f'source: "{folder / "h5.txt"}" batch_size: 3 shuffle: true }}')


def run(layer, top, n: int) -> list[list[np.ndarray]]:
    batches = []
    for _ in range(n):
        layer.reshape([], top)
        layer.forward([], top)
        batches.append([blob.data.copy() for blob in top])
    return batches


def assert_same(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(("kind", "transform", "phase"), [
    ("Data", RANDOM, TRAIN), ("Data", FIXED, TEST), ("ImageData", RANDOM, TRAIN),
    ("ImageData", FIXED, TEST), ("HDF5Data", "", TRAIN)])
def test_batches_and_draws_do_not_depend_on_prefetching(sources, kind, transform, phase):
    runs = []
    for on in (False, True):
        previous = prefetch.set_enabled(on)
        try:
            layer, top = make_layer(layer_text(kind, sources, transform), [], n_top=2, seed=5,
                                    phase=phase)
            runs.append((run(layer, top, 6), layer.rng.bit_generator.state,
                         layer.get_state(), layer.prefetch.pending))
        finally:
            prefetch.set_enabled(previous)
    (plain, plain_rng, plain_state, plain_pending), (ahead, ahead_rng, ahead_state,
                                                     ahead_pending) = runs
    assert_same(ahead, plain)
    assert ahead_rng == plain_rng
    assert ahead_state == plain_state
    assert ahead_pending and not plain_pending


@pytest.mark.parametrize("kind", ["Data", "ImageData", "HDF5Data"])
def test_reads_run_on_a_background_thread(sources, kind, monkeypatch):
    previous = prefetch.set_enabled(True)
    threads: set[str] = set()
    original = prefetch._Job._run

    def spy(job):
        threads.add(threading.current_thread().name)
        original(job)

    monkeypatch.setattr(prefetch._Job, "_run", spy)
    try:
        layer, top = make_layer(layer_text(kind, sources), [], n_top=2, seed=5)
        run(layer, top, 3)
    finally:
        prefetch.set_enabled(previous)
    assert threads == {"moka-prefetch"}


@pytest.mark.parametrize("kind", ["Data", "ImageData", "HDF5Data"])
def test_exact_resume_with_prefetching(sources, kind, prefetching):
    """State saved while a batch is prefetched; restored into a layer whose own prefetched
    batch is somewhere else: the resumed batches are the uninterrupted run's."""
    layer, top = make_layer(layer_text(kind, sources), [], n_top=2, seed=5)
    run(layer, top, 2)
    state, rng_state = layer.get_state(), layer.rng.bit_generator.state
    expected = run(layer, top, 5)

    other, other_top = make_layer(layer_text(kind, sources), [], n_top=2, seed=8)
    run(other, other_top, 1)  # its prefetched batch is at another position
    other.set_state(state)
    other.rng.bit_generator.state = rng_state
    assert_same(run(other, other_top, 5), expected)


def test_a_read_error_reaches_the_forward_of_that_batch(sources):
    previous = prefetch.set_enabled(True)
    try:
        layer, top = make_layer(layer_text("ImageData", sources), [], n_top=2, seed=5)
        run(layer, top, 1)
        for path in sources.glob("*.png"):
            path.unlink()
        layer.prefetch.cancel()  # the read in flight may have started before the files went
        layer.prefetch.start((layer.cursor, layer.epoch),
                             lambda: layer._load_ahead(layer.cursor, layer.order))
        with pytest.raises(Exception, match="could not load"):
            run(layer, top, 1)
    finally:
        prefetch.set_enabled(previous)
