"""Every built-in layer module; importing this package registers their types."""

from engine.layers import (  # noqa: F401
    accuracy,
    activation,
    combine,
    convolution,
    data,
    deconvolution,
    embed,
    image_data,
    inner_product,
    loss,
    metric_loss,
    neuron,
    normalization,
    pooling,
    scale,
    slicing,
    softmax,
    spp,
    structural,
    utility,
)
