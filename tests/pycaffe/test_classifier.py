"""caffe.Classifier on a LeNet trained here with caffe.SGDSolver; caffe.Detector; the
``engine classify`` / ``engine detect`` tools (Caffe's python/classify.py and detect.py)."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine as caffe
from engine.cli import main
from engine.data.datum import datum_to_array, parse_datum
from engine.data.db import read_lmdb
from engine.errors import MokaError
from engine.io import read_solver_param, write_text

ROOT = Path(__file__).resolve().parents[2]
LENET = ROOT / "models" / "lenet"
TRAIN_ITERS = 200

TINY_RGB = """name: 'tiny_rgb'
layer { type: 'Input' name: 'data' top: 'data'
  input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 4 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { type: 'Softmax' name: 'prob' bottom: 'ip' top: 'prob' }
"""


def one_blas_thread():
    """A single BLAS thread: this small net gains nothing from more on a shared machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@pytest.fixture(scope="module")
def lenet_weights(tmp_path_factory) -> str:
    """The shipped LeNet trained for a few hundred iterations through pycaffe's SGDSolver."""
    folder = tmp_path_factory.mktemp("lenet")
    with pytest.MonkeyPatch.context() as patch, one_blas_thread():
        patch.chdir(ROOT)  # the example's data paths are relative to the repository root
        param = read_solver_param("models/lenet/lenet_solver.prototxt")
        param.snapshot = 0
        param.display = 0
        param.test_interval = 10 * TRAIN_ITERS
        param.snapshot_prefix = str(folder / "lenet")
        write_text(param, folder / "solver.prototxt")
        solver = caffe.SGDSolver(str(folder / "solver.prototxt"))
        solver.step(TRAIN_ITERS)
    weights = str(folder / "lenet.caffemodel")
    solver.net.save(weights)
    return weights


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits as H x W x 1 images scaled as the Data layer scales them."""
    datums = [parse_datum(value) for _, value in read_lmdb(str(LENET / "digits_test_lmdb"))]
    images = np.stack([datum_to_array(d) for d in datums]).transpose(0, 2, 3, 1) / 256.0
    return images.astype(np.float32), np.array([d.label for d in datums])


@pytest.fixture(scope="module")
def tiny_rgb(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tiny")
    model = folder / "tiny.prototxt"
    model.write_text(TINY_RGB)
    caffe.set_random_seed(17)
    weights = str(folder / "tiny.caffemodel")
    caffe.Net(str(model), caffe.TEST).save(weights)
    return str(model), weights


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    pixels = (np.random.default_rng(5).random((20, 16, 3)) * 255).astype(np.uint8)
    path = str(tmp_path_factory.mktemp("img") / "photo.png")
    Image.fromarray(pixels).save(path)
    return path


# -- Classifier ----------------------------------------------------------------------------------
def test_classifier_recognises_held_out_digits(lenet_weights, digits):
    images, labels = digits
    classifier = caffe.Classifier(str(LENET / "lenet.prototxt"), lenet_weights,
                                  image_dims=(8, 8))
    probs = classifier.predict(list(images[:60]), oversample=False)
    assert probs.shape == (60, 10)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    accuracy = float(np.mean(probs.argmax(1) == labels[:60]))
    assert accuracy >= 0.9, accuracy


def test_oversampled_prediction_averages_the_ten_crops(lenet_weights, digits):
    images, _ = digits
    classifier = caffe.Classifier(str(LENET / "lenet.prototxt"), lenet_weights,
                                  image_dims=(10, 10))
    probs = classifier.predict(list(images[:3]))
    assert probs.shape == (3, 10)
    net = caffe.Net(str(LENET / "lenet.prototxt"), caffe.TEST, weights=lenet_weights)
    resized = np.stack([caffe.io.resize_image(im, (10, 10)) for im in images[:3]])
    crops = caffe.io.oversample(resized, (8, 8)).transpose(0, 3, 1, 2)
    per_crop = net.forward_all(data=crops)["prob"]
    np.testing.assert_allclose(probs, per_crop.reshape(3, 10, 10).mean(1), rtol=1e-5,
                               atol=1e-7)


def test_classifier_configures_its_transformer(tiny_rgb):
    model, weights = tiny_rgb
    mean = np.array([0.1, 0.2, 0.3])
    classifier = caffe.Classifier(model, weights, mean=mean, input_scale=2.0, raw_scale=255.0,
                                  channel_swap=(2, 1, 0))
    t = classifier.transformer
    assert t.transpose["data"] == (2, 0, 1)
    assert t.channel_swap["data"] == (2, 1, 0)
    assert (t.raw_scale["data"], t.input_scale["data"]) == (255.0, 2.0)
    np.testing.assert_array_equal(t.mean["data"].ravel(), mean)
    np.testing.assert_array_equal(classifier.image_dims, (6, 6))


# -- Detector ------------------------------------------------------------------------------------
def test_detect_windows_classifies_each_warped_window(tiny_rgb, photo):
    model, weights = tiny_rgb
    detector = caffe.Detector(model, weights, raw_scale=255.0, channel_swap=(2, 1, 0))
    windows = np.array([[2, 3, 10, 12], [0, 0, 20, 16], [5, 5, 9, 9]])
    detections = detector.detect_windows([(photo, windows)])
    assert [d["filename"] for d in detections] == [photo] * 3
    image = caffe.io.load_image(photo)
    for d, (y0, x0, y1, x1) in zip(detections, windows, strict=True):
        caffe_in = detector.transformer.preprocess("data", image[y0:y1, x0:x1])
        expected = detector.forward_all(data=caffe_in[None])["prob"][0]
        np.testing.assert_allclose(d["prediction"], expected, rtol=1e-5, atol=1e-7)


def test_context_pad_fills_off_image_context_with_the_mean(tiny_rgb, photo):
    model, weights = tiny_rgb
    detector = caffe.Detector(model, weights, mean=np.array([30.0, 60.0, 90.0]),
                              raw_scale=255.0, channel_swap=(2, 1, 0), context_pad=1)
    image = caffe.io.load_image(photo)
    # crop 6, pad 1: the box grows by 6/4; window (0, 0, 7, 7) becomes (-2, -2, 10, 10), so the
    # first round(2 * 6/13) = 1 row and column are context beyond the image: the mean, in the
    # image's RGB order and [0, 1] range.
    crop = detector.crop(image, np.array([0, 0, 7, 7]))
    assert crop.shape == (6, 6, 3)
    np.testing.assert_allclose(crop[0], np.tile([90 / 255, 60 / 255, 30 / 255], (6, 1)),
                               rtol=1e-6)
    np.testing.assert_allclose(crop[:, 0], np.tile([90 / 255, 60 / 255, 30 / 255], (6, 1)),
                               rtol=1e-6)
    inside = detector.crop(image, np.array([6, 5, 12, 11]))
    assert inside.shape == (6, 6, 3)
    assert inside.min() >= 0
    assert inside.max() <= 1


def test_a_window_off_the_image_is_reported_with_its_file(tiny_rgb, photo):
    model, weights = tiny_rgb
    detector = caffe.Detector(model, weights, context_pad=1)
    with pytest.raises(MokaError, match=r"photo.*\(500, 500, 510, 510\) lies outside"):
        detector.detect_windows([(photo, [[500, 500, 510, 510]])])


def test_selective_search_says_what_is_missing(tiny_rgb, photo):
    detector = caffe.Detector(*tiny_rgb)
    with pytest.raises(MokaError, match="detect_windows"):
        detector.detect_selective_search([photo])


# -- engine classify / engine detect -------------------------------------------------------------
def run(*argv: str) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(argv))
    assert rc == 0, err.getvalue()[-2000:]
    return err.getvalue()


def test_engine_classify_writes_the_predictions(lenet_weights, digits, tmp_path):
    images, _ = digits
    np.save(tmp_path / "in.npy", images[:5])
    out = tmp_path / "out.npy"
    run("classify", str(tmp_path / "in.npy"), str(out), "--model_def",
        str(LENET / "lenet.prototxt"), "--pretrained_model", lenet_weights, "--images_dim",
        "8,8", "--mean_file", "", "--raw_scale", "1", "--channel_swap", "", "--center_only")
    classifier = caffe.Classifier(str(LENET / "lenet.prototxt"), lenet_weights,
                                  image_dims=(8, 8), raw_scale=1.0)
    np.testing.assert_allclose(np.load(out), classifier.predict(list(images[:5]), False),
                               rtol=1e-6)


def test_engine_classify_reads_a_folder_of_images(tiny_rgb, photo, tmp_path):
    model, weights = tiny_rgb
    out = tmp_path / "out.npy"
    run("classify", str(Path(photo).parent), str(out), "--model_def", model,
        "--pretrained_model", weights, "--mean_file", "", "--images_dim", "8,8", "--ext", "png")
    assert np.load(out).shape == (1, 4)


def test_engine_detect_writes_csv(tiny_rgb, photo, tmp_path):
    model, weights = tiny_rgb
    windows = tmp_path / "windows.csv"
    windows.write_text(f"filename,xmin,ymin,xmax,ymax\n{photo},3,2,12,10\n{photo},0,0,16,20\n")
    out = tmp_path / "detections.csv"
    run("detect", str(windows), str(out), "--model_def", model, "--pretrained_model", weights,
        "--mean_file", "", "--crop_mode", "list", "--context_pad", "0")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["ymin"], r["xmin"], r["ymax"], r["xmax"]) for r in rows] == [
        ("2", "3", "10", "12"), ("0", "0", "20", "16")]
    detector = caffe.Detector(model, weights, raw_scale=255.0, channel_swap=(2, 1, 0),
                              context_pad=0)
    expected = detector.detect_windows([(photo, np.array([[2, 3, 10, 12], [0, 0, 20, 16]]))])
    for row, d in zip(rows, expected, strict=True):
        got = [float(row[f"class{i}"]) for i in range(4)]
        np.testing.assert_allclose(got, d["prediction"], rtol=1e-6)


def test_engine_detect_reports_a_missing_model(tmp_path):
    windows = tmp_path / "w.csv"
    windows.write_text("filename,ymin,xmin,ymax,xmax\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["detect", str(windows), str(tmp_path / "o.csv"), "--crop_mode", "list",
                   "--model_def", str(tmp_path / "missing.prototxt")])
    assert rc == 1
    assert "--model_def" in err.getvalue()


def test_engine_detect_writes_hdf5_without_pandas(tiny_rgb, photo, tmp_path):
    import h5py

    model, weights = tiny_rgb
    windows = tmp_path / "windows.csv"
    windows.write_text(f"filename,ymin,xmin,ymax,xmax\n{photo},2,3,10,12\n")
    out = tmp_path / "detections.h5"
    run("detect", str(windows), str(out), "--model_def", model, "--pretrained_model", weights,
        "--mean_file", "", "--crop_mode", "list", "--context_pad", "0")
    with h5py.File(out, "r") as f:
        assert f["filename"][0].decode() == photo
        np.testing.assert_array_equal(f["window"][()], [[2, 3, 10, 12]])
        assert f["prediction"].shape == (1, 4)
        np.testing.assert_allclose(f["prediction"][0].sum(), 1, rtol=1e-5)
