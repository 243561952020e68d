"""Nets written in Python: pycaffe's ``caffe.net_spec`` (``NetSpec``, ``layers``, ``params``).

    import engine as caffe
    from engine import layers as L, params as P

    n = caffe.NetSpec()
    n.data, n.label = L.Data(source="train_lmdb", backend=P.Data.LMDB, batch_size=64,
                             transform_param=dict(scale=1 / 256), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.relu1 = L.ReLU(n.pool1, in_place=True)
    n.loss = L.SoftmaxWithLoss(n.relu1, n.label)
    open("train.prototxt", "w").write(str(n.to_proto()))

``L.<Type>(*bottoms, **kwargs)`` describes one layer of Caffe type ``<Type>`` and returns its
top (a :class:`Top`), a tuple of tops (``ntop=2``...), or the :class:`Function` itself
(``ntop=0``). Keyword arguments fill the layer's ``LayerParameter``:

- ``ntop=N``: how many tops; ``in_place=True``: the tops are the bottoms (ReLU, Dropout...).
- a name ending in ``param`` (``param``, ``transform_param``, ``loss_param``...) is a field of
  the layer itself;
- any other name goes to the layer type's own ``<type>_param`` message when that message has
  such a field (``kernel_size`` to ``convolution_param``), as pycaffe matches each
  ``<Type>Parameter`` message of the schema to its layer type; otherwise to the layer itself
  (``name``, ``loss_weight``, ``include``, ``exclude``, ``propagate_down``...);
- dicts become messages, lists become repeated fields (a single value given to a repeated
  field becomes a one-item list), enum fields take numbers (``P.Pooling.MAX``) or names.

Layer and top names come from the ``NetSpec`` attribute names (a layer is named after its
first top; ``name=`` overrides it); anything unnamed gets ``<Type><count>``, as in pycaffe.
"""

from __future__ import annotations

import difflib
import functools
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from engine import caffe_pb2
from engine.errors import MokaError
from engine.protobuf_compat import is_repeated

__all__ = [
    "Function",
    "Layers",
    "NetSpec",
    "NetSpecError",
    "Parameters",
    "Top",
    "assign_proto",
    "layers",
    "param_name_dict",
    "params",
    "to_proto",
]

# Layer types that read another type's parameter message (not derivable from the schema).
PARAM_ALIASES = {"Deconvolution": "convolution"}


class NetSpecError(MokaError, AttributeError):
    """A keyword argument that fits no field of the layer (or of its ``*_param`` message)."""


@functools.cache
def _param_names() -> dict[str, str]:
    return param_name_dict()


def param_name_dict() -> dict[str, str]:
    """Layer type → the stem of its ``*_param`` field, from the schema (``"Convolution"`` →
    ``"convolution"``): every ``LayerParameter`` field ``<stem>_param`` of message type
    ``<Type>Parameter``."""
    out = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                out[type_name[:-len("Parameter")]] = field.name[:-len("_param")]
    return out


def _param_field(type_name: str) -> str | None:
    stem = PARAM_ALIASES.get(type_name) or _param_names().get(type_name)
    return None if stem is None else stem + "_param"


# -- filling messages ----------------------------------------------------------------------
def _hint(name: str, message: Any) -> str:
    close = difflib.get_close_matches(name, message.DESCRIPTOR.fields_by_name, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _scalar(field: FieldDescriptor, value: Any, where: str) -> Any:
    """A Python value for one scalar field: enum names become numbers."""
    if field.type == FieldDescriptor.TYPE_ENUM and isinstance(value, str):
        number = field.enum_type.values_by_name.get(value)
        if number is None:
            names = ", ".join(v.name for v in field.enum_type.values)
            raise NetSpecError(f"{where}: {value!r} is not one of {names}")
        return number.number
    return value


def _fill(message: Any, values: Any, where: str) -> None:
    """Fill a message from a dict (or copy a message of the same type)."""
    if isinstance(values, dict):
        for key, value in values.items():
            assign_proto(message, key, value, where)
    elif hasattr(values, "DESCRIPTOR") and values.DESCRIPTOR is message.DESCRIPTOR:
        message.MergeFrom(values)
    else:
        raise NetSpecError(f"{where}: expected a dict for message {message.DESCRIPTOR.name}, "
                           f"got {type(values).__name__}")


def assign_proto(proto: Any, name: str, val: Any, where: str | None = None) -> None:
    """Set field ``name`` of message ``proto`` from a Python value (pycaffe's rules): dicts
    become messages, lists repeated fields; a non-list value for a repeated field is a
    one-item list. Raises :class:`NetSpecError` (an ``AttributeError``) for an unknown field."""
    where = f"{where or proto.DESCRIPTOR.name}.{name}"
    field = proto.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise NetSpecError(f"{where}: {proto.DESCRIPTOR.name} has no field {name!r}"
                           + _hint(name, proto))
    is_message = field.type == FieldDescriptor.TYPE_MESSAGE
    try:
        if is_repeated(field):
            items = list(val) if isinstance(val, list | tuple) else [val]
            target = getattr(proto, name)
            for item in items:
                if is_message:
                    _fill(target.add(), item, where)
                else:
                    target.append(_scalar(field, item, where))
        elif is_message:
            _fill(getattr(proto, name), val, where)
        else:
            setattr(proto, name, _scalar(field, val, where))
    except (TypeError, ValueError) as e:
        raise NetSpecError(f"{where}: {e}") from None


# -- the graph ---------------------------------------------------------------------------------
class Top:
    """One output blob of a layer (the ``n``-th top of Function ``fn``)."""

    def __init__(self, fn: Function, n: int) -> None:
        self.fn = fn
        self.n = n

    def to_proto(self) -> Any:
        """A NetParameter holding every layer needed to compute this top."""
        return to_proto(self)

    def _to_proto(self, layers: dict, names: dict, autonames: Counter) -> None:
        self.fn._to_proto(layers, names, autonames)

    def __repr__(self) -> str:
        return f"<Top {self.n} of {self.fn.type_name}>"


class Function:
    """One layer: its Caffe type, its bottoms (Tops) and its keyword parameters."""

    def __init__(self, type_name: str, inputs: tuple, params: dict[str, Any]) -> None:
        self.type_name = type_name
        for index, bottom in enumerate(inputs):
            if not isinstance(bottom, Top):
                raise TypeError(f"{type_name} input {index} is not a Top "
                                f"(type is {type(bottom)})")
        self.inputs = inputs
        self.params = params
        self.ntop = int(params.pop("ntop", 1))
        self.in_place = bool(params.pop("in_place", False))
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _autoname(self, autonames: Counter) -> str:
        autonames[self.type_name] += 1
        return f"{self.type_name}{autonames[self.type_name]}"

    def _top_name(self, top: Top, names: dict, autonames: Counter) -> str:
        if top not in names:
            names[top] = self._autoname(autonames)
        return names[top]

    def _name(self, names: dict, autonames: Counter) -> str:
        if self not in names:
            names[self] = (self._top_name(self.tops[0], names, autonames) if self.ntop > 0
                           else self._autoname(autonames))
        return names[self]

    def _to_proto(self, layers: dict, names: dict, autonames: Counter) -> None:
        if self in layers:
            return
        bottoms = []
        for bottom in self.inputs:
            bottom._to_proto(layers, names, autonames)
            bottoms.append(layers[bottom.fn].top[bottom.n])
        layer = caffe_pb2.LayerParameter(type=self.type_name)
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(bottoms)
        else:
            layer.top.extend(self._top_name(top, names, autonames) for top in self.tops)
        layer.name = self._name(names, autonames)
        where = f"{self.type_name} layer '{layer.name}'"
        own = _param_field(self.type_name)
        for key, value in self.params.items():
            if key.endswith("param") or own is None:
                assign_proto(layer, key, value, where)
            elif key in getattr(layer, own).DESCRIPTOR.fields_by_name:
                assign_proto(getattr(layer, own), key, value, f"{where} {own}")
            elif key in layer.DESCRIPTOR.fields_by_name:
                assign_proto(layer, key, value, where)
            else:
                message = getattr(layer, own)
                hint = _hint(key, message) or _hint(key, layer)
                raise NetSpecError(f"{where}: {key!r} is a field of neither {own} "
                                   f"({message.DESCRIPTOR.name}) nor LayerParameter{hint}")
        layers[self] = layer

    def __repr__(self) -> str:
        return f"<Function {self.type_name} ({self.ntop} tops)>"


def to_proto(*tops: Top) -> Any:
    """A NetParameter with every layer needed to compute ``tops`` (names made up)."""
    return _net_param(tops, {})


def _net_param(tops: Iterable[Top | Function], names: dict) -> Any:
    """The layers that compute ``tops``, in dependency order; ``names`` maps Tops and Functions
    to the names they were given (the rest are made up as ``<Type><k>``)."""
    layers: dict = OrderedDict()
    autonames: Counter = Counter()
    for top in tops:
        top._to_proto(layers, names, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Named tops: ``n.conv1 = L.Convolution(n.data, ...)``; ``n.to_proto()`` emits every
    layer needed for them, named after the attributes they were assigned to."""

    def __init__(self) -> None:
        object.__setattr__(self, "tops", OrderedDict())

    def __setattr__(self, name: str, value: Top | Function) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str) -> Top | Function:
        try:
            return self.__dict__["tops"][name]
        except KeyError:
            raise AttributeError(f"this NetSpec has no top named {name!r}") from None

    def __setitem__(self, name: str, value: Top | Function) -> None:
        self.tops[name] = value

    def __getitem__(self, name: str) -> Top | Function:
        return self.tops[name]

    def __delitem__(self, name: str) -> None:
        del self.tops[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tops

    def __iter__(self) -> Iterator[str]:
        return iter(self.tops)

    def keys(self) -> list[str]:
        return list(self.tops)

    def vals(self) -> list[Top | Function]:
        return list(self.tops.values())

    def to_proto(self) -> Any:
        return _net_param(self.tops.values(), {value: name for name, value in self.tops.items()})


class Layers:
    """``layers.Convolution(bottom, kernel_size=3)``: a factory per Caffe layer type."""

    def __getattr__(self, type_name: str) -> Callable[..., Any]:
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def layer_fn(*args: Top, **kwargs: Any) -> Top | tuple[Top, ...] | Function:
            fn = Function(type_name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        layer_fn.__name__ = layer_fn.__qualname__ = type_name
        layer_fn.__doc__ = f"A {type_name} layer: returns its top(s); see engine.net_spec."
        return layer_fn


class Parameters:
    """``params.Pooling.MAX``: the enums of ``<Type>Parameter`` messages (and top-level
    schema enums: ``params.Phase.TEST``)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for candidate in (name + "Parameter", name):
            found = getattr(caffe_pb2, candidate, None)
            if found is not None and hasattr(found, "DESCRIPTOR"):
                return found
        known = [n[:-len("Parameter")] for n in caffe_pb2.DESCRIPTOR.message_types_by_name
                 if n.endswith("Parameter")]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise AttributeError(f"no {name}Parameter message in the schema{hint}")


layers = Layers()
params = Parameters()
