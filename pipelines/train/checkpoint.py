"""Training-state checkpoints of a Ray Train run: both DeepSpeed engines and the TrainState.

Layout of one checkpoint directory (merged by Ray from every rank's local copy):

    student/  fake/              engine.save_checkpoint(tag="state"): every rank writes its
                                 ZeRO shard, rank 0 the adapter weights (a fixed-size run)
    full_state/<role>.safetensors
                                 instead, in an elastic run (``train.min_workers``): the full fp32
                                 adapters and Adam moments (pipelines/train/portable_state.py),
                                 written by rank 0, loadable at any world size
    train_state.json             wadi_core.vsd.TrainState's scalars (rank 0): step, epoch, batches
                                 consumed in that epoch, counters, fingerprint, MLflow run id
    COMPLETE                     written last, by rank 0: JSON manifest, SHA-256 + size of every file

Files in storage are not trusted: a checkpoint is verified against its manifest before anything
is loaded (a truncated upload or a flipped byte is refused, and resume falls back to the previous
complete checkpoint), and DeepSpeed's ``.pt`` files (torch.save pickles) are read with
``torch.load(weights_only=True)`` plus an allow-list of the few DeepSpeed types they hold
(``install_safe_loading``): a crafted pickle is refused, never executed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from wadi_core import storage
from wadi_core.storage import retry_io  # per file, on top of the AWS SDK's own retries
from wadi_core.vsd.state import IncompatibleCheckpoint, TrainState
from wadi_core.vsd.state import check_fingerprint as _check_fingerprint
from wadi_core.vsd.state import model_fingerprint

from pipelines.data.prompts import pyarrow_filesystem

__all__ = ["TrainState", "read_train_state", "STATE_FILES", "model_fingerprint", "check_fingerprint",
           "IncompatibleCheckpoint", "save_training_state", "FULL_STATE", "load_training_state", "TAG", "mark_complete",
           "latest_complete_checkpoint", "checkpoint_step", "checkpoint_dir_name", "prune_untracked_checkpoints",
           "CheckpointRejected", "CorruptCheckpoint", "UnsafeCheckpoint", "TamperedCheckpoint", "file_manifest", "merge_manifests",
           "verify_checkpoint", "install_safe_loading", "safe_torch_load", "complete_checkpoints",
           "load_first_good_checkpoint", "DEEPSPEED_SAFE_GLOBALS", "upload_checkpoint",
           "repair_ray_snapshot", "RAY_SNAPSHOT"]

TAG = "state"
_STATE = "train_state.json"  # TrainState.save without tensors: the engines hold them
_LEGACY_PROGRESS = "progress.json"  # the same scalars, as checkpoints before TrainState wrote them
STATE_FILES = (_STATE, _LEGACY_PROGRESS)  # where a checkpoint's scalars are, newest format first
COMPLETE = "COMPLETE"
_MANIFEST_FORMAT = "wadi-checkpoint-manifest/1"
_NAME = re.compile(r"^checkpoint_(\d+)$")
#: The only non-builtin types DeepSpeed 0.19's ZeRO-0/1/2/3 checkpoint files hold (fp32 and bf16;
#: found with torch.serialization.get_unsafe_globals_in_checkpoint). Plain config/record objects.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 (GPU) runs
)


def _legacy_progress(text: str) -> TrainState:
    """A checkpoint's ``progress.json`` from before the TrainState file, as a TrainState."""
    d = json.loads(text)
    return TrainState(step=d.get("step", 0), epoch=d.get("epoch", 0), data_position=d.get("batches_in_epoch", 0),
                      prompts_seen=d.get("prompts_seen", 0), nonfinite_steps=d.get("nonfinite_steps", 0),
                      fingerprint=d.get("fingerprint") or {}, mlflow_run_id=d.get("mlflow_run_id"),
                      meta={"bad_before_epoch": d.get("bad_before_epoch") or {}})


def read_train_state(directory: str | os.PathLike) -> TrainState:
    """The TrainState scalars of a checkpoint directory (``train_state.json``, or an older
    checkpoint's ``progress.json``)."""
    src = Path(directory)
    if (src / _STATE).exists():
        return TrainState.from_json((src / _STATE).read_text())
    if (src / _LEGACY_PROGRESS).exists():
        return _legacy_progress((src / _LEGACY_PROGRESS).read_text())
    raise FileNotFoundError(f"{src} has no {_STATE}: not a checkpoint written by pipelines.train.checkpoint")


class CheckpointRejected(RuntimeError):
    """A checkpoint that must not be loaded (resume falls back to the previous complete one)."""


class CorruptCheckpoint(CheckpointRejected):
    """A file is missing, truncated or altered: it does not match the checkpoint's manifest."""


class UnsafeCheckpoint(CheckpointRejected):
    """A pickled file asks for objects outside the allow-list (it could run code when loaded)."""


class TamperedCheckpoint(CheckpointRejected):
    """The manifest names a file outside its checkpoint (``..``, an absolute path, a symlink out):
    not something this pipeline writes; nothing it names is read."""


_RESTART_ADVICE = ("give this run a new train.run_name "
                   "(or train.storage_path), or delete the old run's folder to start over.")


def check_fingerprint(saved: Mapping[str, str], current: Mapping[str, str], where: str) -> None:
    """The core's check (``wadi_core.vsd.state``) with the Ray job's advice."""
    _check_fingerprint(saved, current, where, _RESTART_ADVICE)


def _safe_globals() -> list[Any]:
    out = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: that type is not needed
            pass
    return out


def _unsafe_refusal(path: str | os.PathLike, what: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(
        f"refused to load {path}: {what}. Nothing in it was executed. A checkpoint this pipeline "
        "wrote holds only tensors, plain data and the DeepSpeed types in "
        "pipelines.train.checkpoint.DEEPSPEED_SAFE_GLOBALS, so the file was replaced or written by another "
        "program (or another DeepSpeed version): delete this checkpoint directory, or resume from a "
        "checkpoint you trust.")


def safe_torch_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's allow-listed types; refuses anything else."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unsafe_refusal(path, f"its pickle needs objects outside the allow-list "
                                    f"({str(e).strip().splitlines()[0][:300]})") from None


class _SafeLoads:
    """A DeepSpeed checkpoint engine whose ``load`` is :func:`safe_torch_load`; the rest is delegated.
    Every file ``engine.load_checkpoint`` reads (model states, ZeRO shards, optimizer) goes through
    ``engine.checkpoint_engine.load`` in DeepSpeed 0.19, which otherwise uses ``weights_only=False``."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)


def install_safe_loading(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` unpickle tensors and plain data only (idempotent)."""
    if not isinstance(engine.checkpoint_engine, _SafeLoads):
        engine.checkpoint_engine = _SafeLoads(engine.checkpoint_engine)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``directory`` (but COMPLETE)."""
    root = Path(directory)
    return {f.relative_to(root).as_posix(): {"sha256": _sha256(f), "bytes": f.stat().st_size}
            for f in sorted(root.rglob("*")) if f.is_file() and f.relative_to(root).as_posix() != COMPLETE}


def merge_manifests(manifests: list[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One manifest from every rank's: Ray merges the ranks' directories into one."""
    out: dict[str, dict[str, Any]] = {}
    for rank, manifest in enumerate(manifests):
        for name, entry in manifest.items():
            if name in out and out[name] != dict(entry):
                raise RuntimeError(f"rank {rank} and an earlier rank both wrote checkpoint file {name!r} with "
                                   "different contents: Ray keeps only one of them; write per-rank names")
            out[name] = dict(entry)
    return out


def _check_confined(src: Path, manifest: Any) -> None:
    """Every manifest entry is a relative POSIX path of plain names inside ``src`` (after
    symlinks) with a ``{"sha256", "bytes"}`` record; else :class:`TamperedCheckpoint`."""
    def tampered(name: Any, why: str) -> TamperedCheckpoint:
        return TamperedCheckpoint(
            f"checkpoint {src} is tampered: its {COMPLETE} manifest lists {str(name)[:200]!r}, {why}. This pipeline "
            "writes only relative paths inside the checkpoint, so the manifest was edited or written by another "
            "program; nothing it names was read. Delete this checkpoint directory, or resume from one you trust.")

    if not isinstance(manifest, Mapping):
        raise tampered(type(manifest).__name__, "which is not a mapping of file names")
    root = src.resolve()
    for name, entry in manifest.items():
        parts = name.split("/") if isinstance(name, str) else []
        if not parts or name.startswith("/") or "\\" in name or "\0" in name or any(
                p in ("", ".", "..") for p in parts):
            raise tampered(name, "which is not a relative path of plain names (absolute, '..', '.', empty)")
        if not isinstance(entry, Mapping) or not isinstance(entry.get("bytes"), int) or \
                not isinstance(entry.get("sha256"), str):
            raise tampered(name, "whose record is not {sha256, bytes}")
        if not (src / name).resolve().is_relative_to(root):
            raise tampered(name, "which resolves outside the checkpoint (a symlink)")
    for f in src.rglob("*"):  # nor may an unlisted link lead the pickle scan below outside
        if f.is_symlink() and not f.resolve().is_relative_to(root):
            raise tampered(f.relative_to(src).as_posix(), "a symlink that leads outside the checkpoint")


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Check every file against the ``COMPLETE`` manifest and every ``.pt`` pickle against the
    allow-list, before anything is loaded. Raises :class:`CorruptCheckpoint` /
    :class:`UnsafeCheckpoint`; a checkpoint without a manifest (written before manifests existed,
    or not marked complete) only warns."""
    src = Path(directory)
    marker = src / COMPLETE
    manifest = None
    if marker.is_file():
        try:
            manifest = json.loads(marker.read_text()).get("files")
        except (ValueError, UnicodeDecodeError, AttributeError):
            manifest = None  # the old plain-text marker
    if manifest is None:
        warnings.warn(f"checkpoint {src} has no file manifest in {COMPLETE}: its files cannot be verified "
                      "(DeepSpeed files are still read with weights_only=True)")
    else:
        _check_confined(src, manifest)  # before any file it names is touched
        for name, entry in sorted(manifest.items()):
            f = src / name
            if not f.is_file():
                raise CorruptCheckpoint(f"checkpoint {src}: {name} is missing (the manifest in {COMPLETE} lists it): "
                                        "the upload was cut short or the file was deleted")
            size = f.stat().st_size
            if size != entry["bytes"]:
                raise CorruptCheckpoint(f"checkpoint {src}: {name} has {size} bytes, the manifest says "
                                        f"{entry['bytes']}: the file was truncated or replaced after it was written")
            if _sha256(f) != entry["sha256"]:
                raise CorruptCheckpoint(f"checkpoint {src}: the SHA-256 of {name} differs from the manifest's: "
                                        "the file was altered (bit rot, a partial overwrite) after it was written")
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _safe_globals()}
    for f in sorted(src.rglob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f))) - allowed
        except Exception as e:  # noqa: BLE001 - not a torch zip archive (a raw pickle, garbage)
            raise _unsafe_refusal(f, f"it is not a torch zip archive ({type(e).__name__}: {str(e)[:200]})") from None
        if unsafe:
            raise _unsafe_refusal(f, f"its pickle asks for {', '.join(sorted(unsafe))}")


def load_first_good_checkpoint(candidates: Iterable[Any], load: Callable[[Path], TrainState],
                               agree: Callable[[bool], bool] = bool) -> tuple[TrainState | None, list[str]]:
    """Newest first, the first checkpoint (``ray.train.Checkpoint``-like: ``.path``, ``.as_directory()``)
    that passes :func:`verify_checkpoint` on every rank (``agree``: a collective AND) is loaded with
    ``load``; rejected ones are skipped with a warning. Returns (state or None, the rejections);
    raises :class:`CheckpointRejected` if checkpoints exist but none passes (rather than start over)."""
    rejected: list[CheckpointRejected] = []
    for checkpoint in candidates:
        with checkpoint.as_directory() as d:
            why: CheckpointRejected | None = None
            try:
                verify_checkpoint(d)
            except CheckpointRejected as e:
                why = e
            if not agree(why is None):  # every rank falls back together
                rejected.append(why or CheckpointRejected(f"checkpoint {checkpoint.path} was rejected on another rank"))
                warnings.warn(f"skipping a checkpoint that failed verification: {rejected[-1]} "
                              "-- trying the previous complete checkpoint")
                continue
            return load(Path(d)), rejected
    if rejected:
        raise CheckpointRejected(
            f"none of the run's {len(rejected)} complete checkpoints passed verification, so nothing was loaded "
            "(starting over would hide this): " + " || ".join(map(str, rejected))
            + " -- delete the damaged checkpoint directories to start over, or set a new train.run_name")
    return None, rejected


FULL_STATE = "full_state"  # the world-size-independent engine states (an elastic run's checkpoints)


def save_training_state(directory: str | os.PathLike, engines: Mapping[str, Any], state: TrainState, rank: int,
                        portable: bool = False) -> None:
    """Every rank: its engine shards (``portable``: rank 0 the full state of each engine, gathered);
    rank 0 also the TrainState (scalars only: the engines hold the tensors). Collective (all ranks
    call). No RNG state: the VSD draws are keyed by sample (``wadi_core.vsd.draws``)."""
    from pipelines.train.portable_state import save_full_state  # noqa: PLC0415 -- DeepSpeed only in the worker

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for role, engine in engines.items():
        if portable:
            save_full_state(engine, out / FULL_STATE / f"{role}.safetensors", rank)
        else:
            engine.save_checkpoint(str(out / role), tag=TAG, client_state={"step": state.step})
    if rank == 0:
        TrainState(**state.scalars()).save(out)


def load_training_state(directory: str | os.PathLike, engines: Mapping[str, Any], rank: int,
                        fingerprint: Mapping[str, str] | None = None, verify: bool = True) -> TrainState:
    """Inverse of :func:`save_training_state` (either layout, whichever the checkpoint holds); raises
    if an engine's state is missing, :class:`IncompatibleCheckpoint` if ``fingerprint`` differs from
    the one saved with it, and :class:`CheckpointRejected` if a file fails :func:`verify_checkpoint`
    (``verify=False``: the caller has verified it) or the unpickling allow-list. The per-rank RNG
    files of older checkpoints are not read."""
    from pipelines.train.portable_state import load_full_state  # noqa: PLC0415 -- DeepSpeed only in the worker

    src = Path(directory)
    if verify:
        verify_checkpoint(src)
    state = read_train_state(src)
    if fingerprint is not None:
        check_fingerprint(state.fingerprint, fingerprint, str(src))
    for role, engine in engines.items():
        full = src / FULL_STATE / f"{role}.safetensors"
        if full.is_file():
            load_full_state(engine, full)
            continue
        if not (src / role / TAG).is_dir():
            raise RuntimeError(f"checkpoint {src} holds no DeepSpeed state for {role!r} (step {state.step})")
        # load_checkpoint on a missing path only warns and returns (None, None): check it too.
        install_safe_loading(engine)
        try:
            path, _ = engine.load_checkpoint(str(src / role), tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        except RuntimeError as e:  # a checkpoint from before fingerprints, of another model
            if "state_dict" not in str(e):
                raise
            raise IncompatibleCheckpoint(
                f"checkpoint {src} does not fit this run's {role} adapters {_RESTART_ADVICE} "
                f"DeepSpeed said: {str(e)[:300]}") from e
        if path is None:
            raise RuntimeError(f"checkpoint {src} holds no DeepSpeed state for {role!r} (step {state.step})")
    return state


def checkpoint_step(path: str) -> int:
    """Step encoded in a ``checkpoint_<step>`` directory name (-1 if it is not one)."""
    m = _NAME.match(path.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


def checkpoint_dir_name(step: int) -> str:
    """The ``checkpoint_<step>`` directory name of step ``step`` (what :func:`checkpoint_step` reads)."""
    return f"checkpoint_{step:08d}"


def upload_checkpoint(local_dir: str | os.PathLike, storage_uri: str, run_name: str, dir_name: str) -> Any:
    """``ray.train.report(checkpoint_upload_fn=...)``: copy this rank's checkpoint files to
    ``<storage>/<run_name>/<dir_name>`` file by file, each retried; returns the persisted
    ``ray.train.Checkpoint``. Unlike Ray's default copy, the filesystem is built here, in the
    worker, so it keeps the S3 retry strategy (pyarrow drops it when pickled). Raises if a file
    cannot be uploaded: then no rank reaches :func:`mark_complete` and the checkpoint never
    becomes COMPLETE."""
    import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

    fs, root = pyarrow_filesystem(storage_uri)
    local = fs.type_name == "local"
    dest = f"{root}/{run_name}/{dir_name}"
    src = Path(local_dir)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        data = f.read_bytes()

        def put(path: str = f"{dest}/{rel}", data: bytes = data) -> None:
            if local:
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as out:
                out.write(data)

        retry_io(put, f"upload of checkpoint file {dest}/{rel}")
    return ray.train.Checkpoint(path=dest, filesystem=fs)


def mark_complete(storage_uri: str, run_name: str, dir_name: str,
                  manifest: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Rank 0, after every rank's upload (barrier): write the ``COMPLETE`` marker in storage,
    holding the manifest (:func:`file_manifest` of every rank, merged) the files are checked against."""
    fs, root = pyarrow_filesystem(storage_uri)
    body = {"format": _MANIFEST_FORMAT, "algorithm": "sha256",
            "files": None if manifest is None else {k: dict(v) for k, v in manifest.items()}}
    data = json.dumps(body, indent=0, sort_keys=True).encode()

    def put() -> None:
        with fs.open_output_stream(f"{root}/{run_name}/{dir_name}/{COMPLETE}") as f:
            f.write(data)

    retry_io(put, f"writing {dir_name}/{COMPLETE}")


def latest_complete_checkpoint(storage_uri: str, run_name: str) -> Any | None:
    """Newest ``checkpoint_*`` of the run in storage that has its ``COMPLETE`` marker.

    Ray Train V2 restarts a failed worker group, but a checkpoint reported shortly before the
    failure may not be registered yet (``get_checkpoint()`` then returns None and the run would
    start over); the storage itself is the source of truth.
    """
    found = complete_checkpoints(storage_uri, run_name)
    return found[0] if found else None


def complete_checkpoints(storage_uri: str, run_name: str) -> list[Any]:
    """Every ``checkpoint_*`` of the run in storage with a ``COMPLETE`` marker, newest first."""
    import pyarrow.fs as pafs  # noqa: PLC0415 -- pyarrow only where storage is read
    import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

    fs, root = pyarrow_filesystem(storage_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/{run_name}", allow_not_found=True))
    except OSError:
        return []
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory and checkpoint_step(i.path) >= 0),
                  key=checkpoint_step, reverse=True)
    return [ray.train.Checkpoint(path=d, filesystem=fs) for d in dirs
            if fs.get_file_info(f"{d}/{COMPLETE}").type == pafs.FileType.File]


def prune_untracked_checkpoints(storage_uri: str, run_name: str, tracked: list[str]) -> list[str]:
    """Driver, after the fit: delete ``checkpoint_*`` dirs Ray's manager does not track and that are
    older than its newest one (reported just before a worker died, they escape ``num_to_keep``)."""
    import pyarrow.fs as pafs  # noqa: PLC0415 -- pyarrow only where storage is read

    fs, root = pyarrow_filesystem(storage_uri)
    keep = {p.rstrip("/").rsplit("/", 1)[-1] for p in tracked}
    newest = max((checkpoint_step(p) for p in tracked), default=-1)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{run_name}", allow_not_found=True))
    removed = []
    for info in infos:
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name not in keep and 0 <= checkpoint_step(name) < newest:
            fs.delete_dir(info.path)
            removed.append(name)
    return removed


#: Ray Train's index of a run's checkpoints (``<storage>/<run_name>/``), read when a run starts.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def repair_ray_snapshot(storage_uri: str, run_name: str) -> str | None:
    """Driver, before a fit: move Ray's checkpoint index aside when Ray could not start from it.

    A write cut short by a full disk leaves it empty, and Ray then refuses the run
    (``CheckpointManagerInitializationError``), advising to delete the folder, good checkpoints
    included; a checkpoint it names may also be gone. Our own ``COMPLETE`` checkpoints are the
    source of truth for resume (:func:`complete_checkpoints`), so without the index Ray starts a
    fresh index and the loop still resumes from the newest complete checkpoint. Returns why it was
    moved (also warned), or None when it is fine or absent."""
    import pyarrow.fs as pafs  # noqa: PLC0415 -- pyarrow only where storage is read

    fs, root = pyarrow_filesystem(storage_uri)
    path = f"{root}/{run_name}/{RAY_SNAPSHOT}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(path) as f:
            snapshot = json.loads(f.read())
        missing = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])
                   if fs.get_file_info(f"{root}/{run_name}/{r['checkpoint_dir_name']}").type
                   != pafs.FileType.Directory]
        why = f"it names checkpoints that are gone ({', '.join(missing)})" if missing else None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        why = f"it is unreadable ({type(e).__name__}: {str(e)[:100]}; a write cut short, e.g. by a full disk)"
    if why is None:
        return None
    aside = f"{path}.unusable-{int(time.time())}"
    fs.move(path, aside)
    warnings.warn(f"Ray's checkpoint index {path}: {why}. Moved it to {aside}; the run resumes from its newest "
                  "COMPLETE checkpoint.")
    return why


def run_storage(uri: str) -> tuple[str, Any]:
    """Ray Train's RunConfig (storage_path, storage_filesystem) for ``uri``: a local path as it is, or
    pyarrow S3 with the endpoint from the env; where Ray keeps a run's checkpoints."""
    if storage.is_remote(uri):
        fs, path = pyarrow_filesystem(uri)
        return path, fs
    return uri, None
