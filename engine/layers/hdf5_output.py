"""The HDF5Output layer: type ``HDF5Output``, message ``hdf5_output_param`` (file_name)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from engine.blob import Blob, shape_only_active
from engine.layer import Layer, register_layer

log = logging.getLogger(__name__)

DATASETS = ("data", "label")  # Caffe's HDF5_DATA_DATASET_NAME, HDF5_DATA_LABEL_NAME


def legacy_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """Caffe's (num, channels, height, width) view of a shape of at most 4 axes, padded with
    1s; None for more axes."""
    if len(shape) > 4:
        return None
    padded = (*shape, 1, 1, 1, 1)[:4]
    return padded[0], padded[1], padded[2], padded[3]


@register_layer
class HDF5Output(Layer):
    """Writes bottom 0 to dataset ``data`` and bottom 1 to dataset ``label`` of ``file_name``.

    As Caffe's: the file is created (truncated) at setup; each dataset has the legacy 4-d
    shape (num, channels, height, width) of its bottom, e.g. (N, K) is stored as (N, K, 1, 1),
    in the net's float type; the two bottoms must agree on num. Caffe can write only one batch
    (a second forward fails to create the datasets again); here each further forward appends
    its rows, so ``engine test --iterations K`` dumps K batches. No tops; backward writes zero
    bottom diffs (the layer adds nothing to the loss).
    """

    n_bottom = (2, 2)
    n_top = (0, 0)
    backward_needs_bottom_data = False
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        import h5py

        self.file_name = self.param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.error("hdf5_output_param.file_name is empty; name the .h5 file to write")
        if shape_only_active():
            return  # a net built for its shapes only (engine summary) writes nothing
        try:
            with h5py.File(self.file_name, "w"):
                pass
        except OSError as exc:
            raise self.error(f"cannot create HDF5 file '{self.file_name}': {exc}") from None

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shapes = [legacy_shape(blob.shape) for blob in bottom]
        for name, blob, shape in zip(DATASETS, bottom, shapes, strict=True):
            if shape is None:
                raise self.error(f"bottom '{name}' has {len(blob.shape)} axes {blob.shape}; "
                                 f"Caffe's HDF5 output holds at most 4 (num, channels, height, "
                                 f"width): reshape it first")
        if shapes[0][0] != shapes[1][0]:
            raise self.error(f"data and label must have the same batch size (num); got "
                             f"{bottom[0].shape} and {bottom[1].shape}")
        self.shapes = shapes

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        import h5py

        with h5py.File(self.file_name, "a") as f:
            for name, shape in zip(DATASETS, self.shapes, strict=True):
                if name in f and f[name].shape[1:] != shape[1:]:
                    raise self.error(f"bottom '{name}' is now {shape} but '{self.file_name}' "
                                     f"holds rows of {f[name].shape[1:]}; each batch must "
                                     f"keep the row shape")
            for name, blob, shape in zip(DATASETS, bottom, self.shapes, strict=True):
                rows = blob.data.reshape(shape)
                if name not in f:
                    f.create_dataset(name, data=rows, maxshape=(None, *shape[1:]),
                                     chunks=True)
                    continue
                dataset = f[name]
                dataset.resize(dataset.shape[0] + shape[0], axis=0)
                dataset[-shape[0]:] = rows
        log.info("Successfully saved %d rows to %s", self.shapes[0][0], self.file_name)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        for down, blob in zip(propagate_down, bottom, strict=True):
            if down:
                blob.diff[...] = np.zeros((), blob.diff.dtype)
