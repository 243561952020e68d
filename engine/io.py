"""Reading and writing Caffe's files: prototxt (text), .caffemodel / .solverstate / .binaryproto
(binary protobuf) and the HDF5 model variant.

Reads fail with :class:`~engine.errors.ParseError` naming the file, and for text the
``file:line:col`` of the fault with close matches for a misspelt field or enum value. Nets and
solvers are upgraded from legacy formats on read (:mod:`engine.upgrade`). Writes are atomic: the
new content goes to a temporary file beside the target, is synced, then renamed over it, so a
failed write never destroys the previous file.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from io import BytesIO
from pathlib import Path
from typing import TypeVar

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message

from engine import caffe_pb2
from engine.blob import blob_proto_shape
from engine.errors import MokaError, ParseError
from engine.upgrade import (
    V1_LAYER_TYPES,
    net_needs_upgrade,
    upgrade_net,
    upgrade_snapshot_prefix,
    upgrade_solver,
)

M = TypeVar("M", bound=Message)
PathLike = str | os.PathLike

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

# V1/V0 spellings that users carry into current-format layers, with what to write instead.
_LEGACY_LAYER_FIELDS = {
    "blobs_lr": "param { lr_mult: ... } (one param block per blob)",
    "weight_decay": "param { decay_mult: ... } (one param block per blob)",
    "blob_share_mode": "param { share_mode: ... }",
}


# -- reading bytes -----------------------------------------------------------------------------
def _read_bytes(path: PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ParseError(f"{os.fspath(path)}: no such file") from None
    except IsADirectoryError:
        raise ParseError(f"{os.fspath(path)}: is a directory, not a file") from None
    except OSError as e:
        raise ParseError(f"{os.fspath(path)}: cannot read: {e.strerror or e}") from None


def _new(message: M | type[M]) -> M:
    return message() if isinstance(message, type) else message


# -- text ------------------------------------------------------------------------------------
def parse_text(text: str | bytes, message: M | type[M], source: str = "<string>") -> M:
    """Parse prototxt ``text`` into ``message`` (an instance, filled and returned, or a class).

    Errors become ``ParseError("{source}:{line}:{col}: {what}")`` with close-match hints.
    """
    message = _new(message)
    if isinstance(text, bytes):
        text = _decode(text, source)
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        unbalanced = _unbalanced_braces(text, source, e.GetLine())
        if unbalanced is not None:  # protobuf's message would blame a healthy field
            raise unbalanced from None
        raise _parse_error(e, text, message, source) from None
    return message


def read_text(path: PathLike, message: M | type[M]) -> M:
    """Read the prototxt file ``path`` into ``message`` (no legacy upgrade)."""
    return parse_text(_read_bytes(path), message, os.fspath(path))


def _decode(data: bytes, source: str) -> str:
    if b"\x00" in data or data.startswith(HDF5_SIGNATURE):
        raise ParseError(f"{source}: this is a binary file, not a text prototxt "
                         "(a .caffemodel, .solverstate or .binaryproto?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # old files carry Latin-1 in comments


def _brace_scan(text: str, stop: int | None = None
                ) -> tuple[list[tuple[int, int, str]], tuple[int, int] | None]:
    """Walk ``text`` (up to offset ``stop``) outside strings and comments.

    Returns the blocks still open there, innermost last, as (line, column, opening words), and
    the (line, column) of the first ``}`` that closes nothing, if any.
    """
    stack: list[tuple[int, int, str]] = []
    line, line_start, i, n = 1, 0, 0, len(text) if stop is None else min(stop, len(text))
    while i < n:
        c = text[i]
        if c == "\n":
            line, line_start = line + 1, i + 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            i = j + 1 if j < n and text[j] == c else j
            continue
        elif c in "{<":
            words = text[line_start:i].strip().rstrip(":").strip()
            stack.append((line, i - line_start + 1, f"{words} {c}".strip()))
        elif c in "}>":
            if not stack:
                return stack, (line, i - line_start + 1)
            stack.pop()
        i += 1
    return stack, None


def _unbalanced_braces(text: str, source: str, error_line: int = 0) -> ParseError | None:
    """A ParseError for a ``{`` never closed or a ``}`` that closes nothing, else None.

    A stray ``}`` after the line protobuf failed on is left to protobuf's message: a missing
    ``{`` (``shape dim: 1 }``) is reported best where the parser first stumbled.
    """
    stack, stray = _brace_scan(text)
    if stray is not None and error_line and error_line < stray[0]:
        return None
    if stray is not None:
        line, col = stray
        return ParseError(f"{source}:{line}:{col}: unbalanced braces: this '}}' closes no open "
                          "block; remove it, or add the '{' it was meant to close")
    if stack:
        line, col, words = stack[-1]
        more = (f" ({len(stack)} blocks are open at the end of the file, the outermost from "
                f"line {stack[0][0]})" if len(stack) > 1 else "")
        return ParseError(f"{source}:{line}:{col}: unbalanced braces: the block '{words}' "
                          f"opened on line {line} is never closed; a '}}' is missing at its "
                          f"end or inside it{more}")
    return None


def _parse_error(e: text_format.ParseError, text: str, message: Message,
                 source: str) -> ParseError:
    line, col = e.GetLine(), e.GetColumn()
    what = re.sub(r"^\d+:\d+ : ", "", str(e))
    if line:
        lines = text.splitlines()
        echoed = f"'{lines[line - 1]}': " if 0 < line <= len(lines) else None
        if echoed and what.startswith(echoed):
            what = what[len(echoed):]
    what = what.rstrip(".") + (_misplaced_hint(what, text, message, line)
                               or _hint(what, message))
    where = f"{source}:{line}:{col}" if line else source
    return ParseError(f"{where}: {what}")


def _misplaced_hint(what: str, text: str, message: Message, line: int) -> str:
    """A top-level field (``layer``, ``net``...) found inside a block means a ``}`` is missing
    above it, not that the field is wrong: name the block still open there."""
    field = re.search(r'Message type "([\w.]+)" has no field named "(\w+)"', what)
    if not field or not line or field.group(1) == message.DESCRIPTOR.full_name:
        return ""
    if field.group(2) not in message.DESCRIPTOR.fields_by_name:
        return ""
    offset = sum(len(part) for part in text.splitlines(keepends=True)[:line - 1])
    stack, _ = _brace_scan(text, offset)
    if not stack:
        return ""
    open_line, _, words = stack[0]
    return (f"; '{field.group(2)}' belongs at the top level: the block '{words}' opened on "
            f"line {open_line} is still open here, so a '}}' is probably missing above this line")


def _hint(what: str, message: Message) -> str:
    """Close matches for an unknown field or enum value named in protobuf's message."""
    pool = message.DESCRIPTOR.file.pool
    field = re.search(r'Message type "([\w.]+)" has no field named "(\w+)"', what)
    if field:
        try:
            descriptor = pool.FindMessageTypeByName(field.group(1))
        except KeyError:
            return ""
        return _field_hint(field.group(2), descriptor)
    enum = re.search(r'Enum type "([\w.]+)" has no value named (\S+)', what)
    if enum:
        try:
            descriptor = pool.FindEnumTypeByName(enum.group(1))
        except KeyError:
            return ""
        return _enum_hint(enum.group(2).rstrip(".").strip("\"'"), descriptor)
    bare = re.search(r"Expected string but found: '(\w+)'", what)
    if bare:
        word = bare.group(1)
        if V1_LAYER_TYPES.get(word):  # a V1 enum type written into a current-format layer
            return f'; layer types are quoted strings: type: "{V1_LAYER_TYPES[word]}"'
        return f'; strings take quotes: "{word}"'
    return ""


def _field_hint(name: str, descriptor) -> str:
    fields = list(descriptor.fields_by_name)
    close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
    hints = []
    if close:
        hints.append(f"did you mean {' or '.join(repr(c) for c in close)}?")
    if descriptor.full_name == "caffe.LayerParameter":
        if name in _LEGACY_LAYER_FIELDS:
            hints.append(f"'{name}' is V1 syntax; in a 'layer' write {_LEGACY_LAYER_FIELDS[name]}")
        owners = [f.name for f in descriptor.fields
                  if f.message_type is not None and f.name.endswith("_param")
                  and name in f.message_type.fields_by_name]
        if owners:
            shown = ", ".join(owners[:4]) + (", ..." if len(owners) > 4 else "")
            hints.append(f"'{name}' belongs inside a block such as {shown}")
    return "; " + "; ".join(hints) if hints else ""


def _enum_hint(value: str, descriptor) -> str:
    names = list(descriptor.values_by_name)
    upper = {n.upper(): n for n in names}
    close = [upper[c] for c in difflib.get_close_matches(value.upper(), upper, n=3, cutoff=0.6)]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    if descriptor.full_name == "caffe.V1LayerParameter.LayerType":
        hint += ("; 'layers' entries are V1 and take enum types (CONVOLUTION); current-format "
                 "entries are written layer { type: \"Convolution\" }")
    if len(names) <= 12:
        hint += f" (valid: {', '.join(names)})"
    return hint


# -- binary ----------------------------------------------------------------------------------
def read_binary(path: PathLike, message: M | type[M]) -> M:
    """Read a binary protobuf file (.caffemodel, .solverstate, .binaryproto) into ``message``."""
    message = _new(message)
    data = _read_bytes(path)
    kind = message.DESCRIPTOR.name
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ParseError(f"{os.fspath(path)}: cannot parse as a binary {kind}: the file is "
                         f"truncated or is not a {kind} ({e})") from None
    return message


def check_blob_proto(blob, path: PathLike, what: str) -> None:
    """A ParseError naming ``path`` and ``what`` unless ``blob``'s shape is valid and it holds
    exactly that many values (a truncated or corrupt file)."""
    n = len(blob.double_data) or len(blob.data)
    try:
        shape = blob_proto_shape(blob)
    except ValueError as exc:  # a negative dim, more than 32 axes
        raise ParseError(f"{os.fspath(path)}: {what}: {exc}; the file is corrupt") from None
    expected = math.prod(shape)
    if n != expected:
        raise ParseError(f"{os.fspath(path)}: {what} declares shape {shape} "
                         f"({expected} values) but holds {n}; the file is truncated or corrupt")


# -- nets ------------------------------------------------------------------------------------
def _looks_like_text(value: str) -> bool:
    return not os.path.exists(value) and any(c in value for c in "{}:\n")


def read_net_param(path_or_text: PathLike | caffe_pb2.NetParameter, *,
                   is_text: bool | None = None) -> caffe_pb2.NetParameter:
    """A net definition, upgraded to the current format.

    Accepts a prototxt path, prototxt text (``is_text=True``, or detected when the string names
    no file and looks like prototxt) or a NetParameter. A NetParameter that needs no upgrade is
    returned as is; one that does is copied first, so the caller's message is left untouched.
    """
    if isinstance(path_or_text, caffe_pb2.NetParameter):
        if not net_needs_upgrade(path_or_text):
            return path_or_text
        net = caffe_pb2.NetParameter()
        net.CopyFrom(path_or_text)
        return upgrade_net(net, "<NetParameter>")
    if isinstance(path_or_text, Message):
        raise MokaError(f"expected a NetParameter, got a {path_or_text.DESCRIPTOR.full_name}")
    if is_text is None:
        is_text = isinstance(path_or_text, str) and _looks_like_text(path_or_text)
    if is_text:
        source = "<string>"
        net = parse_text(os.fspath(path_or_text), caffe_pb2.NetParameter, source)
    else:
        source = os.fspath(path_or_text)
        net = read_text(source, caffe_pb2.NetParameter)
    return upgrade_net(net, source)


def read_net_binary(path: PathLike) -> caffe_pb2.NetParameter:
    """A .caffemodel (binary NetParameter, or Caffe's HDF5 layout), upgraded.

    The HDF5 form is recognised by its signature and read into layers that carry only a name
    and blobs, which is all that copying weights by layer name needs.
    """
    source = os.fspath(path)
    if _has_hdf5_signature(source):
        return _read_net_hdf5(source)
    net = read_binary(source, caffe_pb2.NetParameter)
    if not len(net.layer) and not len(net.layers) and os.path.getsize(source) > 0:
        raise ParseError(f"{source}: not a NetParameter (no layers found); is it a "
                         ".solverstate or .binaryproto?")
    upgrade_net(net, source)
    for layer in net.layer:
        for i, blob in enumerate(layer.blobs):
            check_blob_proto(blob, source, f"layer '{layer.name}' blob {i}")
    return net


def _has_hdf5_signature(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False  # read_binary reports the missing or unreadable file


def _read_net_hdf5(path: str) -> caffe_pb2.NetParameter:
    """Caffe's ``snapshot_format: HDF5`` model: one dataset per blob at ``/data/<layer>/<i>``."""
    import h5py

    net = caffe_pb2.NetParameter()
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f or not isinstance(f["data"], h5py.Group):
                raise ParseError(f"{path}: HDF5 file has no /data group; not a Caffe model")
            for name, group in f["data"].items():
                layer = net.layer.add(name=name)
                if not isinstance(group, h5py.Group):
                    raise ParseError(f"{path}: /data/{name} is not a group of blobs")
                _read_hdf5_blobs(group, layer, path)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ParseError(f"{path}: cannot read HDF5 model (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from None
    return net


def _read_hdf5_blobs(group, layer, path: str) -> None:
    if any(not key.isdigit() for key in group):
        raise ParseError(f"{path}: /data/{layer.name} holds {sorted(group)}; "
                         "expected datasets named 0, 1, ...")
    indices = sorted(int(key) for key in group)
    # A shared parameter is stored only by its owner, leaving a gap: keep an empty blob there.
    for i in range(indices[-1] + 1 if indices else 0):
        blob = layer.blobs.add()
        if str(i) in group:
            array = np.asarray(group[str(i)][()])
            blob.shape.dim.extend(array.shape)
            fill_blob_proto(blob, array)


# -- solvers ---------------------------------------------------------------------------------
def read_solver_param(path: PathLike | caffe_pb2.SolverParameter) -> caffe_pb2.SolverParameter:
    """A solver prototxt, upgraded (``solver_type`` → ``type``, inline nets, snapshot_prefix)."""
    if isinstance(path, caffe_pb2.SolverParameter):
        solver = caffe_pb2.SolverParameter()
        solver.CopyFrom(path)
        return upgrade_solver(solver, "<SolverParameter>")
    source = os.fspath(path)
    solver = read_text(source, caffe_pb2.SolverParameter)
    upgrade_solver(solver, source)
    upgrade_snapshot_prefix(solver, source)
    return solver


# -- blobs -----------------------------------------------------------------------------------
_BLOB_FIELD_NUMBERS = {(False, False): 5, (True, False): 6, (False, True): 8, (True, True): 9}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def fill_blob_proto(proto: caffe_pb2.BlobProto, array: np.ndarray, diff: bool = False) -> None:
    """Append ``array``'s values to ``proto``'s data (or diff): float64 arrays go to the double
    fields, everything else to the float ones. The shape is left to the caller.

    The values are merged in as one packed field already in wire format, which is several times
    faster than ``extend`` for the millions of values a model layer holds.
    """
    double = np.asarray(array).dtype == np.float64
    raw = np.ascontiguousarray(array, "<f8" if double else "<f4").tobytes()
    tag = _BLOB_FIELD_NUMBERS[diff, double] << 3 | 2  # wire type 2: length-delimited
    proto.MergeFromString(bytes([tag]) + _varint(len(raw)) + raw)


# -- blob files ------------------------------------------------------------------------------------
def read_blob_proto(path: PathLike) -> caffe_pb2.BlobProto:
    """A .binaryproto blob (e.g. a mean file), checked for a value count matching its shape."""
    blob = read_binary(path, caffe_pb2.BlobProto)
    if not (len(blob.data) or len(blob.double_data)):
        raise ParseError(f"{os.fspath(path)}: holds no blob values; not a .binaryproto blob")
    check_blob_proto(blob, path, "the blob")
    return blob


def write_blob_proto(blob_proto: caffe_pb2.BlobProto, path: PathLike) -> None:
    write_binary(blob_proto, path)


# -- writing ---------------------------------------------------------------------------------
@contextmanager
def _atomic_target(path: PathLike) -> Iterator[str]:
    """Yield a fresh temporary path beside ``path``; on success sync it and move it over."""
    target = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(target)
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise MokaError(f"cannot write {os.fspath(path)}: {e.strerror or e}") from e
        raise
    with suppress(OSError):  # make the rename itself durable where the platform allows
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


atomic_target = _atomic_target  # public: solvers/snapshot.py writes its files through it


def _write_bytes(data: bytes, path: PathLike) -> None:
    with _atomic_target(path) as tmp, open(tmp, "xb") as f:
        f.write(data)


def write_text(message: Message, path: PathLike) -> None:
    """Write ``message`` as prototxt, atomically."""
    _write_bytes(text_format.MessageToString(message).encode("utf-8"), path)


def write_binary(message: Message, path: PathLike) -> None:
    """Write ``message`` in protobuf's binary encoding, atomically."""
    _write_bytes(message.SerializeToString(), path)


@contextmanager
def hdf5_writer(path: PathLike) -> Iterator:
    """An ``h5py.File`` built in memory, written to ``path`` by plain file I/O when done.

    HDF5 writes much of a file when it closes it, and h5py only prints a failure there (a full
    disk): the file would look whole. Writing the finished bytes ourselves makes any failure an
    OSError, which the atomic writers turn into an error that keeps the previous file.
    """
    import h5py

    buffer = BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    with open(path, "wb") as out:
        out.write(buffer.getbuffer())


def write_net_hdf5(net: caffe_pb2.NetParameter, path: PathLike, write_diff: bool = False) -> None:
    """Write a net's blobs in Caffe's HDF5 model layout (``/data/<layer>/<i>``), atomically."""
    from engine.blob import blob_proto_array

    with _atomic_target(path) as tmp, hdf5_writer(tmp) as f:
        kinds = ("data", "diff") if write_diff else ("data",)
        for kind in kinds:
            root = f.create_group(kind)
            for layer in net.layer:
                group = root.create_group(layer.name)
                for i, blob in enumerate(layer.blobs):
                    diff = kind == "diff"
                    if diff and not (len(blob.diff) or len(blob.double_diff)):
                        continue
                    array = blob_proto_array(blob, blob_proto_shape(blob), diff=diff)
                    group.create_dataset(str(i), data=array)


# -- pycaffe's caffe.io --------------------------------------------------------------------------
# `import engine as caffe; caffe.io.Transformer(...)`: pycaffe's names live in engine.caffe_io
# (images, resizing, array <-> proto conversion) and are re-exported here, so this module stays
# the one file reader the rest of Moka imports and pycaffe code finds what it expects.
from engine.caffe_io import (  # noqa: E402, F401
    Transformer,
    array_to_blobproto,
    array_to_datum,
    arraylist_to_blobprotovector_str,
    blobproto_to_array,
    blobprotovector_str_to_arraylist,
    datum_to_array,
    load_image,
    oversample,
    resize_image,
)
