"""Depthwise convolution as MobileNet ports write it: types ``DepthwiseConvolution``
(yonghenglh6/DepthwiseConvolution) and ``ConvolutionDepthwise`` (farmingyard/caffe-mobilenet),
both configured by ``convolution_param``.

- ``DepthwiseConvolution`` is Caffe's Convolution (that fork subclasses it and only adds a GPU
  kernel; its README: change the layer's type, nothing else): ``group`` and ``num_output`` are
  read as written.
- ``ConvolutionDepthwise`` ignores ``group`` and ``num_output``: one filter per input channel,
  as many outputs as inputs; weight (C, 1, *kernel), bias (C,).

Both run on Convolution's code, which takes the direct depthwise kernel
(engine/depthwise_kernels.py) whenever ``group == channels == num_output`` -- as does a plain
``Convolution`` written that way (MobileNet-Caffe's own prototxts).
"""

from __future__ import annotations

from engine import caffe_pb2
from engine.blob import Blob
from engine.layer import register_layer
from engine.layers.convolution import Convolution


@register_layer
class DepthwiseConvolution(Convolution):
    """Caffe's Convolution under the fork's type name (same parameters, shapes and weights).

    Shapes: bottom (N, C, *in) -> top (N, num_output, *out); weight (num_output, C/group,
    *kernel), bias (num_output,).
    """


@register_layer
class ConvolutionDepthwise(Convolution):
    """Depthwise convolution as farmingyard's fork has it: one filter per input channel.

    ``top[n, c] = w[c, 0] * bottom[n, c] + b[c]`` (``*`` the correlation, with Convolution's
    stride, pad and dilation); ``group`` and ``num_output`` are set to the input's channel count
    whatever the prototxt says (that fork ignores both).

    Shapes: bottom (N, C, *in) -> top (N, C, *out); weight (C, 1, *kernel), bias (C,).
    """

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        given = self.param
        channels = bottom[0].shape[self._channel_axis(bottom[0], given.convolution_param.axis)]
        self.param = caffe_pb2.LayerParameter()
        self.param.CopyFrom(given)
        self.param.convolution_param.num_output = channels
        self.param.convolution_param.group = channels
        super().setup(bottom, top)
