"""Fuzzing Moka's readers with mutated copies of the shipped models' files.

Each case takes one real file (a prototxt, a .caffemodel in binary or HDF5 form, a .solverstate,
a mean .binaryproto, LMDB Datum records, an HDF5 data file, an image list or an image), applies
a few mutations, and does what a user would do with it: build the net and run one forward pass,
load the weights, restore the solver, read the mean. The contract (issue 10): the case either
works or fails with a :class:`~engine.errors.MokaError` whose message names a location (the
file, a layer or a blob); never another exception type, never more than 10 seconds.

``tests/test_fuzz.py`` drives the same mutations from hypothesis for a bounded CI run. The long
campaign runs here, each case in a forked worker with a per-case alarm::

    PYTHONPATH=$PWD python tests/fuzz_campaign.py --cases 10000 --workers 2

and prints the counts by outcome: ok, clear error, internal error, no location, timeout.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CASE_SECONDS = 10.0
FUZZ_MEMORY_LIMIT = 512 << 20  # every case builds its nets under this budget

KINDS = ("net_text", "solver_text", "caffemodel", "caffemodel_h5", "solverstate", "mean",
         "datum", "hdf5_data", "image_list", "image")

INTERESTING_INTS = (0, -1, 1, 2, 3, 7, 255, 1000000000, 1000000000000, 2**31 - 1, 2**31,
                    2**32, 2**63 - 1, -(2**31), 65536)
INTERESTING_FLOATS = ("0", "-1", "1e300", "-1e300", "nan", "inf", "-inf", "1e-300", "0.5", "1e9")
WORDS = ("Foo", "Convolution", "InnerProduct", "Pooling", "ReLU", "Data", "Input", "Softmax",
         "SoftmaxWithLoss", "Accuracy", "gaussian", "xavier", "constant", "bilinear", "msra",
         "Python", "LSTM", "Concat", "Slice", "Reshape", "Flatten", "Eltwise", "Crop", "Scale",
         "BatchNorm", "Deconvolution", "Embed", "Split", "conv1", "data", "label", "ip1", "ip2",
         "pool1", "loss", "MAX", "AVE", "STOCHASTIC", "TRAIN", "TEST", "LMDB", "LEVELDB", "")
FIELDS = ("num_output", "kernel_size", "stride", "pad", "dim", "batch_size", "axis", "group",
          "dilation", "kernel_h", "kernel_w", "stride_h", "pad_w", "top", "bottom", "name",
          "type", "lr_mult", "decay_mult", "scale", "crop_size", "mean_value", "std", "value",
          "max_iter", "test_iter", "base_lr", "weight_decay", "momentum", "num_axes", "slice_point",
          "concat_dim", "operation", "coeff", "engine", "include", "exclude", "phase",
          "loss_weight")
TOKENS = ("}", "{", ":", '"', "layer {", "}}", "{{", "#", ";", "\\", "'", "\x00", "\xff",
          "param { }", 'include { phase: TRAIN }', "bottom: \"data\"", "top: \"data\"",
          "dim: 0", "num_output: 0", "kernel_size: 0", "stride: 0", "group: 0", "axis: 7",
          "layer { name: \"x\" type: \"Foo\" }")


@dataclass
class Outcome:
    kind: str  # ok, clear, internal, no_location, timeout
    detail: str = ""


# -- text mutations --------------------------------------------------------------------------------
def _tokens_of(text: str) -> list[tuple[int, int]]:
    """(start, end) spans of numbers, quoted strings and identifiers in ``text``."""
    import re

    return [m.span() for m in re.finditer(r'"[^"\n]*"|-?\d[\w.+-]*|[A-Za-z_]\w*', text)]


def mutate_text(text: str, ops: list[tuple[int, int, int]]) -> str:
    """Apply ``ops``: (operation, position seed, value seed) triples, positions taken modulo."""
    for op, pos, val in ops:
        lines = text.splitlines(keepends=True)
        spans = _tokens_of(text)
        op %= 10
        if op == 0 and spans:  # a token becomes an interesting number
            s, e = spans[pos % len(spans)]
            pool = [str(v) for v in INTERESTING_INTS] + list(INTERESTING_FLOATS)
            text = text[:s] + pool[val % len(pool)] + text[e:]
        elif op == 1 and spans:  # a token becomes another word (quoted half the time)
            s, e = spans[pos % len(spans)]
            word = WORDS[val % len(WORDS)]
            text = text[:s] + (f'"{word}"' if val % 2 else word) + text[e:]
        elif op == 2 and spans:  # a token becomes a field name
            s, e = spans[pos % len(spans)]
            text = text[:s] + FIELDS[val % len(FIELDS)] + text[e:]
        elif op == 3 and lines:  # drop a line
            del lines[pos % len(lines)]
            text = "".join(lines)
        elif op == 4 and lines:  # repeat a line
            i = pos % len(lines)
            lines.insert(i, lines[i])
            text = "".join(lines)
        elif op == 5 and text:  # drop one character
            i = pos % len(text)
            text = text[:i] + text[i + 1:]
        elif op == 6:  # insert a token
            i = pos % (len(text) + 1)
            text = text[:i] + " " + TOKENS[val % len(TOKENS)] + " " + text[i:]
        elif op == 7 and text:  # cut the file short
            text = text[:pos % len(text)]
        elif op == 8 and spans:  # an interesting float where a number was
            s, e = spans[pos % len(spans)]
            text = text[:s] + INTERESTING_FLOATS[val % len(INTERESTING_FLOATS)] + text[e:]
        elif op == 9 and "{" in text:  # drop one brace
            braces = [i for i, c in enumerate(text) if c in "{}"]
            i = braces[pos % len(braces)]
            text = text[:i] + text[i + 1:]
    return text


# -- binary mutations ------------------------------------------------------------------------------
def mutate_bytes(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    for op, pos, val in ops:
        op %= 5
        n = len(data)
        if op == 0 and n:  # flip a byte
            i = pos % n
            data = data[:i] + bytes([data[i] ^ (1 + val % 255)]) + data[i + 1:]
        elif op == 1 and n:  # truncate
            data = data[:pos % n]
        elif op == 2:  # insert bytes
            i = pos % (n + 1)
            data = data[:i] + val.to_bytes(8, "little") + data[i:]
        elif op == 3 and n:  # delete a span
            i = pos % n
            data = data[:i] + data[i + 1 + val % 64:]
        elif op == 4 and n:  # a byte becomes 0xff (huge varints, lengths)
            i = pos % n
            data = data[:i] + b"\xff" + data[i + 1:]
    return data


def _repeated(field) -> bool:
    is_repeated = getattr(field, "is_repeated", None)  # protobuf 6+; `label` before
    return bool(is_repeated) if is_repeated is not None else field.label == 3


def _scalar_sites(message, sites: list, depth: int = 0) -> list:
    """(message, field, index) for every set value, recursively; long repeated fields once."""
    for field, value in message.ListFields():
        if field.message_type is not None:
            items = value if _repeated(field) else [value]
            for item in list(items)[:64]:
                _scalar_sites(item, sites, depth + 1)
        elif _repeated(field):
            sites.extend((message, field, i) for i in range(min(len(value), 8)))
            sites.append((message, field, -1))  # -1: shorten the list
        else:
            sites.append((message, field, None))
    return sites


def _interesting_value(field, val: int):
    fd = field
    if fd.type in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        return float(INTERESTING_FLOATS[val % len(INTERESTING_FLOATS)])
    if fd.type == fd.TYPE_BOOL:
        return bool(val % 2)
    if fd.type == fd.TYPE_STRING:
        return WORDS[val % len(WORDS)]
    if fd.type == fd.TYPE_BYTES:
        return bytes([val % 256]) * (val % 7)
    if fd.type == fd.TYPE_ENUM:
        values = [v.number for v in fd.enum_type.values]
        return values[val % len(values)]
    lo, hi = {fd.TYPE_INT32: (-(2**31), 2**31 - 1), fd.TYPE_SINT32: (-(2**31), 2**31 - 1),
              fd.TYPE_UINT32: (0, 2**32 - 1), fd.TYPE_UINT64: (0, 2**64 - 1),
              fd.TYPE_FIXED32: (0, 2**32 - 1), fd.TYPE_FIXED64: (0, 2**64 - 1)
              }.get(fd.type, (-(2**63), 2**63 - 1))
    return min(max(INTERESTING_INTS[val % len(INTERESTING_INTS)], lo), hi)


def mutate_message(message, ops: list[tuple[int, int, int]]) -> None:
    """Set values of a parsed protobuf message to interesting ones, in place."""
    for op, pos, val in ops:
        sites = _scalar_sites(message, [])
        if not sites:
            return
        owner, field, index = sites[pos % len(sites)]
        if op % 3 == 0 and not _repeated(field):
            owner.ClearField(field.name)
            continue
        if index == -1:
            values = getattr(owner, field.name)
            del values[val % (len(values) + 1):]
            continue
        value = _interesting_value(field, val)
        if index is None:
            setattr(owner, field.name, value)
        else:
            getattr(owner, field.name)[index] = value


def _datasets(f) -> list[str]:
    import h5py

    names: list[str] = []
    f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
    return names


def mutate_hdf5(path: Path, ops: list[tuple[int, int, int]]) -> None:
    """Reshape, retype, drop or rename datasets of an HDF5 file, in place."""
    import h5py

    with h5py.File(path, "r+") as f:
        for op, pos, val in ops:
            names = _datasets(f)
            if not names:
                return
            name = names[pos % len(names)]
            data = f[name][()]
            with contextlib.suppress(ValueError, TypeError):  # a mutation it cannot take
                _replace_dataset(f, name, data, op, val)


def _replace_dataset(f, name: str, data, op: int, val: int) -> None:
    del f[name]
    op %= 6
    if op == 0:  # drop it
        return
    if op == 1:  # rename
        f[name + "_x"] = data
    elif op == 2:  # another dtype
        f[name] = np.asarray(data).astype((np.int8, np.float64, "S3", np.bool_)[val % 4])
    elif op == 3:  # zero rows / one axis fewer / one more
        arr = np.atleast_1d(np.asarray(data))
        f[name] = (arr[:0], arr.reshape(-1), arr[None], arr.reshape(-1)[:1])[val % 4]
    elif op == 4:  # a scalar
        f[name] = np.float32(val)
    else:  # extreme values
        arr = np.array(data, dtype=np.float64)
        if arr.size:
            arr.reshape(-1)[val % arr.size] = float(INTERESTING_FLOATS[val % 10])
        f[name] = arr


# -- the seed files --------------------------------------------------------------------------------
class Seeds:
    """Builds once, in a scratch folder, every file a case mutates."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = root / "models"
        if not self.models.exists():
            shutil.copytree(REPO / "models", self.models,
                            ignore=shutil.ignore_patterns("snapshots", "__pycache__"))
        self.texts = {
            "lenet": (REPO / "models/lenet/lenet.prototxt").read_text(),
            "lenet_train_test": (REPO / "models/lenet/lenet_train_test.prototxt").read_text(),
            "lstm": (REPO / "models/lstm_sequence/lstm_train_test.prototxt").read_text(),
            "finetune": (REPO / "models/finetune_digits/finetune_train_test.prototxt").read_text(),
            "zoo": (REPO / "tests/fuzz_zoo.prototxt").read_text(),  # most layer types
        }
        try:  # the fork layers (Normalize, Permute, PriorBox, DetectionOutput) in SSD's head
            from test_fork_nets import ssd_head

            self.texts["ssd"] = ssd_head(batch=1, size=32)
        except ImportError:
            pass
        self.solver_text = (REPO / "models/lenet/lenet_solver.prototxt").read_text()
        seeds = root / "seeds"
        if not (seeds / "done").exists():
            seeds.mkdir(exist_ok=True)
            self._build(seeds)
            (seeds / "done").write_text("")
        self.seeds = seeds

    def _build(self, seeds: Path) -> None:
        import engine
        from engine.data.db import read_lmdb, write_mean
        from engine.data.image import encode_image
        from engine.io import write_net_hdf5
        from solvers.solver import get_solver

        cwd = os.getcwd()
        os.chdir(self.root)
        try:
            net = engine.Net("models/lenet/lenet.prototxt", engine.TEST)
            net.save(str(seeds / "lenet.caffemodel"))
            write_net_hdf5(net.to_proto(), seeds / "lenet.caffemodel.h5")
            solver_text = self.solver_text.replace(
                'snapshot_prefix: "models/lenet/snapshots/lenet"',
                f'snapshot_prefix: "{seeds}/lenet"')
            (seeds / "solver.prototxt").write_text(solver_text)
            solver = get_solver(str(seeds / "solver.prototxt"))
            solver.step(1)
            _, state = solver.snapshot()
            os.replace(state, seeds / "lenet.solverstate")
            write_mean(str(seeds / "mean.binaryproto"),
                       np.random.default_rng(0).uniform(0, 16, (1, 8, 8)).astype(np.float32))
            records = read_lmdb("models/lenet/digits_test_lmdb")[:8]
            for i, (_key, value) in enumerate(records):
                (seeds / f"datum{i}.bin").write_bytes(value)
            images = seeds / "images"
            images.mkdir()
            rng = np.random.default_rng(1)
            lines = []
            for i in range(4):
                pixels = rng.integers(0, 256, (3, 6, 5), dtype=np.uint8)
                (images / f"im{i}.png").write_bytes(encode_image(pixels, "PNG"))
                lines.append(f"im{i}.png {i % 2}\n")
            (seeds / "list.txt").write_text("".join(lines))
        finally:
            os.chdir(cwd)


# -- the cases -------------------------------------------------------------------------------------
NET_TEXTS = ("lenet", "lenet_train_test", "lstm", "finetune", "zoo", "ssd", "zoo")


def _ops(rnd: random.Random, n: int | None = None) -> list[tuple[int, int, int]]:
    n = n if n is not None else rnd.choice((1, 1, 1, 2, 3))
    return [(rnd.randrange(1 << 16), rnd.randrange(1 << 30), rnd.randrange(1 << 30))
            for _ in range(n)]


def _sealed(state) -> bytes:
    """A mutated SolverState re-sealed with its SHA-256, so the checks behind the seal run."""
    import hashlib

    from engine import caffe_pb2

    if "moka_sha256" not in state.DESCRIPTOR.fields_by_name:
        return state.SerializeToString()
    state.ClearField("moka_sha256")
    body = state.SerializeToString()
    seal = caffe_pb2.SolverState(moka_sha256=hashlib.sha256(body).hexdigest())
    return body + seal.SerializeToString()


def random_case(rnd: random.Random) -> tuple[str, int, list[tuple[int, int, int]]]:
    """A case as plain data: (kind, variant seed, mutation ops)."""
    kind = "net_text" if rnd.random() < 0.3 else rnd.choice(KINDS)  # the richest kind
    return kind, rnd.randrange(1 << 16), _ops(rnd)


def _forward(net) -> None:
    net.forward()


def run_case(seeds: Seeds, case: tuple[str, int, list], work: Path) -> list[str]:
    """Build and run one case in ``work`` (the current folder is ``seeds.root``).

    Returns the paths (and names) an error message may name as its location.
    """
    import engine
    from engine import caffe_pb2
    from engine.data.db import read_mean, write_lmdb
    from engine.io import read_binary, read_blob_proto
    from solvers.solver import get_solver

    kind, variant, ops = case
    structural = variant % 2 == 0
    lenet = str(seeds.root / "models/lenet/lenet.prototxt")
    if kind == "net_text":
        name = NET_TEXTS[variant % len(NET_TEXTS)]
        text = seeds.texts.get(name, seeds.texts["zoo"])
        if variant % 3 == 0:  # parse, mutate values, print back: valid syntax, odd contents
            net_param = engine.io.parse_text(text, caffe_pb2.NetParameter)
            mutate_message(net_param, ops)
            from google.protobuf import text_format

            text = text_format.MessageToString(net_param)
        else:
            text = mutate_text(text, ops)
        path = work / f"{name}.prototxt"
        path.write_text(text, errors="surrogateescape")
        net = engine.Net(str(path), engine.TEST if variant % 4 < 2 else engine.TRAIN)
        _forward(net)
        net.backward()
        return [str(path), path.name]
    if kind == "solver_text":
        text = mutate_text(seeds.solver_text, ops).replace(
            "models/lenet/snapshots", str(work / "snapshots"))
        (work / "snapshots").mkdir()
        path = work / "solver.prototxt"
        path.write_text(text)
        get_solver(str(path))
        return [str(path), path.name]
    if kind in ("caffemodel", "solverstate", "mean"):
        source = {"caffemodel": "lenet.caffemodel", "solverstate": "lenet.solverstate",
                  "mean": "mean.binaryproto"}[kind]
        data = (seeds.seeds / source).read_bytes()
        message_type = {"caffemodel": caffe_pb2.NetParameter,
                        "solverstate": caffe_pb2.SolverState,
                        "mean": caffe_pb2.BlobProto}[kind]
        if structural:
            message = message_type.FromString(data)
            mutate_message(message, ops)
            data = _sealed(message) if kind == "solverstate" else message.SerializeToString()
        else:
            data = mutate_bytes(data, ops)
        path = work / source
        path.write_bytes(data)
        if kind == "caffemodel":
            net = engine.Net(lenet, engine.TEST, weights=str(path))
            _forward(net)
        elif kind == "solverstate":
            solver_path = seeds.seeds / "solver.prototxt"
            read_binary(path, caffe_pb2.SolverState)
            solver = get_solver(str(solver_path))
            solver.restore(str(path))
        else:
            read_blob_proto(path)
            read_mean(str(path))
            text = seeds.texts["lenet_train_test"].replace(
                "scale: 0.0625", f'scale: 0.0625 mean_file: "{path}"')
            net_path = work / "mean_net.prototxt"
            net_path.write_text(text)
            _forward(engine.Net(str(net_path), engine.TEST))
        return [str(path), path.name]
    if kind == "caffemodel_h5":
        path = work / "lenet.caffemodel.h5"
        shutil.copy(seeds.seeds / "lenet.caffemodel.h5", path)
        if structural:
            mutate_hdf5(path, ops)
        else:
            path.write_bytes(mutate_bytes(path.read_bytes(), ops))
        _forward(engine.Net(lenet, engine.TEST, weights=str(path)))
        return [str(path), path.name]
    if kind == "datum":
        records = []
        for i in range(8):
            value = (seeds.seeds / f"datum{i}.bin").read_bytes()
            if i == variant % 8:
                if structural:
                    datum = caffe_pb2.Datum.FromString(value)
                    mutate_message(datum, ops)
                    value = datum.SerializeToString()
                else:
                    value = mutate_bytes(value, ops)
            records.append((f"{i:08d}".encode(), value))
        db = work / "datum_lmdb"
        write_lmdb(str(db), records)
        text = seeds.texts["lenet_train_test"].replace(
            "models/lenet/digits_test_lmdb", str(db)).replace("batch_size: 120", "batch_size: 8")
        net_path = work / "datum_net.prototxt"
        net_path.write_text(text)
        net = engine.Net(str(net_path), engine.TEST)
        _forward(net)
        _forward(net)
        return [str(db), db.name]
    if kind == "hdf5_data":
        path = work / "train.h5"
        shutil.copy(seeds.root / "models/lstm_sequence/train.h5", path)
        if structural:
            mutate_hdf5(path, ops)
        else:
            path.write_bytes(mutate_bytes(path.read_bytes(), ops))
        listing = work / "h5_list.txt"
        listing.write_text(f"{path}\n")
        text = seeds.texts["lstm"].replace("models/lstm_sequence/test_h5.txt", str(listing))
        net_path = work / "h5_net.prototxt"
        net_path.write_text(text)
        net = engine.Net(str(net_path), engine.TEST)
        _forward(net)
        return [str(path), path.name, str(listing)]
    if kind in ("image_list", "image"):
        images = work / "images"
        shutil.copytree(seeds.seeds / "images", images)
        listing = work / "list.txt"
        text = (seeds.seeds / "list.txt").read_text()
        located = [str(listing), listing.name]
        if kind == "image_list":
            text = mutate_text(text, ops)
        else:
            target = images / f"im{variant % 4}.png"
            target.write_bytes(mutate_bytes(target.read_bytes(), ops))
            located += [str(target), target.name]
        listing.write_text(text)
        net_path = work / "image_net.prototxt"
        crop = "crop_size: 4" if variant % 3 == 0 else ""
        net_path.write_text(
            'layer { name: "data" type: "ImageData" top: "data" top: "label" '
            f'image_data_param {{ source: "{listing}" root_folder: "{images}/" batch_size: 3 '
            f'{"shuffle: true" if variant % 2 else ""} }} transform_param {{ {crop} }} }}')
        net = engine.Net(str(net_path), engine.TEST)
        _forward(net)
        _forward(net)
        return located
    raise ValueError(f"unknown case kind {kind}")


def classify(seeds: Seeds, case, work: Path) -> Outcome:
    """Run ``case`` and sort its outcome (no timing: the caller enforces the time limit)."""
    from engine.errors import MokaError

    located: list[str] = []
    try:
        run_case(seeds, case, work)
        return Outcome("ok")
    except MokaError as exc:
        message = str(exc)
        located = _locations(seeds, case, work)
        if any(word in message for word in located) or "layer '" in message:
            return Outcome("clear", message)
        return Outcome("no_location", message)
    except _Timeout:
        return Outcome("timeout", "")
    except Exception as exc:
        tb = traceback.format_exc(limit=-4)
        return Outcome("internal", f"{type(exc).__name__}: {exc}\n{tb}")


def _locations(seeds: Seeds, case, work: Path) -> list[str]:
    """What a message may name to locate the fault: the case's files (path or name), and the
    seed solver a solverstate case restores into."""
    names = [n for p in work.rglob("*") for n in (str(p), p.name)]
    return [*names, str(seeds.seeds / "solver.prototxt")]


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


# -- the campaign ----------------------------------------------------------------------------------
def _worker(root: str, conn) -> None:
    import logging

    import engine.net

    logging.disable(logging.CRITICAL)
    os.chdir(root)
    seeds = Seeds(Path(root))
    engine.net.set_memory_limit(FUZZ_MEMORY_LIMIT)
    signal.signal(signal.SIGALRM, _alarm)
    count = 0
    while True:
        case = conn.recv()
        if case is None:
            return
        count += 1
        work = Path(tempfile.mkdtemp(dir=root, prefix="case"))
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            outcome = classify(seeds, case, work)
        except _Timeout:
            outcome = Outcome("timeout")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.monotonic() - start
        if elapsed > CASE_SECONDS:
            outcome = Outcome("timeout", f"{elapsed:.1f} s")
        shutil.rmtree(work, ignore_errors=True)
        conn.send((outcome.kind, outcome.detail, elapsed))


def campaign(cases: int, workers: int, seed: int, root: Path, show: int,
             log=None) -> dict[str, int]:
    """Run ``cases`` random cases over ``workers`` forked processes; print and return counts."""
    Seeds(root)  # build the seed files once, before forking
    ctx = multiprocessing.get_context("fork")
    rnd = random.Random(seed)
    todo = [random_case(rnd) for _ in range(cases)]
    counts: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    shown: dict[str, int] = collections.Counter()
    slots: list[dict] = [{} for _ in range(workers)]

    def spawn(slot: dict) -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(str(root), child), daemon=True)
        proc.start()
        slot.update(proc=proc, conn=parent, case=None, since=0.0)

    for slot in slots:
        spawn(slot)
    next_case, done, started = 0, 0, time.monotonic()
    while done < len(todo):
        for slot in slots:
            if slot["case"] is None and next_case < len(todo):
                slot["case"], slot["since"] = todo[next_case], time.monotonic()
                slot["conn"].send(todo[next_case])
                next_case += 1
        for slot in slots:
            if slot["case"] is None:
                continue
            kind = slot["case"][0]
            if slot["conn"].poll(0.01):
                try:
                    outcome, detail, _elapsed = slot["conn"].recv()
                except EOFError:  # the worker died (out of memory?)
                    outcome, detail = "internal", "the worker process died"
                    spawn(slot)
            elif (time.monotonic() - slot["since"] > CASE_SECONDS + 20
                  or not slot["proc"].is_alive()):
                outcome, detail = ("timeout", "killed") if slot["proc"].is_alive() else (
                    "internal", "the worker process died")
                slot["proc"].kill()
                spawn(slot)
            else:
                continue
            counts[outcome] += 1
            by_kind[kind][outcome] += 1
            if log is not None:
                log.write(f"{outcome}\t{kind}\t{' '.join(detail.split())[:300]}\n")
            if outcome not in ("ok", "clear") and shown[outcome] < show:
                shown[outcome] += 1
                print(f"--- {outcome} [{kind}] case={slot['case']!r}\n{detail}", flush=True)
            slot["case"] = None
            done += 1
            if done % 500 == 0:
                print(f"... {done}/{len(todo)} cases, {time.monotonic() - started:.0f} s, "
                      f"{dict(counts)}", flush=True)
    for slot in slots:
        slot["conn"].send(None)
        slot["proc"].join(5)
    total = time.monotonic() - started
    print(f"\n{len(todo)} cases in {total:.0f} s (seed {seed}, {workers} workers)")
    for kind in KINDS:
        print(f"  {kind:14s} {dict(by_kind[kind])}")
    order = ("ok", "clear", "internal", "no_location", "timeout")
    print("outcomes: " + ", ".join(f"{k} {counts[k]}" for k in order))
    return dict(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--show", type=int, default=20, help="failures printed per outcome")
    parser.add_argument("--dir", help="scratch folder (default: a new temporary one)")
    parser.add_argument("--log", help="write every case's outcome and message to this file")
    args = parser.parse_args(argv)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="moka-fuzz-"))
    root.mkdir(parents=True, exist_ok=True)
    log = open(args.log, "w") if args.log else None  # noqa: SIM115
    try:
        counts = campaign(args.cases, args.workers, args.seed, root.resolve(), args.show, log)
    finally:
        if log is not None:
            log.close()
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    bad = sum(counts.get(k, 0) for k in ("internal", "no_location", "timeout"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _ = math  # (kept for interactive use: math.isnan on values)
    sys.exit(main())
