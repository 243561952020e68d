"""The fully connected layer: prototxt type ``InnerProduct``, message ``inner_product_param``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import Layer, register_layer


@register_layer
class InnerProduct(Layer):
    """y = x W^T + b over the flattened trailing axes.

    Shapes: bottom (d_0, ..., d_{axis-1}, ...) is read as an (M, K) matrix with
    M = count(0, axis) and K = count(axis, end); top is (d_0, ..., d_{axis-1}, N) with
    N = num_output. Weight W is (N, K), or (K, N) when ``transpose`` (then y = x W + b);
    bias b is (N,). As in Caffe, K is fixed at setup: a later bottom with another K is an error.
    """

    backward_needs_bottom_data = True
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.inner_product_param
        self.num_output = int(p.num_output)
        self.bias_term = bool(p.bias_term)
        self.transpose = bool(p.transpose)
        self.axis = int(p.axis)
        if self.num_output <= 0:
            raise self.error(f"inner_product_param.num_output must be positive; "
                             f"got {self.num_output}")
        axis = self._canonical_axis(bottom[0])
        self.k = bottom[0].count_axes(axis)
        n, k = self.num_output, self.k
        specs: list[tuple[tuple[int, ...], object]] = [
            ((k, n) if self.transpose else (n, k), p.weight_filler)
        ]
        if self.bias_term:
            specs.append(((n,), p.bias_filler))
        self.init_param_blobs(specs)

    def _canonical_axis(self, blob: Blob) -> int:
        try:
            return blob.canonical_axis(self.axis)
        except ValueError as exc:
            raise self.error(f"inner_product_param.axis: {exc}") from None

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if top[0] is bottom[0]:
            raise self.error("does not allow in-place computation (top must differ from bottom)")
        axis = self._canonical_axis(bottom[0])
        k = bottom[0].count_axes(axis)
        if k != self.k:
            raise self.error(
                f"input size incompatible with inner product parameters: bottom shape "
                f"{bottom[0].shape} gives K = {k} from axis {axis} on, but the weights were "
                f"set up for K = {self.k}"
            )
        self.m = bottom[0].count_axes(0, axis)
        top[0].reshape((*bottom[0].shape[:axis], self.num_output))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data.reshape(self.m, self.k)
        y = top[0].data.reshape(self.m, self.num_output)
        w = self.blobs[0].data
        np.matmul(x, w if self.transpose else w.T, out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        dy = top[0].diff.reshape(self.m, self.num_output)
        x = bottom[0].data.reshape(self.m, self.k)
        weight = self.blobs[0]
        if self.param_down(0):
            if self.transpose:
                weight.diff += x.T @ dy
            else:  # by blocks of rows: no temporary of the weight's size (151 MB in fc6)
                add_product(weight.diff, dy.T, x)
        if self.bias_term and self.param_down(1):
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.m, self.k)
            np.matmul(dy, weight.data.T if self.transpose else weight.data, out=dx)


BLOCK_BYTES = 8 << 20  # the most a temporary product may take in add_product


def add_product(target: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``target += a @ b``, computed for a block of ``target``'s rows at a time."""
    rows = max(1, BLOCK_BYTES // max(1, target.shape[1] * target.itemsize))
    if rows >= target.shape[0]:
        target += a @ b
        return
    for start in range(0, target.shape[0], rows):
        target[start:start + rows] += a[start:start + rows] @ b
