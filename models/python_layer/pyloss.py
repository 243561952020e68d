"""A Euclidean loss written as a Python layer, in the shape of pycaffe's
examples/pycaffe/layers/pyloss.py: it uses only what ``caffe.Layer`` offers, so the same file
runs under Caffe (``import caffe``) and under Moka (``import engine as caffe``).

loss = sum((a - b)^2) / (2 N) for bottoms a, b of N items; the gradients are +-(a - b) / N.
"""

import numpy as np

try:
    import caffe
except ImportError:
    import engine as caffe


class EuclideanLossLayer(caffe.Layer):
    """Two bottoms (prediction, target) of equal count; one scalar top (set loss_weight: 1)."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("EuclideanLossLayer needs two bottoms: prediction and target")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("EuclideanLossLayer: the bottoms must have the same count")
        self.residual = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.residual[...] = bottom[0].data - bottom[1].data.reshape(bottom[0].data.shape)
        top[0].data[...] = np.sum(self.residual ** 2) / bottom[0].num / 2.0

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                grad = sign * self.residual / bottom[i].num
                bottom[i].diff[...] = grad.reshape(bottom[i].diff.shape) * top[0].diff
