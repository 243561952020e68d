"""DenseImageData (SegNet/ENet): PNG image and label pairs written into tmp_path; shapes, values,
resizes (OpenCV's nearest for labels), shared mirror and crop, determinism, resume, errors.
The layer has no bottoms and no parameters, so there is no gradient to check."""

from __future__ import annotations

import numpy as np
import pytest
from layer_helpers import forward_tops, make_layer
from PIL import Image

from engine.errors import DataError, LayerError
from engine.layers.dense_image_data import resize_nearest
from engine.layers.image_data import resize_linear

RNG = np.random.default_rng(4)
N = 5
RGB = RNG.integers(0, 256, (N, 6, 8, 3), dtype=np.uint8)  # HWC, RGB as files hold them
# each label image is the blue channel of its image, so alignment is visible pixel by pixel
LABELS = RGB[..., 2].copy()


@pytest.fixture
def source(tmp_path):
    lines = []
    for i in range(N):
        Image.fromarray(RGB[i], "RGB").save(tmp_path / f"im{i}.png")
        Image.fromarray(LABELS[i], "L").save(tmp_path / f"lab{i}.png")
        lines.append(f"im{i}.png lab{i}.png\n")
    (tmp_path / "list.txt").write_text("".join(lines))
    return str(tmp_path / "list.txt"), str(tmp_path) + "/"


def dense_layer(source, batch=2, extra="", transform="", seed=0, phase=0):
    path, root = source
    text = (f'type: "DenseImageData" top: "data" top: "label" dense_image_data_param {{ '
            f'source: "{path}" root_folder: "{root}" batch_size: {batch} {extra} }} {transform}')
    return make_layer(text, [], n_top=2, seed=seed, phase=phase)


def bgr(i: int) -> np.ndarray:
    return RGB[i][:, :, ::-1].transpose(2, 0, 1).astype(np.float64)


def test_shapes_and_values_in_list_order(source):
    layer, top = dense_layer(source, batch=2, transform="transform_param { scale: 0.5 "
                             "mean_value: 10 mean_value: 20 mean_value: 30 }")
    assert top[0].shape == (2, 3, 6, 8) and top[1].shape == (2, 1, 6, 8)
    for batch in range(3):  # wraps after item 4
        data, label = forward_tops(layer, top)
        for k in range(2):
            i = (2 * batch + k) % N
            expected = (bgr(i) - np.array([10, 20, 30])[:, None, None]) * 0.5
            np.testing.assert_allclose(data[k], expected, rtol=1e-6)
            np.testing.assert_array_equal(label[k, 0], LABELS[i])  # no mean, no scale


def test_resize_linear_for_images_and_nearest_for_labels(source):
    layer, top = dense_layer(source, batch=1, extra="new_height: 9 new_width: 5")
    data, label = forward_tops(layer, top)
    assert data.shape == (1, 3, 9, 5) and label.shape == (1, 1, 9, 5)
    np.testing.assert_array_equal(data[0], resize_linear(bgr(0).astype(np.uint8), 9, 5))
    np.testing.assert_array_equal(label[0], resize_nearest(LABELS[0][None], 9, 5))


@pytest.mark.parametrize(("height", "width"), [(9, 5), (3, 4), (12, 16), (7, 13), (1, 1)])
def test_resize_nearest_matches_opencv(height, width):
    cv2 = pytest.importorskip("cv2")
    theirs = cv2.resize(LABELS[1], (width, height), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(resize_nearest(LABELS[1][None], height, width)[0], theirs)


def test_label_divide_factor_halves_the_label(source):
    layer, top = dense_layer(source, batch=1, extra="new_height: 6 new_width: 8 "
                             "label_divide_factor: 2")
    _, label = forward_tops(layer, top)
    assert top[0].shape == (1, 3, 6, 8) and label.shape == (1, 1, 3, 4)
    np.testing.assert_array_equal(label[0], resize_nearest(LABELS[0][None], 3, 4))


def test_mirror_and_crop_move_image_and_label_together(source):
    layer, top = dense_layer(source, batch=N, extra="mirror: true crop_height: 4 "
                             "crop_width: 5 shuffle: true", seed=3)
    assert top[0].shape == (N, 3, 4, 5) and top[1].shape == (N, 1, 4, 5)
    seen_flips, seen_offsets = set(), set()
    for _ in range(4):
        data, label = forward_tops(layer, top)
        np.testing.assert_array_equal(label[:, 0], data[:, 0])  # blue channel == label
        for crop in label[:, 0]:
            for i in range(N):
                for flip in (False, True):
                    full = LABELS[i][:, ::-1] if flip else LABELS[i]
                    for h, w in np.ndindex(3, 4):
                        if np.array_equal(full[h:h + 4, w:w + 5], crop):
                            seen_flips.add(flip)
                            seen_offsets.add((h, w))
    assert seen_flips == {False, True}
    assert len(seen_offsets) > 3


def test_same_seed_same_batches_and_resume(source):
    extra = "mirror: true crop_height: 4 crop_width: 6 shuffle: true"
    layer, top = dense_layer(source, batch=2, extra=extra, seed=5)
    straight = [forward_tops(layer, top) for _ in range(6)]
    again, top2 = dense_layer(source, batch=2, extra=extra, seed=5)
    for batch in straight[:3]:
        data, label = forward_tops(again, top2)
        np.testing.assert_array_equal(data, batch[0])
        np.testing.assert_array_equal(label, batch[1])
    state, rng_state = again.get_state(), again.rng.bit_generator.state
    resumed, top3 = dense_layer(source, batch=2, extra=extra, seed=99)
    resumed.set_state(state)
    resumed.rng.bit_generator.state = rng_state
    for batch in straight[3:]:
        data, label = forward_tops(resumed, top3)
        np.testing.assert_array_equal(data, batch[0])
        np.testing.assert_array_equal(label, batch[1])


def test_shuffle_visits_every_pair_each_epoch(source):
    layer, top = dense_layer(source, batch=1, extra="shuffle: true", seed=1)
    for _ in range(2):
        firsts = {int(forward_tops(layer, top)[1][0, 0, 0, 0]) for _ in range(N)}
        assert firsts == {int(LABELS[i][0, 0]) for i in range(N)}


@pytest.mark.parametrize(("extra", "transform", "match"), [
    ("", "transform_param { mirror: true }", "use dense_image_data_param's mirror"),
    ("", "transform_param { crop_size: 4 }", "use dense_image_data_param's mirror"),
    ("new_height: 4", "", "new_height and new_width together"),
    ("crop_height: 4", "", "crop_height and crop_width together"),
    ("label_divide_factor: 2", "", "label_divide_factor needs new_height"),
    ("crop_height: 7 crop_width: 4", "", "crop 7x4 is larger than the 6x8 image"),
])
def test_parameter_errors(source, extra, transform, match):
    with pytest.raises(LayerError, match=match):
        dense_layer(source, extra=extra, transform=transform)


def test_list_and_file_errors(tmp_path, source):
    root = source[1]
    bad = tmp_path / "bad.txt"
    bad.write_text("im0.png\n")
    with pytest.raises(DataError, match=r"line 1 of .* expected 'image_path label_image_path'"):
        dense_layer((str(bad), root))
    bad.write_text("im0.png missing.png\n")
    with pytest.raises(DataError, match=r"could not load .*missing\.png.*no such file"):
        dense_layer((str(bad), root))
    Image.fromarray(LABELS[0][:5], "L").save(tmp_path / "short.png")
    bad.write_text("im0.png short.png\n")
    with pytest.raises(DataError, match="is 5x8 but its image needs 6x8"):
        dense_layer((str(bad), root))
