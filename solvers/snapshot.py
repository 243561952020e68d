"""Snapshot files: ``.caffemodel`` + ``.solverstate`` (Caffe's binary layout) or their HDF5 twins.

Every file is written atomically (a temporary file beside it, fsync, ``os.replace``), so a
failed or interrupted snapshot never destroys the previous good one. The solverstate carries
Caffe's fields (``iter``, ``learned_net``, ``history`` in Caffe's order, ``current_step``) plus
``moka_resume`` (field 1000, which Caffe skips): the random generator, every data layer's read
position, the smoothed-loss window and lr_policy "plateau"'s memory, which together make a
resumed run bit-identical.

Crash safety: the model is written before the state, under hidden ``.tmp`` names, so a process
killed at any moment leaves only complete files under snapshot names. The state records the
model's size and SHA-256 (``moka_resume``) and ends with its own (``moka_sha256``, field 1001),
so a truncated, corrupt or swapped file is refused on restore, naming it. ``restore("latest")``
takes the newest pair that passes these checks (:func:`find_latest`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from engine import caffe_pb2
from engine.blob import blob_proto_array, blob_proto_shape
from engine.errors import MokaError, ParseError, SolverError
from engine.io import (
    atomic_target,
    check_blob_proto,
    fill_blob_proto,
    hdf5_writer,
    read_net_binary,
)

log = logging.getLogger("solvers")

HDF5 = caffe_pb2.SolverParameter.HDF5


# -- atomic files --------------------------------------------------------------------------------
def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over.

    The temporary name is hidden and ends in ``.tmp`` (``.lenet_iter_5.caffemodel.1a2b3c4d.tmp``),
    so a write cut short leaves nothing that looks like a snapshot. An OSError (a full disk)
    comes back as a SolverError naming ``path``.
    """
    try:
        with atomic_target(path) as tmp:
            write(tmp)
    except MokaError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError):
            raise SolverError(f"cannot write {path}: {_reason(cause)}") from cause
        raise


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "No space left on device (free some disk space, then resume with --snapshot latest)"
    return exc.strerror or str(exc)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# -- writing -------------------------------------------------------------------------------------
def snapshot(solver) -> tuple[str, str]:
    """Write the model then the solver state for ``solver.iter``; returns their paths.

    The order makes a pair safe to interrupt anywhere: a solverstate only ever names a model that
    is completely on disk, and it records that model's size and SHA-256 (``moka_resume``), so a
    model damaged later is caught on restore. If the state cannot be written, a model this call
    created is removed again: the folder keeps only complete pairs plus the earlier ones.
    """
    p = solver.param
    base = f"{p.snapshot_prefix}_iter_{solver.iter}"
    folder = os.path.dirname(base)
    if folder and not os.path.isdir(folder):
        log.info("Creating snapshot folder %s", folder)
        os.makedirs(folder, exist_ok=True)
    hdf5 = p.snapshot_format == HDF5
    model = base + (".caffemodel.h5" if hdf5 else ".caffemodel")
    path = base + (".solverstate.h5" if hdf5 else ".solverstate")
    model_existed = os.path.exists(model)
    if hdf5:
        log.info("Snapshotting to HDF5 file %s", model)
        atomic_write(model, lambda tmp: _write_net_hdf5(solver.net, tmp, p.snapshot_diff))
        size, sha256 = file_digest(model)
    else:
        log.info("Snapshotting to binary proto file %s", model)
        data = solver.net.to_proto(p.snapshot_diff).SerializeToString()
        atomic_write(model, lambda tmp: _write_file(tmp, data))
        size, sha256 = len(data), hashlib.sha256(data).hexdigest()
        del data
    state = solver_state(solver, model)
    state.moka_resume.learned_net_size = size
    state.moka_resume.learned_net_sha256 = sha256
    try:
        if hdf5:
            log.info("Snapshotting solver state to HDF5 file %s", path)
            atomic_write(path, lambda tmp: _write_state_hdf5(state, tmp))
        else:
            log.info("Snapshotting solver state to binary proto file %s", path)
            atomic_write(path, lambda tmp: _write_file(tmp, _sealed(state)))
    except BaseException:
        if not model_existed and not os.path.exists(path):
            with contextlib.suppress(OSError):
                os.remove(model)
        raise
    return model, path


def solver_state(solver, model_filename: str):
    """The SolverState message: Caffe's fields, history in Caffe's order, Moka's resume block."""
    state = caffe_pb2.SolverState()
    state.iter = solver.iter
    state.learned_net = model_filename
    state.current_step = solver.current_step
    for name in solver.state_names:  # all params' first state, then all params' second
        for per_param in solver.state:
            history = state.history.add()
            history.shape.dim.extend(per_param[name].shape)
            fill_blob_proto(history, per_param[name])  # double_data for float64 nets
    state.moka_resume.CopyFrom(resume_state(solver))
    return state


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"cannot store {type(value).__name__} in a solverstate")


def resume_state(solver):
    """What exact resume needs beyond Caffe's fields."""
    resume = caffe_pb2.MokaResumeState()
    resume.solver_rng = json.dumps(solver.rng.bit_generator.state)
    for net_index, net in enumerate([solver.net, *solver.test_nets]):
        for layer in net.layers:
            get_state = getattr(layer, "get_state", None)
            if get_state is None:
                continue
            layer_state = resume.layer_state.add()
            layer_state.net_index = net_index
            layer_state.layer_name = layer.name
            layer_state.json_state = json.dumps(get_state(), default=_jsonable)
    resume.loss_window_double.extend(solver.losses)
    resume.loss_window_start = solver.loss_index
    resume.smoothed_loss = solver.smoothed_loss
    plateau = getattr(solver, "plateau", None)
    if plateau is not None:
        if plateau.best is not None:
            resume.plateau_best = plateau.best
        resume.plateau_bad_rounds = plateau.bad_rounds
    return resume


def _write_net_hdf5(net, path: str, write_diff: bool) -> None:
    """Caffe's Net::ToHDF5: ``/data/<layer>/<i>`` (and ``/diff``) for owned parameters only."""
    owners = {id(blob) for blob in net.learnable_params}
    with hdf5_writer(path) as f:
        groups = [("data", f.create_group("data"))]
        if write_diff:
            groups.append(("diff", f.create_group("diff")))
        for layer in net.layers:
            for kind, group in groups:
                layer_group = group.create_group(layer.name)
                for j, blob in enumerate(layer.blobs):
                    if id(blob) in owners:
                        layer_group.create_dataset(str(j), data=getattr(blob, kind))


def _sealed(state) -> bytes:
    """The binary state followed by ``moka_sha256``, the SHA-256 of every byte before it."""
    body = state.SerializeToString()
    seal = caffe_pb2.SolverState(moka_sha256=hashlib.sha256(body).hexdigest())
    return body + seal.SerializeToString()  # concatenated messages merge: one valid message


def _write_state_hdf5(state, path: str) -> None:
    """Caffe's SnapshotSolverStateToHDF5 layout, plus the resume block as an opaque dataset and
    ``moka_sha256``, a digest of the content (:func:`_hdf5_state_digest`)."""
    history_arrays = [blob_proto_array(h, blob_proto_shape(h)) for h in state.history]
    resume = state.moka_resume.SerializeToString()
    with hdf5_writer(path) as f:
        f.create_dataset("iter", data=np.array([state.iter], np.int32))
        _write_c_string(f, "learned_net", state.learned_net)
        f.create_dataset("current_step", data=np.array([state.current_step], np.int32))
        history = f.create_group("history")
        for i, values in enumerate(history_arrays):
            history.create_dataset(str(i), data=values)
        f.create_dataset("moka_resume", data=np.void(resume))
        digest = _hdf5_state_digest(state.iter, state.learned_net, state.current_step,
                                    history_arrays, resume)
        f.create_dataset("moka_sha256", data=np.bytes_(digest))


def _hdf5_state_digest(iteration: int, learned_net: str, current_step: int,
                       history: list[np.ndarray], resume: bytes) -> str:
    digest = hashlib.sha256(f"{iteration}\0{learned_net}\0{current_step}\0".encode())
    for values in history:
        digest.update(f"{values.dtype.str}{values.shape}".encode())
        digest.update(np.ascontiguousarray(values).tobytes())
    digest.update(resume)
    return digest.hexdigest()


def _write_c_string(f, name: str, text: str) -> None:
    """A scalar NUL-terminated string, as HDF5's H5LTmake_dataset_string (Caffe) writes it."""
    import h5py

    raw = text.encode()
    string_type = h5py.h5t.C_S1.copy()
    string_type.set_size(len(raw) + 1)
    string_type.set_strpad(h5py.h5t.STR_NULLTERM)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    dataset = h5py.h5d.create(f.id, name.encode(), string_type, space)
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw + b"\0", dtype=f"S{len(raw) + 1}"),
                  mtype=string_type)


# -- reading -------------------------------------------------------------------------------------
@dataclass
class StoredState:
    iter: int
    learned_net: str
    current_step: int
    history: list[np.ndarray]
    resume: object | None  # a MokaResumeState, or None for a file Caffe wrote


def read_state(path: str) -> StoredState:
    """A .solverstate (binary or HDF5), read completely; damage is a SolverError naming it."""
    if not os.path.isfile(path):
        raise SolverError(f"solver state '{path}' does not exist")
    return _read_state_hdf5(path) if path.endswith(".h5") else _read_state_binary(path)


def _read_state_binary(path: str) -> StoredState:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        state = caffe_pb2.SolverState.FromString(raw)
    except OSError as exc:
        raise SolverError(f"cannot read solver state '{path}': {exc.strerror or exc}") from None
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise SolverError(f"{path}: cannot parse as a binary SolverState: the file is truncated "
                          f"or is not a .solverstate ({exc})") from None
    if state.HasField("moka_sha256"):
        seal = caffe_pb2.SolverState(moka_sha256=state.moka_sha256).SerializeToString()
        if (not raw.endswith(seal)
                or hashlib.sha256(raw[:-len(seal)]).hexdigest() != state.moka_sha256):
            raise SolverError(f"{path}: the solver state is corrupt: its content does not match "
                              f"the SHA-256 written with it")
    elif state.moka_resume.HasField("learned_net_sha256"):  # Moka writes both, the seal last
        raise SolverError(f"{path}: the solver state is truncated (it ends before its SHA-256)")
    history = [_history_array(h, k, path) for k, h in enumerate(state.history)]
    resume = state.moka_resume if state.HasField("moka_resume") else None
    learned = state.learned_net if state.HasField("learned_net") else ""
    if not isinstance(learned, str):  # protobuf hands back bytes that are not UTF-8
        raise SolverError(f"solver state '{path}': its learned_net {learned[:60]!r} is not "
                          "UTF-8 text; the file is corrupt")
    return StoredState(state.iter, learned, state.current_step, history, resume)


def _history_array(proto, k: int, path: str) -> np.ndarray:
    try:
        check_blob_proto(proto, path, f"history blob {k}")
    except ParseError as exc:
        raise SolverError(str(exc)) from None
    return blob_proto_array(proto, blob_proto_shape(proto))


def _read_state_hdf5(path: str) -> StoredState:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            learned = ""
            if "learned_net" in f:
                learned = bytes(f["learned_net"][()]).rstrip(b"\0").decode()
            group = f["history"]
            history = [np.asarray(group[str(i)][()]) for i in range(len(group))]
            resume, raw = None, b""
            if "moka_resume" in f:
                raw = f["moka_resume"][()].tobytes()
                resume = caffe_pb2.MokaResumeState.FromString(raw)
            stored = StoredState(_h5_int(f["iter"]), learned, _h5_int(f["current_step"]),
                                 history, resume)
            if "moka_sha256" in f:
                expected = bytes(f["moka_sha256"][()]).decode()
                if _hdf5_state_digest(stored.iter, learned, stored.current_step, history,
                                      raw) != expected:
                    raise SolverError(f"{path}: the solver state is corrupt: its content does "
                                      f"not match the SHA-256 written with it")
            return stored
    except (OSError, KeyError, ValueError, DecodeError, UnicodeDecodeError) as exc:
        raise SolverError(f"cannot read HDF5 solver state '{path}': the file is truncated or "
                          f"corrupt ({exc})") from None


def _h5_int(dataset) -> int:
    return int(np.asarray(dataset[()]).ravel()[0])


def load_weights(net, path: str) -> None:
    """Copy weights by layer name from a .caffemodel or (by file signature) a .caffemodel.h5."""
    import h5py

    if not os.path.isfile(path):
        raise SolverError(f"weights file '{path}' does not exist")
    if h5py.is_hdf5(path):
        _load_weights_hdf5(net, path)
    else:
        net.copy_from(path)


def _load_weights_hdf5(net, path: str) -> None:
    """Caffe's CopyTrainedLayersFromHDF5; a shared (non-owner) blob may be missing."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            _copy_hdf5_weights(net, f, path)
    except (OSError, KeyError) as exc:
        raise SolverError(f"cannot read HDF5 weights '{path}': the file is truncated or corrupt "
                          f"({exc})") from None


def _copy_hdf5_weights(net, f, path: str) -> None:
    layers = net.layer_dict
    owners = {id(blob) for blob in net.learnable_params}
    for name, group in f["data"].items():
        layer = layers.get(name)
        if layer is None:
            log.info("Ignoring source layer %s", name)
            continue
        if len(group) > len(layer.blobs):
            raise layer.error(f"Incompatible number of blobs: {len(group)} in '{path}', "
                              f"{len(layer.blobs)} in the net")
        for j, blob in enumerate(layer.blobs):
            if str(j) not in group:
                if id(blob) in owners:
                    raise layer.error(f"Incompatible number of blobs: '{path}' has no "
                                      f"param {j}")
                continue
            values = np.asarray(group[str(j)][()])
            if values.shape != blob.shape:
                raise layer.error(f"cannot copy param {j} weights: shape mismatch. Source "
                                  f"param shape is {values.shape}; target param shape is "
                                  f"{blob.shape}. Rename the layer to learn it anew.")
            blob.data[...] = values


# -- restoring -----------------------------------------------------------------------------------
LATEST = "latest"  # restore("latest"): the newest complete pair under the snapshot prefix


def restore(solver, path: str) -> None:
    """Load ``path`` into ``solver``: weights (from learned_net), iter, history, resume block.

    ``path`` may be ``"latest"``: the newest complete snapshot under the solver's
    ``snapshot_prefix``, skipping damaged ones with a warning (:func:`find_latest`). Both files
    are read and checked in full before anything in the solver changes.
    """
    if path == LATEST:
        found = find_latest(solver.param.snapshot_prefix, solver.param.snapshot_format == HDF5)
        if found is None:
            raise SolverError(f"no snapshot to resume from: nothing matches "
                              f"'{solver.param.snapshot_prefix}_iter_N.solverstate[.h5]'")
        path, stored, model = found
    else:
        stored, model = check_snapshot(path)
    expected = len(solver.state_names) * len(solver.state)
    if len(stored.history) != expected:
        hint = ""
        if path.endswith((".caffemodel", ".caffemodel.h5")) or not stored.history:
            hint = (" To resume, give the .solverstate file (not the .caffemodel); to start "
                    "from a .caffemodel, fine-tune with weights instead.")
        raise SolverError(f"Incorrect length of history blobs in '{path}': this "
                          f"{type(solver).__name__} solver expects {expected}, found "
                          f"{len(stored.history)}.{hint}")
    if model is not None:
        load_weights(solver.net, model)
    solver.iter = stored.iter
    solver.current_step = stored.current_step
    _restore_history(solver, stored.history, path)
    if stored.resume is not None:
        try:
            apply_resume_state(solver, stored.resume)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            raise SolverError(f"solver state '{path}': the saved random state or data "
                              f"positions are corrupt ({type(exc).__name__}: {exc})") from None
    else:  # a Caffe file: smoothing starts afresh, as it would in Caffe
        solver.losses, solver.loss_index, solver.smoothed_loss = [], 0, 0.0
    log.info("Restored solver state from %s at iteration %d", path, solver.iter)


def check_snapshot(state_path: str) -> tuple[StoredState, str | None]:
    """Read a solverstate completely and check the model it names; returns both.

    The model must exist and be complete: when the state records the model's size and SHA-256
    (every Moka snapshot does), the file must match them; otherwise (a file Caffe wrote) it must
    parse in full. Any damage is a SolverError naming the file.
    """
    stored = read_state(state_path)
    if not stored.learned_net:
        return stored, None
    model = _find_learned_net(stored.learned_net, state_path)
    resume = stored.resume
    if resume is not None and resume.HasField("learned_net_sha256"):
        problem = _model_mismatch(model, resume, state_path)
        beside = os.path.join(os.path.dirname(state_path), os.path.basename(model))
        # learned_net is relative to where training ran: another run's file may sit there
        if (problem and os.path.isfile(beside) and not os.path.samefile(beside, model)
                and _model_mismatch(beside, resume, state_path) is None):
            log.info("%s; using %s beside the solver state", problem, beside)
            return stored, beside
        if problem:
            raise SolverError(problem)
    else:
        try:
            read_net_binary(model)  # binary or HDF5, by signature
        except MokaError as exc:
            raise SolverError(f"the model '{model}' named by '{state_path}' is unreadable: "
                              f"{exc}") from None
    return stored, model


def _model_mismatch(model: str, resume, state_path: str) -> str | None:
    """Why ``model`` is not the file the state was written with (size, then SHA-256); or None."""
    size = os.path.getsize(model)
    if size != resume.learned_net_size:
        return (f"the model '{model}' is {size} bytes, but the solver state '{state_path}' was "
                f"written with one of {resume.learned_net_size} bytes: the model is truncated "
                f"or was replaced")
    if file_digest(model)[1] != resume.learned_net_sha256:
        return (f"the model '{model}' is not the one the solver state '{state_path}' was "
                f"written with (its SHA-256 differs): it is corrupt or was replaced")
    return None


def snapshot_files(prefix: str) -> list[tuple[int, str]]:
    """(iteration, path) of every ``<prefix>_iter_N.solverstate[.h5]``, newest first."""
    folder, base = os.path.split(prefix)
    pattern = re.compile(re.escape(base) + r"_iter_(\d+)\.solverstate(\.h5)?")
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return []
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in names if (m := pattern.fullmatch(name))]
    return sorted(found, reverse=True)


def find_latest(prefix: str, prefer_hdf5: bool = False
                ) -> tuple[str, StoredState, str | None] | None:
    """The newest complete snapshot under ``prefix``: (solverstate path, its content, model path).

    Damaged pairs are skipped with a warning naming the file and the fault. None when there is
    no snapshot at all; a SolverError when every one is damaged. Temporary files that a killed
    snapshot left behind (hidden, ``.tmp``) are removed on the way.
    """
    if not prefix:
        raise SolverError("cannot look for the latest snapshot: the solver has no "
                          "snapshot_prefix")
    _remove_leftovers(prefix)
    candidates = snapshot_files(prefix)
    # at one iteration, the solver's own format first
    candidates.sort(key=lambda c: (c[0], c[1].endswith(".h5") == prefer_hdf5), reverse=True)
    damaged = []
    for _, path in candidates:
        try:
            stored, model = check_snapshot(path)
        except MokaError as exc:
            log.warning("Skipping damaged snapshot %s: %s", path, exc)
            damaged.append(path)
            continue
        if damaged:
            log.warning("Resuming from %s, the newest complete snapshot", path)
        return path, stored, model
    if damaged:
        raise SolverError(f"every snapshot under '{prefix}' is damaged ({', '.join(damaged)}); "
                          f"see the warnings above")
    return None


def _remove_leftovers(prefix: str) -> None:
    folder, base = os.path.split(prefix)
    pattern = re.compile(r"\." + re.escape(base) +
                         r"_iter_\d+\.(caffemodel|solverstate)(\.h5)?\.[0-9a-f]+\.tmp")
    with contextlib.suppress(OSError):
        for name in os.listdir(folder or "."):
            if pattern.fullmatch(name):
                log.info("Removing %s, left by an interrupted snapshot", name)
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))


def _find_learned_net(learned_net: str, state_path: str) -> str:
    """The stored model path, else the file of that name beside the .solverstate (moved runs)."""
    if os.path.isfile(learned_net):
        return learned_net
    beside = os.path.join(os.path.dirname(state_path), os.path.basename(learned_net))
    if os.path.isfile(beside):
        log.info("learned_net %s not found; using %s beside the solver state", learned_net,
                 beside)
        return beside
    raise SolverError(f"the solver state '{state_path}' names the model '{learned_net}', which "
                      f"does not exist (nor does '{beside}')")


def _restore_history(solver, history: list[np.ndarray], path: str) -> None:
    n = len(solver.state)
    for k, values in enumerate(history):
        name, i = solver.state_names[k // n], k % n
        target = solver.state[i][name]
        if values.size != target.size:
            raise SolverError(f"history blob {k} in '{path}' has shape {values.shape}, but "
                              f"learnable parameter {solver.net.learnable_param_names[i]} has "
                              f"shape {target.shape}")
        target[...] = values.reshape(target.shape)


def apply_resume_state(solver, resume) -> None:
    """Put back the random generator, the data layers' positions and the loss window."""
    if resume.solver_rng:
        solver.rng.bit_generator.state = json.loads(resume.solver_rng)
    nets = [solver.net, *solver.test_nets]
    for layer_state in resume.layer_state:
        if not 0 <= layer_state.net_index < len(nets):
            log.warning("solver state has data for net #%d, which this solver lacks",
                        layer_state.net_index)
            continue
        layer = nets[layer_state.net_index].layer_dict.get(layer_state.layer_name)
        set_state = getattr(layer, "set_state", None)
        if set_state is None:
            log.warning("solver state has data for layer '%s', which cannot take it",
                        layer_state.layer_name)
            continue
        set_state(_layer_state_dict(layer_state))
    plateau = getattr(solver, "plateau", None)
    if plateau is not None:
        plateau.best = resume.plateau_best if resume.HasField("plateau_best") else None
        plateau.bad_rounds = resume.plateau_bad_rounds
    losses = list(resume.loss_window_double) or list(resume.loss_window)
    solver.losses = losses
    solver.loss_index = resume.loss_window_start
    solver.smoothed_loss = resume.smoothed_loss if resume.HasField("smoothed_loss") else (
        sum(losses) / len(losses) if losses else 0.0)


def _layer_state_dict(layer_state) -> dict:
    if layer_state.json_state:
        try:
            return json.loads(layer_state.json_state)
        except ValueError as exc:
            raise SolverError(f"the solver state's saved position of data layer "
                              f"'{layer_state.layer_name}' is not valid "
                              f"JSON ({exc}); the file is corrupt") from None
    state: dict = {}
    for field in ("cursor", "epoch"):
        if layer_state.HasField(field):
            state[field] = getattr(layer_state, field)
    if layer_state.order:
        state["order"] = list(layer_state.order)
    if layer_state.rng_state:
        state["rng_state"] = json.loads(layer_state.rng_state)
    return state
