"""RNN, LSTM and LSTMUnit: Caffe's blob shapes and order, forward against naive per-step loops
written from Caffe's equations, the state carried between forwards, expose_hidden, float64
gradient checks on every bottom but cont and on every parameter, and errors."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer, random_blob

from engine.errors import LayerError
from engine.net import Net

FILLERS = ('weight_filler { type: "uniform" min: -0.8 max: 0.8 } '
           'bias_filler { type: "uniform" min: -0.5 max: 0.5 }')
T, N, H = 4, 3, 2
X_SHAPE = (T, N, 2, 2)  # each step of a stream holds I = 4 values
S_SHAPE = (N, 3)        # static input, S = 3

# cont: stream 0 is one sequence; stream 1 restarts at t = 2; stream 2 restarts at every step.
CONT = np.array([[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 0]], np.float64)


def text(kind: str, hidden: int = H, expose: bool = False) -> str:
    return (f'type: "{kind}" recurrent_param {{ num_output: {hidden} {FILLERS} '
            f'expose_hidden: {str(expose).lower()} }}')


def sig(v: float) -> float:
    return 1.0 / (1.0 + np.exp(-v))


def naive_lstm(x, cont, w_xc, b_c, w_hc, h0, c0, xs=None, w_s=None):
    """Caffe's unrolled LSTM, one stream and one hidden unit at a time."""
    steps, streams = cont.shape
    hidden = w_hc.shape[1]
    h, c = h0.copy(), c0.copy()
    out = np.zeros((steps, streams, hidden))
    for t in range(steps):
        for n in range(streams):
            gate = w_hc @ (cont[t, n] * h[n]) + w_xc @ x[t, n].ravel() + b_c
            if xs is not None:
                gate = gate + w_s @ xs[n].ravel()
            for d in range(hidden):
                i = sig(gate[d])
                f = 0.0 if cont[t, n] == 0 else cont[t, n] * sig(gate[hidden + d])
                o = sig(gate[2 * hidden + d])
                g = np.tanh(gate[3 * hidden + d])
                c[n, d] = f * c[n, d] + i * g
                h[n, d] = o * np.tanh(c[n, d])
            out[t, n] = h[n]
    return out, h, c


def naive_rnn(x, cont, w_xh, b_h, w_hh, w_ho, b_o, h0, xs=None, w_s=None):
    """Caffe's unrolled RNN, one stream at a time."""
    steps, streams = cont.shape
    h = h0.copy()
    out = np.zeros((steps, streams, w_ho.shape[0]))
    for t in range(steps):
        for n in range(streams):
            pre = w_hh @ (cont[t, n] * h[n]) + w_xh @ x[t, n].ravel() + b_h
            if xs is not None:
                pre = pre + w_s @ xs[n].ravel()
            h[n] = np.tanh(pre)
            out[t, n] = np.tanh(w_ho @ h[n] + b_o)
    return out, h


def bottoms(static: bool = False, hidden_states: int = 0, seed: int = 1):
    blobs = [random_blob(X_SHAPE, seed=seed), blob_of(CONT)]
    if static:
        blobs.append(random_blob(S_SHAPE, seed=seed + 1))
    for k in range(hidden_states):
        blobs.append(random_blob((1, N, H), seed=seed + 2 + k))
    return blobs


# -- shapes and the blob layout of Caffe's unrolled nets ---------------------------------------
@pytest.mark.parametrize("static", [False, True])
def test_lstm_blob_shapes_and_order(static):
    layer, top = make_layer(text("LSTM"), bottoms(static))
    expected = [(4 * H, 4), (4 * H,), (4 * H, 3), (4 * H, H)]  # W_xc, b_c, [W_xc_static], W_hc
    if not static:
        del expected[2]
    assert [b.shape for b in layer.blobs] == expected
    assert [t.shape for t in top] == [(T, N, H)]


@pytest.mark.parametrize("static", [False, True])
def test_rnn_blob_shapes_and_order(static):
    layer, top = make_layer(text("RNN", hidden=5), bottoms(static))
    # W_xh, b_h, [W_xh_static], W_hh, W_ho, b_o
    expected = [(5, 4), (5,)] + ([(5, 3)] if static else []) + [(5, 5), (5, 5), (5,)]
    assert [b.shape for b in layer.blobs] == expected
    assert [t.shape for t in top] == [(T, N, 5)]


def test_expose_hidden_adds_state_bottoms_and_tops():
    layer, top = make_layer(text("LSTM", expose=True), bottoms(static=True, hidden_states=2),
                            n_top=3)
    assert [t.shape for t in top] == [(T, N, H), (1, N, H), (1, N, H)]
    assert layer.n_bottom == (4, 5) and layer.n_top == (3, 3)
    rnn, top = make_layer(text("RNN", expose=True), bottoms(hidden_states=1), n_top=2)
    assert [t.shape for t in top] == [(T, N, H), (1, N, H)]
    assert rnn.n_bottom == (3, 4)
    assert not rnn.allow_force_backward(1) and rnn.allow_force_backward(0)


def test_stored_caffe_blobs_load_in_caffes_order():
    layer, _ = make_layer(text("LSTM"), bottoms())
    param = layer.param
    param.blobs.extend(b.to_proto() for b in layer.blobs)
    copy, _ = make_layer(str(param), bottoms())
    for a, b in zip(layer.blobs, copy.blobs, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    param.blobs[2].CopyFrom(layer.blobs[1].to_proto())  # b_c where W_hc belongs
    with pytest.raises(LayerError, match=r"parameter blob 2 should have shape \(8, 2\)"):
        make_layer(str(param), bottoms())


def unrolled_lstm(steps: int, streams: int, hidden: int) -> str:
    """Caffe's LSTMLayer::FillUnrolledNet with a static input, written out as a prototxt."""
    shape = (f"shape {{ dim: {steps} dim: {streams} dim: 2 dim: 2 }} "
             f"shape {{ dim: {steps} dim: {streams} }} shape {{ dim: {streams} dim: 3 }}")
    ip = f"type: 'InnerProduct' inner_product_param {{ num_output: {4 * hidden} axis: %d "
    lines = [
        f"force_backward: true layer {{ name: 'in' type: 'Input' top: 'x' top: 'cont' "
        f"top: 'x_static' input_param {{ {shape} }} }}",
        f"layer {{ name: 'h0' type: 'Input' top: 'c_0' top: 'h_0' input_param {{ shape {{ "
        f"dim: 1 dim: {streams} dim: {hidden} }} }} }}",
        "layer { name: 'cont_slice' type: 'Slice' slice_param { axis: 0 } bottom: 'cont' "
        + " ".join(f"top: 'cont_{t}'" for t in range(1, steps + 1)) + " }",
        "layer { name: 'x_transform' " + ip % 2 + "} param { name: 'W_xc' } "
        "param { name: 'b_c' } bottom: 'x' top: 'W_xc_x' }",
        "layer { name: 'W_xc_x_static' " + ip % 1 + "bias_term: false } "
        "param { name: 'W_xc_static' } bottom: 'x_static' top: 'W_xc_x_static_preshape' }",
        f"layer {{ name: 'W_xc_x_static_reshape' type: 'Reshape' reshape_param {{ shape {{ "
        f"dim: 1 dim: -1 dim: {4 * hidden} }} }} bottom: 'W_xc_x_static_preshape' "
        f"top: 'W_xc_x_static' }}",
        "layer { name: 'W_xc_x_slice' type: 'Slice' slice_param { axis: 0 } bottom: 'W_xc_x' "
        + " ".join(f"top: 'W_xc_x_{t}'" for t in range(1, steps + 1)) + " }",
    ]
    for t in range(1, steps + 1):
        lines += [
            f"layer {{ name: 'h_conted_{t - 1}' type: 'Scale' scale_param {{ axis: 0 }} "
            f"bottom: 'h_{t - 1}' bottom: 'cont_{t}' top: 'h_conted_{t - 1}' }}",
            f"layer {{ name: 'transform_{t}' " + ip % 2 + "bias_term: false } "
            f"param {{ name: 'W_hc' }} bottom: 'h_conted_{t - 1}' top: 'W_hc_h_{t - 1}' }}",
            f"layer {{ name: 'gate_input_{t}' type: 'Eltwise' bottom: 'W_hc_h_{t - 1}' "
            f"bottom: 'W_xc_x_{t}' bottom: 'W_xc_x_static' top: 'gate_input_{t}' }}",
            f"layer {{ name: 'unit_{t}' type: 'LSTMUnit' bottom: 'c_{t - 1}' "
            f"bottom: 'gate_input_{t}' bottom: 'cont_{t}' top: 'c_{t}' top: 'h_{t}' }}",
        ]
    lines.append("layer { name: 'h_concat' type: 'Concat' concat_param { axis: 0 } top: 'h' "
                 + " ".join(f"bottom: 'h_{t}'" for t in range(1, steps + 1)) + " }")
    return "\n".join(lines)


def test_lstm_matches_caffes_unrolled_net_of_moka_layers():
    """Same parameters (Caffe's unrolled net owns them in the LSTM layer's blob order), same
    outputs, same gradients for x, x_static and every parameter."""
    bottom = bottoms(static=True)
    layer, top = make_layer(text("LSTM"), bottom)
    net = Net(unrolled_lstm(T, N, H), dtype=np.float64)
    assert [b.shape for b in net.learnable_params] == [b.shape for b in layer.blobs]
    for mine, theirs in zip(layer.blobs, net.learnable_params, strict=True):
        theirs.data[...] = mine.data
    out = net.forward(x=bottom[0].data, cont=CONT, x_static=bottom[2].data)
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, out["h"], rtol=1e-12, atol=1e-15)
    diff = np.random.default_rng(5).standard_normal(top[0].shape)
    net.clear_param_diffs()
    grads = net.backward(h=diff)
    top[0].diff[...] = diff
    layer.backward(top, [True, False, True], bottom)
    np.testing.assert_allclose(bottom[0].diff, grads["x"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(bottom[2].diff, grads["x_static"], rtol=1e-10, atol=1e-14)
    for mine, theirs in zip(layer.blobs, net.learnable_params, strict=True):
        np.testing.assert_allclose(mine.diff, theirs.diff, rtol=1e-10, atol=1e-14)


# -- forward against the naive loops -----------------------------------------------------------
def test_lstm_forward_with_resets_and_static_input():
    bottom = bottoms(static=True)
    layer, top = make_layer(text("LSTM"), bottom)
    layer.forward(bottom, top)
    w_xc, b_c, w_s, w_hc = (b.data for b in layer.blobs)
    zeros = np.zeros((N, H))
    expected, _, _ = naive_lstm(bottom[0].data, CONT, w_xc, b_c, w_hc, zeros, zeros,
                                bottom[2].data, w_s)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-14)


def test_lstm_carries_its_state_into_the_next_forward():
    """As Caffe: h_T and c_T of one pass are h_0 and c_0 of the next (cont = 1 keeps them)."""
    bottom = bottoms()
    bottom[1].data[...] = 1
    layer, top = make_layer(text("LSTM"), bottom)
    layer.forward(bottom, top)
    first = top[0].data.copy()
    w_xc, b_c, w_hc = (b.data for b in layer.blobs)
    zeros = np.zeros((N, H))
    expected, h_t, c_t = naive_lstm(bottom[0].data, bottom[1].data, w_xc, b_c, w_hc, zeros, zeros)
    np.testing.assert_allclose(first, expected, rtol=1e-12)
    layer.forward(bottom, top)
    expected, _, _ = naive_lstm(bottom[0].data, bottom[1].data, w_xc, b_c, w_hc, h_t, c_t)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12)
    assert not np.allclose(top[0].data, first)
    layer.reset()
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, first)
    bottom[1].data[0] = 0  # a new sequence at t = 0 ignores what was carried
    layer.forward(bottom, top)
    again = top[0].data.copy()
    layer.reset()
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, again)


def test_lstm_state_round_trips_through_get_state():
    bottom = bottoms()
    bottom[1].data[...] = 1
    layer, top = make_layer(text("LSTM"), bottom)
    assert layer.get_state() == {}
    layer.forward(bottom, top)
    other, other_top = make_layer(text("LSTM"), bottom)
    for a, b in zip(layer.blobs, other.blobs, strict=True):
        b.data[...] = a.data
    other.set_state(layer.get_state())
    layer.forward(bottom, top)
    other.forward(bottom, other_top)
    np.testing.assert_array_equal(top[0].data, other_top[0].data)


def test_lstm_expose_hidden_forward():
    bottom = bottoms(static=True, hidden_states=2)
    layer, top = make_layer(text("LSTM", expose=True), bottom, n_top=3)
    layer.forward(bottom, top)
    w_xc, b_c, w_s, w_hc = (b.data for b in layer.blobs)
    cont = CONT.copy()
    expected, h_t, c_t = naive_lstm(bottom[0].data, cont, w_xc, b_c, w_hc, bottom[3].data[0],
                                    bottom[4].data[0], bottom[2].data, w_s)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(top[1].data[0], h_t, rtol=1e-12)
    np.testing.assert_allclose(top[2].data[0], c_t, rtol=1e-12)
    layer.forward(bottom, top)  # nothing is carried when the states are exposed
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("expose", [False, True])
def test_rnn_forward(static, expose):
    bottom = bottoms(static, hidden_states=int(expose))
    layer, top = make_layer(text("RNN", expose=expose), bottom, n_top=1 + expose)
    layer.forward(bottom, top)
    blobs = [b.data for b in layer.blobs]
    w_s = blobs.pop(2) if static else None
    h0 = bottom[-1].data[0] if expose else np.zeros((N, H))
    expected, h_t = naive_rnn(bottom[0].data, CONT, *blobs, h0,
                              bottom[2].data if static else None, w_s)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-14)
    if expose:
        np.testing.assert_allclose(top[1].data[0], h_t, rtol=1e-12)


def test_debug_info_logs_the_output_and_the_input_gradient(caplog):
    bottom = bottoms()
    layer, top = make_layer(text("RNN").replace("expose_hidden", "debug_info: true expose_hidden"),
                            bottom)
    layer.param.top.append("o")
    layer.param.bottom.extend(["x", "cont"])
    with caplog.at_level("INFO", logger="engine.layers.recurrent"):
        layer.forward(bottom, top)
        layer.backward(top, [True, False], bottom)
    mean_out = float(np.mean(np.abs(top[0].data)))
    assert f"[Forward] Layer rnn, top blob o data: {mean_out:.6g}" in caplog.text
    assert "[Backward] Layer rnn, bottom blob x diff:" in caplog.text


def test_float32_keeps_its_dtype():
    bottom = [random_blob(X_SHAPE, dtype=np.float32), blob_of(CONT, np.float32)]
    layer, top = make_layer(text("LSTM"), bottom, dtype=np.float32)
    layer.forward(bottom, top)
    assert top[0].data.dtype == np.float32 and layer.blobs[0].data.dtype == np.float32


# -- gradients ---------------------------------------------------------------------------------
def test_lstm_gradient_with_resets_and_static_input():
    bottom = bottoms(static=True)
    layer, top = make_layer(text("LSTM"), bottom)
    checked = check_gradient(layer, bottom, top, check_bottom=[0, 2])
    assert checked == 48 + 9 + (32 + 8 + 24 + 16)


def test_lstm_gradient_with_exposed_states():
    bottom = bottoms(static=True, hidden_states=2)
    bottom[1].data[...] = 1
    bottom[1].data[2, 1] = 0
    layer, top = make_layer(text("LSTM", expose=True), bottom, n_top=3)
    check_gradient(layer, bottom, top, check_bottom=[0, 2, 3, 4])


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("expose", [False, True])
def test_rnn_gradient(static, expose):
    bottom = bottoms(static, hidden_states=int(expose))
    if expose:
        bottom[1].data[0] = 1  # let h_0 reach the first step
    layer, top = make_layer(text("RNN", expose=expose), bottom, n_top=1 + expose)
    check = [i for i in range(len(bottom)) if i != 1]
    check_gradient(layer, bottom, top, check_bottom=check)


def test_lstm_backward_respects_propagate_down_and_accumulates():
    bottom = bottoms()
    layer, top = make_layer(text("LSTM"), bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    bottom[0].diff[...] = 7
    for blob in layer.blobs:
        blob.diff[...] = 0
    layer.backward(top, [False, False], bottom)
    assert np.all(bottom[0].diff == 7)
    once = [b.diff.copy() for b in layer.blobs]
    layer.backward(top, [True, False], bottom)
    for blob, first in zip(layer.blobs, once, strict=True):
        np.testing.assert_allclose(blob.diff, 2 * first)
    with pytest.raises(LayerError, match="sequence indicators"):
        layer.backward(top, [False, True], bottom)


# -- LSTMUnit ----------------------------------------------------------------------------------
def unit_bottoms(cont=(0.0, 1.0, 1.0, 0.5)):
    n = len(cont)
    return [random_blob((1, n, H), seed=3), random_blob((1, n, 4 * H), seed=4, low=-2, high=2),
            blob_of(np.array([cont]))]


def test_lstm_unit_shapes_and_forward_against_caffes_loop():
    bottom = unit_bottoms()
    layer, top = make_layer('type: "LSTMUnit"', bottom, n_top=2)
    assert [t.shape for t in top] == [(1, 4, H), (1, 4, H)]
    layer.forward(bottom, top)
    c_prev, x, cont = bottom[0].data[0], bottom[1].data[0], bottom[2].data[0]
    for n in range(4):
        for d in range(H):
            i = sig(x[n, d])
            f = 0.0 if cont[n] == 0 else cont[n] * sig(x[n, H + d])
            o = sig(x[n, 2 * H + d])
            g = np.tanh(x[n, 3 * H + d])
            c = f * c_prev[n, d] + i * g
            assert top[0].data[0, n, d] == pytest.approx(c, rel=1e-13)
            assert top[1].data[0, n, d] == pytest.approx(o * np.tanh(c), rel=1e-13)


def test_lstm_unit_gradient():
    bottom = unit_bottoms()
    layer, top = make_layer('type: "LSTMUnit"', bottom, n_top=2)
    assert check_gradient(layer, bottom, top, check_bottom=[0, 1]) == 8 + 32
    assert not layer.allow_force_backward(2)


def test_lstm_unit_errors():
    bottom = unit_bottoms()
    bottom[1] = random_blob((1, 4, 3 * H))
    with pytest.raises(LayerError, match=r"gate inputs\) must be \(1, 4, 8\)"):
        make_layer('type: "LSTMUnit"', bottom, n_top=2)
    bottom = unit_bottoms()
    bottom[2] = blob_of(np.ones((4, 1)))
    with pytest.raises(LayerError, match=r"cont\) must be \(1, 4\)"):
        make_layer('type: "LSTMUnit"', bottom, n_top=2)


# -- errors ------------------------------------------------------------------------------------
def test_recurrent_errors():
    with pytest.raises(LayerError, match="num_output must be positive"):
        make_layer('type: "LSTM" recurrent_param { }', bottoms())
    bad_cont = bottoms()
    bad_cont[1] = blob_of(np.ones((T, N + 1)))
    with pytest.raises(LayerError, match=r"cont\) must have shape"):
        make_layer(text("RNN"), bad_cont)
    with pytest.raises(LayerError, match="at least 2 axes"):
        make_layer(text("RNN"), [random_blob((T,)), blob_of(np.ones((T, 1)))])
    wrong_h0 = bottoms(hidden_states=2)
    wrong_h0[3] = random_blob((1, N, H + 1))
    with pytest.raises(LayerError, match=r"bottom\[3\] \(c_0\) must have shape"):
        make_layer(text("LSTM", expose=True), wrong_h0, n_top=3)
    with pytest.raises(LayerError, match="takes 4 to 5 bottom"):
        make_layer(text("LSTM", expose=True), bottoms(), n_top=3)
    layer, top = make_layer(text("LSTM"), bottoms())
    wider = [random_blob((T, N, 5)), blob_of(CONT)]
    with pytest.raises(LayerError, match="must hold 4 values"):
        layer.reshape(wider, top)
