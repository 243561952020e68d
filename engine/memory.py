"""Memory planning: which arrays a net holds, for how long, and who shares them.

What a net holds, and the rule for each kind:

- **Parameters** (``layer.blobs``): always, data; their diffs only once a backward or a solver
  uses them (``Blob.diff`` is allocated on first use, zeros).
- **Activations** (``net.blobs``): by default one array per blob for the net's life, as in Caffe,
  so pycaffe scripts can read any blob after ``forward``. Views cost nothing: Split, Flatten,
  Reshape tops share their bottom's data, in-place tops *are* their bottom.
- **Activation diffs**: lazily, so only blobs a backward actually touches get one. A TEST or
  deploy net (nothing needs backward) has none; in training, a layer whose bottoms need no
  gradient never writes them, and blobs above no loss are never read. View tops' diffs are lazy
  views of their bottom's (``Blob.view_diff_of``).
- **Recycling** (``Net(..., recycle=True)`` or ``net.recycle_memory()``; on in ``engine test``,
  off by default for pycaffe): for a net that runs forward only. Each blob's storage group (a
  blob, its in-place rewrites, its views) lives from the layer that writes it to its last
  reader; :func:`plan_slots` gives every group a slot of a shared pool by that liveness (best
  fit, a slot reused as soon as its last reader has run), each slot sized to the largest group
  it holds, and the blob's data becomes a view into its slot. The net's inputs, outputs and
  data layers' tops, and blobs named in ``net.keep_blobs(...)`` or ``net.forward(blobs=[...])``,
  keep their own arrays; any other blob's ``data`` holds, after a forward, whatever a later
  blob wrote into its slot. A recycled net refuses ``backward`` and forwards that start after
  layer 0 (their inputs may be gone); a new input shape re-plans on the next forward.
- **Workspaces** (im2col columns, padded copies, GEMM outputs before the NCHW transpose, the
  backward's scratch): one :class:`SharedWorkspace` per net, a buffer per name sized to the
  largest request of any layer, instead of one set per layer (Convolution's; Deconvolution,
  Im2col, the depthwise kernel and Pooling keep their own). Buffers requested with a fill value
  (zero-bordered padded copies, a vector of ones) stay each layer's own: they are small, and a
  shared one would need refilling at every call.
- **State kept for backward**: Convolution works on batch blocks of ~8 MB of columns
  (kernels.conv_forward_blocked), one block per thread at a time, and builds a block's columns
  again in backward, except that a batch of one block reuses its forward's columns. So a
  convolution that needs backward in a net that can run one keeps a one-block batch's
  ``columns`` private (at most ~8 MB per layer); every other convolution shares them, each
  thread lane in buffers of its own (``columns``, ``columns@1``...: ``Workspace.lane``), and a
  kept result whose shared buffer another layer took since is not reused
  (``_SharedView.kept``). LRN keeps its scale (a top-sized array; backward computes
  scale^-beta again, as Caffe does) only under the same rule. Pooling's max positions (argmax,
  int32 or int16, the top's size), Dropout's mask and BatchNorm's statistics stay with their
  layer: a fraction of the layer's top, written only by that layer's forward. The in-place
  planner's stand-ins (engine/in_place.py) exist only for layers whose backward reads an
  overwritten value.
- **Fillers** draw large blobs chunk by chunk into their float32 arrays (engine/fillers.py,
  ``fill_into``), and InnerProduct adds its weight gradient by row blocks, so neither makes a
  temporary the size of AlexNet's fc6 weights (151 MB; 302 MB in float64).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.blob import Blob
from engine.kernels import Workspace


# -- shared workspace ---------------------------------------------------------------------------
class SharedWorkspace:
    """Scratch buffers shared by every layer of a net: one flat buffer per name, grown to the
    largest request. Layers ask through :meth:`view`, which returns a :class:`Workspace`."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}
        self._last: dict[str, tuple] = {}  # name -> (user, shape, dtype) of the last get

    def view(self, user: object, private: Collection[str] = ()) -> Workspace:
        """The workspace ``user`` (a layer) computes in; the names in ``private`` stay the
        user's own (what its backward reuses from its forward)."""
        return _SharedView(self, user, frozenset(private))

    def get(self, user: object, name: str, shape: Sequence[int],
            dtype: np.dtype | type) -> np.ndarray:
        """Buffer ``name`` as an uninitialised array for ``user`` (filled buffers are never
        shared: ``_SharedView.get``)."""
        shape = tuple(int(n) for n in shape)
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < nbytes:
            buffer = np.empty(max(nbytes, 1), np.uint8)
            self._buffers[name] = buffer
        self._last[name] = (id(user), shape, dtype)
        return buffer[:nbytes].view(dtype).reshape(shape)

    def holders(self, array: np.ndarray) -> dict[str, tuple]:
        """The buffers ``array`` lies in, each with the key of its last request."""
        return {name: self._last.get(name) for name, buffer in self._buffers.items()
                if np.may_share_memory(array, buffer)}

    @property
    def nbytes(self) -> int:
        return sum(b.size for b in self._buffers.values())


class _SharedView(Workspace):
    """A layer's (or a batch block's) window on a SharedWorkspace, with Workspace's API.

    ``kept`` (a result its user keeps between calls: Convolution's one-block columns) reads as
    None once another user has been handed a buffer it lies in, so a backward never reuses
    columns a later layer overwrote; it stays valid in ``private`` buffers."""

    def __init__(self, shared: SharedWorkspace, user: object, private: frozenset[str],
                 suffix: str = "") -> None:
        self._shared, self._user, self._private = shared, user, private
        self._suffix = suffix  # a thread lane's: its own shared buffers
        self._marks: dict[str, tuple] = {}
        super().__init__()

    @property
    def kept(self) -> np.ndarray | None:
        if any(self._shared._last.get(n) != k for n, k in self._marks.items()):
            return None
        return self._kept

    @kept.setter
    def kept(self, value: np.ndarray | None) -> None:
        self._kept = value
        self._marks = {} if value is None else self._shared.holders(value)

    def child(self, key: object) -> Workspace:
        """A batch block's workspace: the same shared buffers (they do not reallocate for a
        shorter block), its fills tracked apart."""
        child = self._children.get(key)
        if child is None:
            child = _SharedView(self._shared, (self._user, key), self._private, self._suffix)
            self._children[key] = child
        return child

    def lane(self, index: int) -> Workspace:
        """Thread lane ``index``'s window: shared buffers of its own (``columns@1``...), which
        every layer's lane ``index`` shares."""
        if index == 0:
            return self
        key = ("lane", index)
        lane = self._children.get(key)
        if lane is None:
            lane = _SharedView(self._shared, (self._user, key), self._private,
                               f"{self._suffix}@{index}")
            self._children[key] = lane
        return lane

    def get(self, name: str, shape: Sequence[int], dtype: np.dtype | type,
            fill: float | None = None) -> np.ndarray:
        if name in self._private or fill is not None:
            # a filled buffer (a zero border around an interior each call writes) stays the
            # user's: shared, it would need refilling after every other layer (measured 2-4%
            # of a CIFAR10-quick training iteration); these are the small ones
            return super().get(name, shape, dtype, fill)
        return self._shared.get(self._user, name + self._suffix, shape, dtype)


# -- recycling ------------------------------------------------------------------------------------
@dataclass
class RecyclePlan:
    """``slots``: the pooled buffers; ``roots``: (blob, slot index) bound to them;
    ``keep``: the names that kept their own arrays; ``signature``: the input shapes planned for."""

    slots: list[np.ndarray] = field(default_factory=list)
    roots: list[tuple[Blob, int]] = field(default_factory=list)
    keep: frozenset[str] = frozenset()
    signature: tuple = ()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    def owns(self, blob: Blob) -> bool:
        return any(blob._data_buf is s for s in self.slots)


def storage_groups(bottom_vecs: Sequence[Sequence[Blob]], top_vecs: Sequence[Sequence[Blob]],
                   managed: Collection[int]) -> tuple[list[Blob], list[int], list[int],
                                                      dict[int, int]]:
    """Group blobs by the memory they live in (a blob, its in-place rewrites, its views).

    Returns each group's root blob (the one owning the memory), the layer that creates it, its
    last reader, and ``id(blob) -> group`` for every blob in ``managed`` (ids of named blobs).
    """
    roots: list[Blob] = []
    born: list[int] = []
    last: list[int] = []
    group_of: dict[int, int] = {}
    for i, (bottom, top) in enumerate(zip(bottom_vecs, top_vecs, strict=True)):
        for b in bottom:
            g = group_of.get(id(b))
            if g is not None:
                last[g] = max(last[g], i)
        for t in top:
            if id(t) in group_of or id(t) not in managed:
                continue  # in place (already grouped), or an anonymous top
            g = next((group_of[id(b)] for b in bottom if id(b) in group_of and t.count
                      and b.count and np.may_share_memory(t.data, b.data)), None)
            if g is None:
                g = len(roots)
                roots.append(t)
                born.append(i)
                last.append(i)
            group_of[id(t)] = g
    return roots, born, last, group_of


def plan_slots(sizes: Sequence[int], born: Sequence[int], last: Sequence[int],
               pinned: Sequence[bool]) -> tuple[list[int], list[int]]:
    """Assign each unpinned group a slot by liveness: groups born at layer i take a free slot
    (the smallest that fits, else the largest free one, grown, else a new one); a group frees
    its slot after its last reader ``last[g]`` has run. Returns (slot per group or -1, sizes)."""
    slot_of = [-1] * len(sizes)
    slot_sizes: list[int] = []
    free: list[int] = []
    order = sorted(range(len(sizes)), key=lambda g: born[g])
    layers = sorted(set(born) | set(last))
    by_birth: dict[int, list[int]] = {}
    by_death: dict[int, list[int]] = {}
    for g in order:
        if not pinned[g]:
            by_birth.setdefault(born[g], []).append(g)
            by_death.setdefault(last[g], []).append(g)
    for i in layers:
        for g in by_birth.get(i, ()):
            fits = [s for s in free if slot_sizes[s] >= sizes[g]]
            if fits:
                s = min(fits, key=lambda s: slot_sizes[s])
            elif free:
                s = max(free, key=lambda s: slot_sizes[s])
                slot_sizes[s] = sizes[g]
            else:
                s = len(slot_sizes)
                slot_sizes.append(sizes[g])
            if s in free:
                free.remove(s)
            slot_of[g] = s
        for g in by_death.get(i, ()):
            free.append(slot_of[g])
    return slot_of, slot_sizes


def plan_recycling(net, keep: Collection[str]) -> RecyclePlan:
    """Bind the net's recyclable blobs to pooled slots (module docstring) and return the plan."""
    names = {id(blob): name for name, blob in net.blobs.items()}
    roots, born, last, group_of = storage_groups(net.bottom_vecs, net.top_vecs, names)
    pinned = [False] * len(roots)
    for name in (*net.inputs, *net.outputs, *keep):
        g = group_of.get(id(net.blobs[name])) if name in net.blobs else None
        if g is not None:
            pinned[g] = True
    for g in range(len(roots)):  # data layers' tops: a prefetcher may hold on to them
        if not net.bottom_vecs[born[g]]:
            pinned[g] = True
    sizes = [root.count for root in roots]
    slot_of, slot_sizes = plan_slots(sizes, born, last, pinned)
    plan = RecyclePlan(keep=frozenset(keep), signature=input_signature(net))
    plan.slots = [np.empty(max(size, 1), net.dtype) for size in slot_sizes]
    for g, root in enumerate(roots):
        if slot_of[g] >= 0:
            plan.roots.append((root, slot_of[g]))
    return plan


def input_signature(net) -> tuple:
    return tuple(net.blobs[name].shape for name in net.inputs)


def bind(plan: RecyclePlan, previous: RecyclePlan | None, blobs: Sequence[Blob]) -> None:
    """Point every planned root into its slot; blobs ``previous`` had bound and this plan does
    not get arrays of their own again."""
    for root, s in plan.roots:
        buffer = plan.slots[s]
        root._data_buf = buffer
        root.data = buffer[:root.count].reshape(root.shape)
    if previous is not None:
        for blob in blobs:
            if previous.owns(blob):
                blob._data_buf = np.zeros(blob.count, blob.dtype)
                blob.data = blob._data_buf.reshape(blob.shape)
