"""``Embed`` (``embed_param``): a lookup table, i.e. InnerProduct on one-hot inputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import Layer, register_layer


@register_layer
class Embed(Layer):
    """``y[..., :] = W[x[...], :] + b``. Bottom: integer indices in [0, input_dim) stored as
    floats, any shape. Top: ``bottom.shape + (num_output,)``. W is (input_dim, num_output),
    b is (num_output,) when ``bias_term``. Backward: each row of dy is added into the W row
    its index picked (indices repeat, so this is a scatter-add); db sums dy over positions.
    The indices get no gradient.
    """

    backward_needs_bottom_data = True
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        embed_param = self.param.embed_param
        self.num_output = embed_param.num_output
        self.input_dim = embed_param.input_dim
        self.bias_term = embed_param.bias_term
        if self.num_output <= 0 or self.input_dim <= 0:
            raise self.error(f"embed_param needs positive num_output and input_dim; got "
                             f"num_output {self.num_output}, input_dim {self.input_dim}")
        specs = [((self.input_dim, self.num_output), embed_param.weight_filler)]
        if self.bias_term:
            specs.append(((self.num_output,), embed_param.bias_filler))
        self.init_param_blobs(specs)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].reshape((*bottom[0].shape, self.num_output))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        values = bottom[0].data.reshape(-1)
        self.index = values.astype(np.int64)
        bad = (self.index != values) | (self.index < 0) | (self.index >= self.input_dim)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise self.error(f"input {values[first]:g} at position {first} of {bottom[0].shape} "
                             f"is not an integer in [0, {self.input_dim}) (input_dim)")
        y = self.blobs[0].data[self.index]
        if self.bias_term:
            y += self.blobs[1].data
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down and propagate_down[0]:
            raise self.error("cannot backpropagate to the indices (bottom 0)")
        learn = list(self.param_propagate_down) + [True] * (2 - len(self.param_propagate_down))
        dy = top[0].diff.reshape(-1, self.num_output)
        if learn[0]:
            np.add.at(self.blobs[0].diff, self.index, dy)
        if self.bias_term and learn[1]:
            self.blobs[1].diff += dy.sum(axis=0)
