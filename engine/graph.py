"""NetParameter → NetParameter passes that Caffe runs before building a net.

``filter_net`` keeps the layers whose include/exclude rules the NetState meets (Caffe's
``FilterNet``); ``insert_splits`` adds a Split layer wherever one top feeds several bottoms, with
Caffe's names, so that each consumer gets its own diff (util/insert_splits.cpp).
"""

from __future__ import annotations

from engine import caffe_pb2
from engine.errors import NetError


def state_meets_rule(state, rule) -> bool:
    """Caffe's ``StateMeetsRule``: phase, level range, required stages and excluded stages."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def layer_included(state, layer) -> bool:
    """With include rules, any met rule includes the layer; otherwise any met exclude drops it."""
    if layer.include and layer.exclude:
        raise NetError(f"layer '{layer.name}': specify either include rules or exclude rules, "
                       "not both")
    if layer.include:
        return any(state_meets_rule(state, rule) for rule in layer.include)
    return not any(state_meets_rule(state, rule) for rule in layer.exclude)


def filter_net(net, state):
    """A copy of ``net`` without the layers that ``state`` rules out."""
    filtered = caffe_pb2.NetParameter()
    filtered.CopyFrom(net)
    del filtered.layer[:]
    for layer in net.layer:
        if layer_included(state, layer):
            filtered.layer.add().CopyFrom(layer)
    return filtered


def split_layer_name(blob: str, layer: str, top_index: int) -> str:
    return f"{blob}_{layer}_{top_index}_split"


def split_top_name(blob: str, layer: str, top_index: int, split_index: int) -> str:
    return f"{split_layer_name(blob, layer, top_index)}_{split_index}"


def insert_splits(net):
    """A copy of ``net`` where each blob read by more than one bottom goes through a Split.

    The split layer is named ``<blob>_<layer>_<top>_split`` after the producing layer and top
    index, its tops ``..._split_<j>``. A loss weight on the original top moves to split top 0.
    """
    producer: dict[str, tuple[int, int]] = {}  # blob name -> (layer index, top index)
    readers: dict[tuple[int, int], int] = {}  # (layer, top) -> bottoms reading it so far
    bottom_source: dict[tuple[int, int], tuple[int, int]] = {}
    for i, layer in enumerate(net.layer):
        for j, name in enumerate(layer.bottom):
            if name not in producer:
                raise NetError(f"layer '{layer.name}' ({layer.type}): unknown bottom blob "
                               f"'{name}' (bottom {j}); no earlier layer produces it")
            source = producer[name]
            bottom_source[(i, j)] = source
            readers[source] = readers.get(source, 0) + 1
        for j, name in enumerate(layer.top):
            producer[name] = (i, j)

    split_net = caffe_pb2.NetParameter()
    split_net.CopyFrom(net)
    del split_net.layer[:]
    taken: dict[tuple[int, int], int] = {}
    for i, layer in enumerate(net.layer):
        new = split_net.layer.add()
        new.CopyFrom(layer)
        for j, name in enumerate(layer.bottom):
            source = bottom_source[(i, j)]
            if readers[source] > 1:
                src_layer = net.layer[source[0]].name
                new.bottom[j] = split_top_name(name, src_layer, source[1], taken.get(source, 0))
                taken[source] = taken.get(source, 0) + 1
        for j, name in enumerate(layer.top):
            count = readers.get((i, j), 0)
            if count > 1:
                _append_split(split_net, layer, new, j, name, count)
    return split_net


def _append_split(split_net, layer, new, top_index: int, blob: str, count: int) -> None:
    split = split_net.layer.add()
    split.name = split_layer_name(blob, layer.name, top_index)
    split.type = "Split"
    split.bottom.append(blob)
    for k in range(count):
        split.top.append(split_top_name(blob, layer.name, top_index, k))
    if top_index < len(layer.loss_weight) and layer.loss_weight[top_index] != 0:
        split.loss_weight.append(layer.loss_weight[top_index])
        split.loss_weight.extend([0.0] * (count - 1))
        new.loss_weight[top_index] = 0.0
