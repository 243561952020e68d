"""Keeping in-place chains' gradients true: copies of the values a later in-place layer
overwrites, made only where some layer's backward reads them.

In Caffe every layer of an in-place chain (``top == bottom``) reads, in backward, whatever the
shared blob holds *after the whole chain ran*. That is right when each layer's backward reads
nothing from the blob (BatchNorm and Scale keep their own copies) or when it is the chain's last
writer; otherwise the gradient is wrong: in ``Scale -> ReLU -> Power`` on one blob, ReLU's
backward reads Power's output instead of its own.

The plan walks the layers in order and follows every blob's storage (views such as Split,
Flatten and Reshape tops share their bottom's). For each storage it keeps the layers whose
backward reads its current value, which they declare with ``backward_needs_bottom_data`` /
``backward_needs_top_data`` / ``keeps_bottom_in_place``. When an in-place layer is about to
overwrite that value, each such layer gets a *stand-in* blob: the Net copies the value into it
just before the overwriting forward, and runs that layer's backward on the stand-in (its diff is
the real blob's diff), so the net's blobs keep Caffe's identities and final values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.blob import Blob
from engine.layer import Layer


@dataclass
class InPlacePlan:
    """``copies_before[i]``: (blob, stand-in) pairs to copy before layer i's forward;
    ``stand_ins[k]``: the pairs to swap into layer k's backward; ``records``: (layer reading
    the value, blob name, layer overwriting it), for logs and tests."""

    copies_before: dict[int, list[tuple[Blob, Blob]]] = field(default_factory=dict)
    stand_ins: dict[int, list[tuple[Blob, Blob]]] = field(default_factory=dict)
    records: list[tuple[str, str, str]] = field(default_factory=list)

    def copy_values(self, i: int) -> None:
        """Before layer i's forward: save the values it is about to overwrite."""
        for blob, stand_in in self.copies_before.get(i, ()):
            stand_in.reshape(blob.shape)
            np.copyto(stand_in.data, blob.data)

    def backward_vecs(self, k: int, top: list[Blob],
                      bottom: list[Blob]) -> tuple[list[Blob], list[Blob]]:
        """Layer k's top and bottom vectors for backward, stand-ins swapped in."""
        pairs = self.stand_ins.get(k)
        if not pairs:
            return top, bottom
        swap = {}
        for blob, stand_in in pairs:
            stand_in.diff = blob.diff  # gradients flow through the real blob
            swap[id(blob)] = stand_in
        return [swap.get(id(b), b) for b in top], [swap.get(id(b), b) for b in bottom]


def reads_in_place(layer: Layer) -> bool:
    """Whether an in-place layer's backward reads the shared array."""
    return layer.backward_needs_top_data or (layer.backward_needs_bottom_data
                                             and not layer.keeps_bottom_in_place)


def plan_in_place(layers: list[Layer], bottom_vecs: list[list[Blob]],
                  top_vecs: list[list[Blob]], need_backward: list[bool],
                  names: dict[int, str]) -> InPlacePlan:
    """The copies a net needs (module docstring); ``names`` maps id(blob) to its name."""
    plan = InPlacePlan()
    storage: dict[int, int] = {}  # id(blob) -> id of the blob whose memory it is
    readers: dict[int, list[tuple[int, Blob]]] = {}  # storage -> (layer, blob) reading it
    for i, layer in enumerate(layers):
        bottom, top = bottom_vecs[i], top_vecs[i]
        needs = need_backward[i]
        for j, blob in enumerate(bottom):
            in_place = j < len(top) and top[j] is blob
            if needs and layer.backward_needs_bottom_data and not in_place:
                readers.setdefault(storage.get(id(blob), id(blob)), []).append((i, blob))
        for j, blob in enumerate(top):
            if j < len(bottom) and bottom[j] is blob:
                root = storage.get(id(blob), id(blob))
                for k, seen in readers.pop(root, []):
                    _stand_in(plan, layers, k, seen, i, names)
                if needs and reads_in_place(layer):
                    readers[root] = [(i, blob)]
                continue
            root = _view_of(blob, bottom, storage)
            storage[id(blob)] = root
            if needs and layer.backward_needs_top_data:
                readers.setdefault(root, []).append((i, blob))
    return plan


def _view_of(top: Blob, bottom: list[Blob], storage: dict[int, int]) -> int:
    """The storage ``top`` lives in: a bottom's if it is a view of it, else its own."""
    for b in bottom:
        if top.count and np.may_share_memory(top.data, b.data):
            return storage.get(id(b), id(b))
    return id(top)


def _stand_in(plan: InPlacePlan, layers: list[Layer], k: int, blob: Blob, i: int,
              names: dict[int, str]) -> None:
    pairs = plan.stand_ins.setdefault(k, [])
    if any(b is blob for b, _ in pairs):
        return
    stand_in = Blob(blob.shape, blob.dtype)
    pairs.append((blob, stand_in))
    plan.copies_before.setdefault(i, []).append((blob, stand_in))
    plan.records.append((layers[k].name, names.get(id(blob), "(automatic)"), layers[i].name))
