"""ImageData: PNG files and a list file written into tmp_path by the tests.

The layer has no bottoms and no parameters, so there is no gradient to check.
"""

from __future__ import annotations

import numpy as np
import pytest
from layer_helpers import forward_tops, make_layer
from PIL import Image

from engine.errors import DataError, LayerError
from engine.layer import TEST
from engine.layers.image_data import resize_linear

RNG = np.random.default_rng(3)
N = 5
RGB = RNG.integers(0, 256, (N, 6, 4, 3), dtype=np.uint8)  # HWC, RGB as files hold them
LABELS = [3, 1, 4, 1, 5]


def write_images(folder, names=None) -> list[str]:
    names = names or [f"im {i}.png" for i in range(N)]  # a space in the path on purpose
    for name, image in zip(names, RGB, strict=True):
        Image.fromarray(image, "RGB").save(folder / name)
    return names


def write_list(path, names, labels=LABELS) -> str:
    path.write_text("".join(f"{n} {lab}\n" for n, lab in zip(names, labels, strict=True)))
    return str(path)


@pytest.fixture
def source(tmp_path):
    names = write_images(tmp_path)
    return write_list(tmp_path / "list.txt", names), str(tmp_path) + "/"


def image_layer(source, root, batch=2, extra="", transform="", seed=0, phase=0):
    text = (f'type: "ImageData" top: "data" top: "label" image_data_param {{ source: '
            f'"{source}" root_folder: "{root}" batch_size: {batch} {extra} }} {transform}')
    return make_layer(text, [], n_top=2, seed=seed, phase=phase)


def bgr(i: int) -> np.ndarray:
    return RGB[i][:, :, ::-1].transpose(2, 0, 1).astype(np.float64)


def gray(i: int) -> np.ndarray:
    # libpng's fixed-point luma, as OpenCV's imread(GRAYSCALE) of a PNG
    weights = np.array([9797, 19234, 3737])
    return ((RGB[i].astype(np.int64) @ weights) >> 15)[None].astype(np.float64)


@pytest.mark.parametrize("extra, transform, shape", [
    ("", "", (2, 3, 6, 4)),
    ("is_color: false", "", (2, 1, 6, 4)),
    ("new_height: 9 new_width: 5", "", (2, 3, 9, 5)),
    ("", "transform_param { crop_size: 3 }", (2, 3, 3, 3)),
])
def test_shapes(source, extra, transform, shape):
    layer, top = image_layer(*source, extra=extra, transform=transform)
    assert top[0].shape == shape and top[1].shape == (2,)
    forward_tops(layer, top)
    assert top[0].shape == shape


@pytest.mark.parametrize("is_color, expected", [(True, bgr), (False, gray)])
def test_pixels_labels_and_wrap(source, is_color, expected):
    layer, top = image_layer(*source, extra=f"is_color: {str(is_color).lower()}")
    seen = [forward_tops(layer, top) for _ in range(3)]  # 6 images from a list of 5: wraps
    order = [0, 1, 2, 3, 4, 0]
    data = np.concatenate([d for d, _ in seen])
    labels = np.concatenate([lab for _, lab in seen])
    np.testing.assert_array_equal(data, np.stack([expected(i) for i in order]))
    np.testing.assert_array_equal(labels, [LABELS[i] for i in order])
    assert layer.get_state()["epoch"] == 1 and layer.get_state()["cursor"] == 1


def test_transform_scale_and_mean(source):
    layer, top = image_layer(*source, transform="transform_param { scale: 0.5 "
                             "mean_value: 1 mean_value: 2 mean_value: 3 }")
    data, _ = forward_tops(layer, top)
    mean = np.array([1.0, 2.0, 3.0])[:, None, None]
    np.testing.assert_allclose(data, np.stack([(bgr(i) - mean) * 0.5 for i in (0, 1)]))


def naive_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV INTER_LINEAR written out per pixel: centre-aligned, clamped, 11-bit weights."""
    channels, src_h, src_w = image.shape
    out = np.zeros((channels, height, width), np.uint8)

    def tap(d, src, dst):
        f = np.float32((d + 0.5) * (src / dst) - 0.5)
        s = int(np.floor(f))
        w0 = int(np.rint((1 - (f - np.float32(s))) * 2048))
        return min(max(s, 0), src - 1), min(max(s + 1, 0), src - 1), w0

    for y in range(height):
        y0, y1, b0 = tap(y, src_h, height)
        for x in range(width):
            x0, x1, a0 = tap(x, src_w, width)
            for c in range(channels):
                r0 = int(image[c, y0, x0]) * a0 + int(image[c, y0, x1]) * (2048 - a0)
                r1 = int(image[c, y1, x0]) * a0 + int(image[c, y1, x1]) * (2048 - a0)
                out[c, y, x] = (r0 * b0 + r1 * (2048 - b0) + (1 << 21)) >> 22
    return out


@pytest.mark.parametrize("height, width", [(9, 5), (3, 2), (6, 7), (4, 4)])
def test_resize_matches_opencv_rule(height, width):
    image = RNG.integers(0, 256, (3, 6, 4), dtype=np.uint8)
    np.testing.assert_array_equal(resize_linear(image, height, width),
                                  naive_resize(image, height, width))


def test_resize_upscale_close_to_pillow_bilinear():
    # Same geometry as Pillow's bilinear when enlarging; rounding may differ by one level.
    image = RNG.integers(0, 256, (1, 5, 4), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(image[0]).resize((11, 13), Image.BILINEAR))
    assert np.abs(resize_linear(image, 13, 11)[0].astype(int) - pil).max() <= 1


def test_layer_resizes(source):
    layer, top = image_layer(*source, extra="new_height: 8 new_width: 3")
    data, _ = forward_tops(layer, top)
    expected = resize_linear(RGB[0][:, :, ::-1].transpose(2, 0, 1).copy(), 8, 3)
    np.testing.assert_array_equal(data[0], expected)


def test_shuffle_is_a_permutation_per_epoch(source):
    layer, top = image_layer(*source, batch=5, extra="shuffle: true", seed=4)
    epochs = []
    for _ in range(3):
        data, labels = forward_tops(layer, top)
        index = [next(i for i in range(N) if np.array_equal(bgr(i), d)) for d in data]
        assert sorted(index) == list(range(N))
        np.testing.assert_array_equal(labels, [LABELS[i] for i in index])
        epochs.append(index)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled at the wraps


def test_rand_skip_starts_inside_the_list(source):
    layer, top = image_layer(*source, batch=1, extra="rand_skip: 4", seed=1)
    skip = layer.get_state()["cursor"]
    assert 0 <= skip < 4
    data, _ = forward_tops(layer, top)
    np.testing.assert_array_equal(data[0], bgr(skip))


def test_resume_with_state(source):
    layer, top = image_layer(*source, batch=3, extra="shuffle: true", seed=2,
                             transform="transform_param { mirror: true crop_size: 3 }")
    forward_tops(layer, top)
    state = layer.get_state()
    rng_state = layer.rng.bit_generator.state
    expected = [forward_tops(layer, top) for _ in range(3)]
    other, other_top = image_layer(*source, batch=3, extra="shuffle: true", seed=9,
                                   transform="transform_param { mirror: true crop_size: 3 }")
    other.set_state(state)
    other.rng.bit_generator.state = rng_state
    for want in expected:
        got = forward_tops(other, other_top)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_test_phase_center_crop(source):
    layer, top = image_layer(*source, transform="transform_param { crop_size: 2 }", phase=TEST)
    data, _ = forward_tops(layer, top)
    np.testing.assert_array_equal(data[0], bgr(0)[:, 2:4, 1:3])


@pytest.mark.parametrize("content, message", [
    (None, "cannot read the image list"),
    ("\n\n", "is empty"),
    ("im 0.png three\n", "line 1"),
    ("im 0.png 1\nmissing.png 2\n", "line 2"),
])
def test_errors(tmp_path, content, message):
    write_images(tmp_path)
    path = tmp_path / "list.txt"
    if content is not None:
        path.write_text(content)
    layer_args = (str(path), str(tmp_path) + "/")
    with pytest.raises(DataError, match=message):
        layer, top = image_layer(*layer_args, batch=2)
        forward_tops(layer, top)


def test_error_missing_image_names_file_and_line(tmp_path):
    write_list(tmp_path / "list.txt", ["gone.png"], [0])
    with pytest.raises(DataError, match=r"gone\.png.*line 1"):
        image_layer(str(tmp_path / "list.txt"), str(tmp_path) + "/")


def test_error_half_resize(source):
    with pytest.raises(LayerError, match="new_height and new_width together"):
        image_layer(*source, extra="new_height: 4")
