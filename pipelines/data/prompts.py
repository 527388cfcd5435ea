"""Prompt shards -> Ray Data -> train workers.

Layout: a folder (local or ``s3://bucket/prefix``) of WebDataset tar shards whose samples are
``<key>.txt`` (the caption) + ``<key>.json`` (meta, not read here), optionally a ``manifest.json``
with ``{"num_prompts": N}``.

Reading: shards are read whole (one shard = one row, retried on transient S3 faults) and parsed
by ``wadi_core.prompts.shards.parse_prompt_tar`` in the same task, so Ray Data moves only caption strings.
This is ~5-10x faster than ``ray.data.read_webdataset`` here (tarfile's per-member cost
dominates a prompt lake), and a broken or unreadable shard becomes a counted row instead of a
failed task.

Where text encoding happens (``data.text_encoding``): by default in the train worker, with the
teacher's own text encoder: CLIP-L is small next to the denoiser (~123 M parameters vs 860 M
for SD1.5's UNet), while encoding in Ray Data actors would ship 77 x 768 floats per prompt
(~236 KB, ~500x the caption) through the object store. For PixArt's T5-XXL (4.76 B parameters)
the balance turns: ``actors`` adds a stage of text-encoder actors (``pipelines.data.text_encoding``)
and the train workers never load it.

Every row carries ``bad``: 0 for a caption, else 1 + index into ``BAD_REASONS``; the worker
drops bad rows and counts them so the run can log ``data/bad_<reason>``.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import random
import time
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urlparse

from wadi_core.prompts import ensure_embedded_lake
from wadi_core.prompts.shards import (BAD_REASONS, MAX_CAPTION_BYTES, MAX_SHARD_BYTES, bad_code, bad_reason,
                                      parse_prompt_tar)
from wadi_core.storage import is_remote, s3_endpoint

from pipelines.runtime.shares import rank_slice

if TYPE_CHECKING:
    import pyarrow
    import pyarrow.fs
    import ray.data

log = logging.getLogger(__name__)

#: Attempts per S3 request (AWS SDK standard retry mode: exponential backoff with jitter, up to
#: 20 s apart: ~50 s here for a request that keeps failing). ``WADI_S3_MAX_ATTEMPTS`` overrides it.
S3_MAX_ATTEMPTS = 8
#: Whole-shard reads retried on top of the SDK's retries (a body cut off mid-stream is not
#: retried by the SDK); a shard that still fails is counted as ``data/bad_unreadable_shard``.
SHARD_READ_ATTEMPTS = 3

__all__ = [
    "pyarrow_filesystem",
    "list_shards",
    "count_prompts",
    "resolve_prompts",
    "lake_prompt_count",
    "read_shard",
    "lake_captions",
    "prompt_dataset",
    "parse_shard_batch",
    "read_shard_batch",
    "PromptStream",
    "exact_split",
]


def pyarrow_filesystem(uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """``(pyarrow filesystem, path)`` for a local folder or ``s3://bucket/prefix``.

    pyarrow's S3FileSystem ignores ``AWS_ENDPOINT_URL``, so the endpoint is passed explicitly;
    credentials stay with pyarrow's default AWS chain (environment, config files) and are never
    read or printed here.
    """
    import pyarrow.fs as pafs  # noqa: PLC0415 -- pyarrow only where storage is read

    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    kwargs: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # Transient faults (503 SlowDown, connection resets, timeouts) are retried by the AWS SDK with
    # exponential backoff. The retry strategy is NOT kept when the filesystem is pickled to another
    # process (pyarrow 25), so code in Ray tasks calls this function there instead.
    attempts = int(os.environ.get("WADI_S3_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)
    kwargs.setdefault("connect_timeout", 10.0)
    kwargs.setdefault("request_timeout", 120.0)
    return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")


def list_shards(uri: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> tuple["pyarrow.fs.FileSystem", list[str]]:
    """Filesystem and sorted shard paths (``*.tar``) under ``uri``; raises if there are none.

    Shards larger than ``max_shard_bytes`` are left out with a warning: a shard is read whole
    into one read task's memory, so one stray multi-GB file must not be loaded.
    """
    import pyarrow.fs as pafs  # noqa: PLC0415 -- pyarrow only where storage is read

    fs, root = pyarrow_filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"cannot list prompt shards under {uri} ({type(e).__name__}): check the path, bucket "
            "and AWS_ENDPOINT_URL"
        ) from None
    shards = [i for i in infos if i.type == pafs.FileType.File and i.path.endswith(".tar")]
    too_big = sorted(i.path for i in shards if i.size is not None and i.size > max_shard_bytes)
    if too_big:
        msg = (f"{len(too_big)} prompt shard(s) under {uri} are over data.max_shard_bytes={max_shard_bytes:,} "
               f"and are skipped (first: {too_big[0]}): split them, or raise data.max_shard_bytes")
        warnings.warn(msg)
        log.warning(msg)
    paths = sorted(i.path for i in shards if i.path not in too_big)
    if not paths:
        raise FileNotFoundError(f"no usable .tar prompt shards under {uri}: write them with wadi_core.prompts"
                                + (" (every shard is over data.max_shard_bytes)" if too_big else ""))
    return fs, paths


def count_prompts(uri: str) -> int | None:
    """Prompt count from ``manifest.json`` next to the shards, or None when there is none."""
    fs, root = pyarrow_filesystem(uri)
    try:
        with fs.open_input_stream(f"{root}/manifest.json") as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    n = manifest.get("num_prompts", manifest.get("num_samples"))
    return int(n) if n is not None else None


def resolve_prompts(uri: str) -> str:
    """The shard folder for ``data.prompts``; "embedded" builds (once) and returns the embedded lake."""
    if uri != "embedded":
        return uri
    return str(ensure_embedded_lake().train_shards)


def lake_prompt_count(uri: str) -> int | None:
    """``count_prompts`` of the lake ``data.prompts`` names ("embedded" built first), None when it
    has no manifest or cannot be read."""
    try:
        return count_prompts(resolve_prompts(uri))
    except (OSError, RuntimeError):
        return None


def lake_captions(uri: str, need: int, max_caption_bytes: int = MAX_CAPTION_BYTES,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> tuple[list[str], int, int]:
    """The first ``need`` good captions of the lake, shards in name order; reads only as many
    shards as that takes (one for a real lake). Returns (captions, shards read, shards listed):
    fewer than ``need`` captions means the whole lake holds fewer. Raises ``FileNotFoundError``
    as :func:`list_shards`."""
    fs, paths = list_shards(uri, max_shard_bytes)
    captions: list[str] = []
    for i, path in enumerate(paths):
        raw = read_shard(fs, path)
        if raw is not None:
            captions += parse_prompt_tar(raw, max_caption_bytes=max_caption_bytes,
                                         max_shard_bytes=max_shard_bytes).captions
        if len(captions) >= need:
            return captions[:need], i + 1, len(paths)
    return captions, len(paths), len(paths)


def parse_shard_batch(batch: "pyarrow.Table", max_caption_bytes: int = MAX_CAPTION_BYTES,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> "pyarrow.Table":
    """Ray Data map_batches fn: a batch of whole shards (``bytes``) -> rows ``caption``, ``bad``."""
    import pyarrow as pa  # noqa: PLC0415 -- pyarrow only where storage is read

    captions: list[str] = []
    codes: list[int] = []
    for raw in batch.column("bytes").to_pylist():
        parsed = parse_prompt_tar(raw if raw is not None else b"", max_caption_bytes=max_caption_bytes,
                                  max_shard_bytes=max_shard_bytes)
        captions.extend(parsed.captions)
        codes.extend([0] * len(parsed.captions))
        for reason in BAD_REASONS:
            k = parsed.bad[reason]
            if k:
                captions.extend([""] * k)
                codes.extend([bad_code(reason)] * k)
    return pa.table({"caption": pa.array(captions, pa.string()), "bad": pa.array(codes, pa.uint8())})


def read_shard(fs: "pyarrow.fs.FileSystem", path: str, attempts: int = SHARD_READ_ATTEMPTS,
                max_bytes: int = MAX_SHARD_BYTES) -> bytes | None:
    """The shard's bytes, or None when every attempt failed (logged; the caller counts it).

    One HEAD (the size) and one GET of the whole object: ``open_input_stream(...).read()`` of an
    unknown length read S3 in 256 KiB ranged GETs, ~80 requests for a 20 MB shard, which cost ~5x
    the read time against moto (#35). At most ``max_bytes + 1`` bytes are read: a shard that grew
    past the bound after it was listed is counted as corrupt by the parser, never loaded whole."""
    for attempt in range(attempts):
        try:
            with fs.open_input_file(path) as f:
                size = min(f.size(), max_bytes + 1)
                raw = f.read(size)
            if len(raw) != size:  # the object changed under the read: read it again
                raise OSError(f"short read: {len(raw):,} of {size:,} bytes")
            return raw
        except OSError as e:
            if attempt + 1 == attempts:
                log.warning("shard %s is unreadable after %d attempts, skipped: %s", path, attempts, e)
                return None
            time.sleep(min(0.5 * 2 ** attempt, 8.0))
    return None


_FS_CACHE: dict[str, "pyarrow.fs.FileSystem"] = {}


def cached_filesystem(uri: str) -> "pyarrow.fs.FileSystem":
    """``pyarrow_filesystem(uri)``, built once per process (a Ray Data task reads many blocks)."""
    fs = _FS_CACHE.get(uri)
    if fs is None:
        fs = _FS_CACHE[uri] = pyarrow_filesystem(uri)[0]  # built here: keeps the retry strategy
    return fs


def read_shard_batch(batch: "pyarrow.Table", uri: str, max_caption_bytes: int = MAX_CAPTION_BYTES,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> "pyarrow.Table":
    """Ray Data map_batches fn: shard paths -> rows ``caption``, ``bad``. Reads with retries; a
    shard that keeps failing becomes one ``unreadable_shard`` row instead of failing the run."""
    import pyarrow as pa  # noqa: PLC0415 -- pyarrow only where storage is read

    fs = cached_filesystem(uri)
    raws, unreadable = [], 0
    for path in batch.column("path").to_pylist():
        raw = read_shard(fs, path, max_bytes=max_shard_bytes)
        if raw is None:
            unreadable += 1
        else:
            raws.append(raw)
    out = parse_shard_batch(pa.table({"bytes": pa.array(raws, pa.binary())}), max_caption_bytes, max_shard_bytes)
    if not unreadable:
        return out
    code = bad_code("unreadable_shard")
    return pa.concat_tables([out, pa.table({"caption": pa.array([""] * unreadable, pa.string()),
                                            "bad": pa.array([code] * unreadable, pa.uint8())})])


def shard_path_dataset(uri: str, seed: int, epoch: int = 0, read_tasks: int = 0,
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> "ray.data.Dataset":
    """The lake's shard paths as a Ray dataset (``path`` rows), in the order of ``seed + epoch``;
    ``read_tasks`` blocks (default one per shard)."""
    import ray.data  # noqa: PLC0415 -- Ray only on the cluster path

    _, paths = list_shards(uri, max_shard_bytes)
    order = list(paths)
    random.Random(seed + epoch).shuffle(order)
    return ray.data.from_items([{"path": p} for p in order], override_num_blocks=read_tasks or len(order))


def prompt_dataset(uri: str, seed: int, epoch: int = 0, read_tasks: int = 0,
                   max_caption_bytes: int = MAX_CAPTION_BYTES,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> "ray.data.Dataset":
    """Lazy Ray dataset of one epoch: shard files shuffled with ``seed + epoch``, read (with
    retries) and parsed to captions in the same task.

    The file order is fixed here, and the trainer runs Ray Data with ``preserve_order`` so each
    worker's split is the same on every attempt: a resumed run skips exactly the batches it
    already trained on (``pipelines.run``)."""
    # batch_size=None: a whole block (one or a few shards) per call.
    return shard_path_dataset(uri, seed, epoch, read_tasks, max_shard_bytes).map_batches(read_shard_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                          fn_kwargs={"uri": uri, "max_caption_bytes": max_caption_bytes,
                                     "max_shard_bytes": max_shard_bytes})


class PromptStream:
    """This rank's share of one epoch as batches of ``batch_size`` prompts; counts and drops bad rows.

    Every good prompt of the epoch is read exactly once across the ranks and lands in exactly one
    global batch or in the epoch's remainder (:attr:`remainder`: fewer than one global batch,
    counted, not trained). Ray's split hands ranks unequal row counts (:func:`exact_split` drops
    nothing), so an epoch has two phases, both in lockstep on every rank:

    1. while every rank holds a full local batch, each trains on its own rows;
    2. then every rank's leftover rows are gathered (rank order) and cut into global batches,
       rank ``r`` taking slice ``r`` of each.

    The batch sequence is a function of the split alone (``preserve_order``), so resume skips
    exactly the global batches already trained. ``all_true`` (collective AND) and ``gather``
    (collective all-gather of a Python list) are injected: the train loop passes torch.distributed
    ones, tests simulated ranks.

    ``replicated=True`` (elastic training, :func:`exact_split` with ``replicate=True``):
    ``batch_size`` is the global batch; every rank reads the epoch's whole order and takes its
    :func:`rank_slice` of each global batch, so the batches and the position (counted in global
    batches) are the same at any world size; no collective is needed, and the bad rows are counted
    on rank 0 only.

    A batch is a list of captions, or ``pipelines.data.text_encoding.EncodedPrompts`` when the rows
    carry embeddings from the text-encoder actors (``data.text_encoding: actors``)."""

    def __init__(self, batch_size: int, rank: int = 0, world: int = 1,
                 all_true: Callable[[bool], bool] = bool,
                 gather: Callable[[list[Any]], list[list[Any]]] = lambda rows: [rows], replicated: bool = False):
        self.batch_size = batch_size
        self.rank, self.world, self.replicated = rank, world, replicated
        self._all_true, self._gather = all_true, gather
        self.bad: Counter[str] = Counter()
        self.remainder = 0  # good prompts of the epoch left over after the last full global batch

    def rows(self, shard: Any) -> Iterator[Any]:
        """The good rows of this rank's split, in order (a caption, or (caption, embeds, mask, pooled))."""
        # batch_size=None: the blocks as Ray Data made them (a shard's captions, or one encoder call's rows).
        for block in shard.iter_batches(batch_size=None, batch_format="numpy"):
            codes = block["bad"].tolist()
            embeds, mask, pooled = block.get("embeds"), block.get("mask"), block.get("pooled")
            for i, (caption, code) in enumerate(zip(block["caption"], codes)):
                if code:
                    if not self.replicated or self.rank == 0:  # replicated: every rank sees every bad row
                        self.bad[bad_reason(code)] += 1
                elif embeds is None:
                    yield str(caption)
                else:
                    yield (str(caption), embeds[i], None if mask is None else mask[i],
                           None if pooled is None else pooled[i])

    def batches(self, shard: Any, skip: int = 0) -> Iterator[Any]:
        """This rank's slice of each global batch of the epoch; the first ``skip`` global batches
        are read and dropped (resume inside an epoch). Every rank must iterate to the end (or stop
        at the same step): both phases are collectives."""
        from pipelines.data.text_encoding import EncodedPrompts  # noqa: PLC0415 -- torch, which Ray Data tasks skip

        if self.replicated:
            yield from self._global_slices(shard, skip)
            return
        b, rows, buf = self.batch_size, self.rows(shard), []
        while True:  # phase 1: own rows while every rank has a full batch
            buf.extend(itertools.islice(rows, b - len(buf)))
            if not self._all_true(len(buf) == b):
                break
            batch, buf = buf, []
            if skip > 0:
                skip -= 1
                continue
            yield batch if isinstance(batch[0], str) else EncodedPrompts.stack(batch)
        pool = [row for part in self._gather(buf + list(rows)) for row in part]  # phase 2
        full = len(pool) // (b * self.world)
        self.remainder = len(pool) - full * b * self.world
        for g in range(full):
            batch = pool[(g * self.world + self.rank) * b:(g * self.world + self.rank + 1) * b]
            if skip > 0:
                skip -= 1
                continue
            yield batch if isinstance(batch[0], str) else EncodedPrompts.stack(batch)

    def _global_slices(self, shard: Any, skip: int) -> Iterator[Any]:
        """``replicated``: this rank's slice of each global batch of the whole epoch's order."""
        from pipelines.data.text_encoding import EncodedPrompts  # noqa: PLC0415 -- torch, which Ray Data tasks skip

        size, buf = self.batch_size, []
        start, stop = rank_slice(size, self.rank, self.world)
        for row in self.rows(shard):
            buf.append(row)
            if len(buf) < size:
                continue
            batch, buf = buf[start:stop], []
            if skip > 0:
                skip -= 1
                continue
            yield batch if isinstance(batch[0], str) else EncodedPrompts.stack(batch)
        self.remainder = len(buf)

    def counters(self) -> dict[str, int]:
        return {reason: self.bad[reason] for reason in BAD_REASONS}


def exact_split(execution_options: Any, replicate: bool = False) -> Any:
    """A Ray Train ``DataConfig`` whose split drops no row (``replicate``: no split; every rank
    reads the whole dataset in the same order, for :class:`PromptStream`'s ``replicated`` mode).

    Ray's default ingest splits every dataset with ``streaming_split(n, equal=True)``, which
    truncates up to ``n - 1`` rows per epoch: prompts, and the one row a corrupt shard becomes
    (its bad-shard record), were lost. Here ``equal=False``: with ``preserve_order`` Ray hands each
    block, in order, to the split with the fewest rows so far (deterministic, so resume replays the
    same split), and :class:`PromptStream` evens the ranks out."""
    from ray.train import DataConfig  # noqa: PLC0415 -- Ray only on the cluster path

    class ExactSplit(DataConfig):
        def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                      worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = copy.deepcopy(execution_options)
                if replicate:  # elastic: the same order on every rank, whatever the world size
                    for i in range(world_size):
                        output[i][name] = ds.iterator()
                    continue
                for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                    output[i][name] = split
            return output

    return ExactSplit(execution_options=execution_options)
