"""Caffe's recurrent layers: ``RNN`` and ``LSTM`` (message ``recurrent_param``) and ``LSTMUnit``.

Caffe builds RNN and LSTM as an unrolled net of InnerProduct, Scale, Eltwise, TanH and LSTMUnit
layers, one group per time step. Here the same equations run directly: the input projections
for all steps at once, then a loop over time (inherent to the recurrence) with every step
vectorised over the N streams. The parameter blobs are exactly those of Caffe's unrolled net, in
its order, so Caffe caffemodels load:

- LSTM: ``W_xc`` (4H, I), ``b_c`` (4H,), [``W_xc_static`` (4H, S)], ``W_hc`` (4H, H)
- RNN:  ``W_xh`` (H, I), ``b_h`` (H,), [``W_xh_static`` (H, S)], ``W_hh`` (H, H),
  ``W_ho`` (H, H), ``b_o`` (H,)

with H = num_output, I = the size of one input step (x's axes from 2 on) and S = the size of
one static input (x_static's axes from 1 on). LSTM gates are stacked in Caffe's order i, f, o, g.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.debug_info import mean_abs
from engine.layer import Layer, register_layer

log = logging.getLogger(__name__)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) as 0.5 tanh(x / 2) + 0.5, which cannot overflow."""
    return 0.5 * np.tanh(0.5 * x) + 0.5


def lstm_cell_forward(c_prev: np.ndarray, gates: np.ndarray, cont: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One LSTMUnit step on (N, H) states and (N, 4H) gate inputs; returns (c, h, acts, tanh_c).

    i, f, o = sigmoid of the first three quarters, g = tanh of the last;
    c = cont * f * c_prev + i * g (f is 0 where cont is 0), h = o * tanh(c).
    ``acts`` holds (i, sigmoid(f'), o, g) for the backward pass.
    """
    hidden = c_prev.shape[-1]
    acts = np.empty_like(gates)
    acts[:, :3 * hidden] = sigmoid(gates[:, :3 * hidden])
    acts[:, 3 * hidden:] = np.tanh(gates[:, 3 * hidden:])
    i, f, o, g = np.split(acts, 4, axis=1)
    c = (cont[:, None] * f) * c_prev + i * g
    tanh_c = np.tanh(c)
    return c, o * tanh_c, acts, tanh_c


def lstm_cell_backward(dc: np.ndarray, dh: np.ndarray, c_prev: np.ndarray, acts: np.ndarray,
                       tanh_c: np.ndarray, cont: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of one LSTMUnit step: returns (dc_prev, dgates).

    As Caffe's LSTMUnit, except that the forget gate's derivative is cont * s (1 - s) with
    s = sigmoid(f') (Caffe writes f (1 - f) with f = cont * s: the same for cont in {0, 1}).
    """
    i, s, o, g = np.split(acts, 4, axis=1)
    cont = cont[:, None]
    c_term = dc + dh * o * (1 - tanh_c * tanh_c)
    dgates = np.concatenate([c_term * g * i * (1 - i),
                             c_term * c_prev * cont * s * (1 - s),
                             dh * tanh_c * o * (1 - o),
                             c_term * i * (1 - g * g)], axis=1)
    return c_term * cont * s, dgates


def _encode(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.str, "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode("ascii")}


def _decode(state: dict) -> np.ndarray:
    raw = base64.b64decode(state["data"])
    return np.frombuffer(raw, np.dtype(state["dtype"])).reshape(state["shape"]).copy()


class Recurrent(Layer):
    """What RNN and LSTM share, after Caffe's RecurrentLayer.

    Bottoms: x (T, N, ...) time-major, cont (T, N), optional x_static (N, ...), and with
    ``expose_hidden`` the initial states (1, N, H) (h_0, then c_0 for LSTM). Tops: the output
    (T, N, H), and with ``expose_hidden`` the final states (1, N, H) in the same order.
    cont_t = 0 starts a new sequence in that stream: the state carried into step t is cut.

    Without ``expose_hidden`` the final states of one forward pass are the initial states of
    the next (zeros at first), as in Caffe, so a stream may continue across batches; they are
    part of ``get_state()`` for exact resume. With it, gradients also flow to the initial-state
    bottoms and from the final-state tops (Caffe shares only their data and drops these).
    T and N may change between forwards (Caffe fixes T at setup); a new N restarts the carried
    state from zeros. ``debug_info`` logs the mean |value| of the output and of x's gradient.
    """

    n_states = 1  # recurrent state blobs: h (RNN) or h, c (LSTM)
    backward_needs_top_data = False  # forward keeps what backward needs
    state_names: tuple[str, ...] = ("h",)

    def __init__(self, param, *args, **kwargs) -> None:
        super().__init__(param, *args, **kwargs)
        self.expose = bool(param.recurrent_param.expose_hidden)
        first = 2 + self.n_states * self.expose
        self.n_bottom = (first, first + 1)
        self.n_top = (1 + self.n_states * self.expose,) * 2
        self.carried: list[np.ndarray] | None = None

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1  # never to the sequence indicators

    # -- setup and shapes ----------------------------------------------------------------------
    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.recurrent_param
        self.hidden = int(p.num_output)
        if self.hidden <= 0:
            raise self.error("recurrent_param.num_output must be positive")
        self.debug = bool(p.debug_info)
        self.static = len(bottom) > 2 + self.n_states * self.expose
        self._check_shapes(bottom)
        self.input_dim = bottom[0].count_axes(2)
        self.static_dim = bottom[2].count_axes(1) if self.static else 0
        self.init_param_blobs(self.param_specs(p))

    def param_specs(self, p) -> list[tuple[tuple[int, ...], object]]:
        raise NotImplementedError

    def _input_specs(self, p, rows: int) -> list[tuple[tuple[int, ...], object]]:
        """W_x (rows, I), b (rows,), and W_static (rows, S) with a static input."""
        specs = [((rows, self.input_dim), p.weight_filler), ((rows,), p.bias_filler)]
        if self.static:
            specs.append(((rows, self.static_dim), p.weight_filler))
        return specs

    def _check_shapes(self, bottom: list[Blob]) -> None:
        x, cont = bottom[0].shape, bottom[1].shape
        if len(x) < 2:
            raise self.error(f"bottom[0] must have at least 2 axes (#timesteps, #streams, ...); "
                             f"got shape {x}")
        if cont != x[:2]:
            raise self.error(f"bottom[1] (cont) must have shape (#timesteps, #streams) = "
                             f"{x[:2]}; got {cont}")
        n = x[1]
        if self.static and (len(bottom[2].shape) < 1 or bottom[2].shape[0] != n):
            raise self.error(f"bottom[2] (the static input) must be ({n}, ...), one row per "
                             f"stream; got {bottom[2].shape}")
        first = 2 + self.static
        for k, blob in enumerate(bottom[first:]):
            if blob.shape != (1, n, self.hidden):
                raise self.error(f"bottom[{first + k}] ({self.state_names[k]}_0) must have shape "
                                 f"{(1, n, self.hidden)}; got {blob.shape}")

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._check_shapes(bottom)
        if bottom[0].count_axes(2) != self.input_dim:
            raise self.error(f"each time step of bottom[0] must hold {self.input_dim} values, "
                             f"as at setup; got shape {bottom[0].shape}")
        if self.static and bottom[2].count_axes(1) != self.static_dim:
            raise self.error(f"each row of bottom[2] must hold {self.static_dim} values, as at "
                             f"setup; got shape {bottom[2].shape}")
        self.steps, self.streams = bottom[0].shape[:2]
        top[0].reshape((self.steps, self.streams, self.hidden))
        for blob in top[1:]:
            blob.reshape((1, self.streams, self.hidden))

    # -- forward and backward ------------------------------------------------------------------
    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        t, n, h = self.steps, self.streams, self.hidden
        x = bottom[0].data.reshape(t * n, self.input_dim)
        w_x, b = self.blobs[0].data, self.blobs[1].data
        projected = (x @ w_x.T + b).reshape(t, n, -1)
        static = bottom[2].data.reshape(n, -1) @ self.blobs[2].data.T if self.static else None
        initial = self._initial_states(bottom)
        finals = self.run_forward(projected, bottom[1].data, initial, static, top[0].data)
        if self.expose:
            for blob, final in zip(top[1:], finals, strict=True):
                blob.data[...] = final.reshape(1, n, h)
        else:
            self.carried = [final.copy() for final in finals]
        if self.debug:
            self._log("Forward", "top", top[0].data)

    def _initial_states(self, bottom: list[Blob]) -> list[np.ndarray]:
        n, h = self.streams, self.hidden
        if self.expose:
            return [blob.data.reshape(n, h) for blob in bottom[2 + self.static:]]
        if self.carried is None or self.carried[0].shape != (n, h):
            self.carried = [np.zeros((n, h), self.dtype) for _ in range(self.n_states)]
        return self.carried

    def run_forward(self, projected: np.ndarray, cont: np.ndarray, initial: list[np.ndarray],
                    static: np.ndarray | None, out: np.ndarray) -> list[np.ndarray]:
        """Fill ``out`` (T, N, H); keep what backward needs; return the final states."""
        raise NotImplementedError

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[1]:
            raise self.error("cannot backpropagate to the sequence indicators (bottom[1])")
        final_diffs = [blob.diff.reshape(self.streams, self.hidden) for blob in top[1:]]
        if not self.expose:
            final_diffs = [np.zeros((self.streams, self.hidden), self.dtype)] * self.n_states
        dprojected, initial_diffs = self.run_backward(top[0].diff, bottom[1].data, final_diffs)
        self._input_backward(dprojected, propagate_down, bottom)
        first = 2 + self.static
        for k, diff in enumerate(initial_diffs if self.expose else []):
            if propagate_down[first + k]:
                bottom[first + k].diff[...] = diff.reshape(1, self.streams, self.hidden)
        if self.debug:
            self._log("Backward", "bottom", bottom[0].diff)

    def run_backward(self, dout: np.ndarray, cont: np.ndarray, final_diffs: list[np.ndarray]
                     ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Backpropagate through time; accumulate the recurrent parameters' diffs; return the
        diff of the projected input (T, N, G) and the diffs of the initial states."""
        raise NotImplementedError

    def _input_backward(self, dprojected: np.ndarray, propagate_down: Sequence[bool],
                        bottom: list[Blob]) -> None:
        t, n = self.steps, self.streams
        rows = dprojected.reshape(t * n, -1)
        if self.param_down(0):
            self.blobs[0].diff += rows.T @ bottom[0].data.reshape(t * n, self.input_dim)
        if self.param_down(1):
            self.blobs[1].diff += rows.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = (rows @ self.blobs[0].data).reshape(bottom[0].shape)
        if not self.static:
            return
        dstatic = dprojected.sum(axis=0)  # x_static enters every step
        if self.param_down(2):
            self.blobs[2].diff += dstatic.T @ bottom[2].data.reshape(n, -1)
        if propagate_down[2]:
            bottom[2].diff[...] = (dstatic @ self.blobs[2].data).reshape(bottom[2].shape)

    def _log(self, phase: str, kind: str, values: np.ndarray) -> None:
        """recurrent_param.debug_info: Caffe's debug line for the layer's main blob."""
        blobs = self.param.top if kind == "top" else self.param.bottom
        name = blobs[0] if blobs else "0"
        what = "data" if phase == "Forward" else "diff"
        log.info("    [%s] Layer %s, %s blob %s %s: %.6g", phase, self.name, kind, name, what,
                 mean_abs(values))

    # -- the carried state -----------------------------------------------------------------------
    def reset(self) -> None:
        """Zero the state carried into the next forward pass (Caffe's RecurrentLayer::Reset)."""
        self.carried = None

    def get_state(self) -> dict:
        if self.carried is None:
            return {}
        return {name: _encode(a) for name, a in zip(self.state_names, self.carried, strict=True)}

    def set_state(self, state: dict) -> None:
        self.carried = [_decode(state[name]) for name in self.state_names] if state else None


@register_layer
class LSTM(Recurrent):
    """Long short-term memory over T time steps, Caffe's equations (gates i, f, o, g):

        gates_t = W_hc (cont_t h_{t-1}) + W_xc x_t + b_c [+ W_xc_static x_static]
        i, f, o = sigmoid(...), g = tanh(...)     (the four H-wide quarters of gates_t)
        c_t = cont_t f_t c_{t-1} + i_t g_t,   h_t = o_t tanh(c_t)

    Shapes: x (T, N, ...), cont (T, N) -> h (T, N, H); with ``expose_hidden`` also h_0, c_0
    bottoms and h_T, c_T tops (1, N, H). Blobs: W_xc (4H, I), b_c (4H,), [W_xc_static (4H, S)],
    W_hc (4H, H).
    """

    n_states = 2
    state_names = ("h", "c")

    def param_specs(self, p) -> list[tuple[tuple[int, ...], object]]:
        rows = 4 * self.hidden
        return [*self._input_specs(p, rows), ((rows, self.hidden), p.weight_filler)]

    def run_forward(self, projected: np.ndarray, cont: np.ndarray, initial: list[np.ndarray],
                    static: np.ndarray | None, out: np.ndarray) -> list[np.ndarray]:
        w_hc = self.blobs[-1].data
        h, c = initial
        self.c0 = c.copy()
        self.h_conted = np.empty_like(out)
        self.cells = np.empty_like(out)
        self.tanh_c = np.empty_like(out)
        self.acts = np.empty_like(projected)
        for t in range(self.steps):
            self.h_conted[t] = cont[t][:, None] * h
            gates = self.h_conted[t] @ w_hc.T + projected[t]
            if static is not None:
                gates += static
            c, h, self.acts[t], self.tanh_c[t] = lstm_cell_forward(c, gates, cont[t])
            self.cells[t] = c
            out[t] = h
        return [h, c]

    def run_backward(self, dout: np.ndarray, cont: np.ndarray, final_diffs: list[np.ndarray]
                     ) -> tuple[np.ndarray, list[np.ndarray]]:
        w_hc = self.blobs[-1]
        dh_next, dc = final_diffs
        dgates = np.empty_like(self.acts)
        for t in reversed(range(self.steps)):
            c_prev = self.cells[t - 1] if t else self.c0
            dc, dgates[t] = lstm_cell_backward(dc, dout[t] + dh_next, c_prev, self.acts[t],
                                               self.tanh_c[t], cont[t])
            dh_next = cont[t][:, None] * (dgates[t] @ w_hc.data)
        if self.param_down(len(self.blobs) - 1):
            w_hc.diff += (dgates.reshape(-1, 4 * self.hidden).T
                          @ self.h_conted.reshape(-1, self.hidden))
        return dgates, [dh_next, dc]


@register_layer
class RNN(Recurrent):
    """Elman recurrent net over T time steps, Caffe's equations:

        h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static])
        o_t = tanh(W_ho h_t + b_o)

    Shapes: x (T, N, ...), cont (T, N) -> o (T, N, H); with ``expose_hidden`` also an h_0
    bottom and an h_T top (1, N, H). Blobs: W_xh (H, I), b_h (H,), [W_xh_static (H, S)],
    W_hh (H, H), W_ho (H, H), b_o (H,).
    """

    def param_specs(self, p) -> list[tuple[tuple[int, ...], object]]:
        square = (self.hidden, self.hidden)
        return [*self._input_specs(p, self.hidden), (square, p.weight_filler),
                (square, p.weight_filler), ((self.hidden,), p.bias_filler)]

    def run_forward(self, projected: np.ndarray, cont: np.ndarray, initial: list[np.ndarray],
                    static: np.ndarray | None, out: np.ndarray) -> list[np.ndarray]:
        w_hh, w_ho, b_o = (blob.data for blob in self.blobs[-3:])
        (h,) = initial
        self.h_conted = np.empty_like(out)
        self.hiddens = np.empty_like(out)
        for t in range(self.steps):
            self.h_conted[t] = cont[t][:, None] * h
            pre = self.h_conted[t] @ w_hh.T + projected[t]
            if static is not None:
                pre += static
            h = self.hiddens[t] = np.tanh(pre)
        rows = self.hiddens.reshape(-1, self.hidden)
        self.outputs = np.tanh(rows @ w_ho.T + b_o).reshape(out.shape)
        out[...] = self.outputs
        return [h]

    def run_backward(self, dout: np.ndarray, cont: np.ndarray, final_diffs: list[np.ndarray]
                     ) -> tuple[np.ndarray, list[np.ndarray]]:
        w_hh, w_ho, b_o = self.blobs[-3:]
        first = len(self.blobs) - 3
        hid = self.hidden
        o = self.outputs
        do = (dout * (1 - o * o)).reshape(-1, hid)
        if self.param_down(first + 1):
            w_ho.diff += do.T @ self.hiddens.reshape(-1, hid)
        if self.param_down(first + 2):
            b_o.diff += do.sum(axis=0)
        dh_out = (do @ w_ho.data).reshape(self.hiddens.shape)
        (dh_next,) = final_diffs
        dpre = np.empty_like(self.hiddens)
        for t in reversed(range(self.steps)):
            dpre[t] = (dh_out[t] + dh_next) * (1 - self.hiddens[t] * self.hiddens[t])
            dh_next = cont[t][:, None] * (dpre[t] @ w_hh.data)
        if self.param_down(first):
            w_hh.diff += dpre.reshape(-1, hid).T @ self.h_conted.reshape(-1, hid)
        return dpre, [dh_next]


@register_layer
class LSTMUnit(Layer):
    """One LSTM step, the cell of Caffe's unrolled LSTM (as ``lstm_cell_forward``):

        i, f, o = sigmoid(x's first three H-wide quarters), g = tanh(x's last quarter)
        c = cont f c_prev + i g,   h = o tanh(c)

    Bottoms: c_prev (1, N, H), gate inputs x (1, N, 4H) in the order i, f, o, g, cont (1, N).
    Tops: c (1, N, H), h (1, N, H). No parameters; no gradient to cont.
    """

    n_bottom = (3, 3)
    n_top = (2, 2)
    backward_needs_top_data = False  # the gate activations are kept from forward

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        c_prev, x, cont = (blob.shape for blob in bottom)
        if len(c_prev) != 3 or c_prev[0] != 1:
            raise self.error(f"bottom[0] (c_prev) must be (1, N, H); got {c_prev}")
        n, hidden = c_prev[1:]
        if x != (1, n, 4 * hidden):
            raise self.error(f"bottom[1] (gate inputs) must be (1, {n}, {4 * hidden}) for "
                             f"c_prev {c_prev}; got {x}")
        if cont != (1, n):
            raise self.error(f"bottom[2] (cont) must be (1, {n}); got {cont}")
        top[0].reshape(c_prev)
        top[1].reshape(c_prev)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        c_prev, x, cont = (blob.data[0] for blob in bottom)
        c, h, self.acts, self.tanh_c = lstm_cell_forward(c_prev, x, cont)
        top[0].data[0] = c
        top[1].data[0] = h

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[2]:
            raise self.error("cannot backpropagate to the sequence indicators (bottom[2])")
        if not (propagate_down[0] or propagate_down[1]):
            return
        c_prev, _, cont = (blob.data[0] for blob in bottom)
        dc_prev, dgates = lstm_cell_backward(top[0].diff[0], top[1].diff[0], c_prev, self.acts,
                                             self.tanh_c, cont)
        if propagate_down[0]:
            bottom[0].diff[0] = dc_prev
        if propagate_down[1]:
            bottom[1].diff[0] = dgates
