"""Every built-in layer module; importing this package registers their types.

CamelCase attributes are pycaffe's NetSpec layer factories (``caffe.layers``):
``from engine import layers as L; L.Convolution(bottom, kernel_size=3)`` (see engine/net_spec.py).
The implementation modules are lowercase, so ``from engine.layers import convolution`` still
imports the module. Import modules here, not classes, so no CamelCase name shadows a factory.
"""

from engine import python_layer  # noqa: F401  (type "Python": user code, off by default)
from engine.layers import (  # noqa: F401
    accuracy,
    activation,
    bn,
    combine,
    convolution,
    data,
    deconvolution,
    dense_image_data,
    depthwise,
    detection,
    embed,
    hdf5_output,
    image_data,
    inner_product,
    loss,
    metric_loss,
    neuron,
    normalization,
    pooling,
    ported,
    recurrent,
    scale,
    segmentation,
    shuffle,
    slicing,
    softmax,
    spp,
    ssd,
    structural,
    utility,
    window_data,
)


def __getattr__(name: str):
    """``engine.layers.<Type>``: the NetSpec factory for layer type ``<Type>``."""
    if name[:1].isupper():
        from engine.net_spec import layers

        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
