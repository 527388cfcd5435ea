"""Image lake for ControlNet training: WebDataset shards of (image, control image, caption).

Layout: a folder (local or ``s3://bucket/prefix``) of tar shards whose samples are
``<key>.png`` (the RGB image), ``<key>.control.png`` (the control image: a silhouette, an edge or
depth map; grey or RGB) and ``<key>.txt`` (the caption); the usual way to build one for a real
model is to run a control extractor (Canny, depth, segmentation) over an image-caption lake once.

Reading mirrors the prompt lake (``pipelines.data.prompts``): one shard per Ray Data row, read with
retries, parsed in the same task; images stay PNG-encoded until the train worker decodes them
(the object store moves compressed bytes). A shard that cannot be read or parsed, and a sample
missing a part or holding an image PIL cannot decode, become counted rows (``bad`` > 0) that the
worker drops, instead of failing the run.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from PIL import Image

from pipelines.data.prompts import cached_filesystem, read_shard, shard_path_dataset
from wadi_core.prompts.shards import bad_code, bad_reason

if TYPE_CHECKING:
    import pyarrow
    import ray.data

log = logging.getLogger(__name__)

__all__ = ["CONTROL_BAD_REASONS", "write_control_shards", "parse_control_tar", "control_dataset", "decode_rows"]

#: Why a row was dropped; ``bad`` = 1 + index here.
CONTROL_BAD_REASONS = ("corrupt_shard", "unreadable_shard", "incomplete_sample", "undecodable_image")
PARTS = ("png", "control.png", "txt")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def write_control_shards(out_dir: str | Path, samples: Iterable[tuple[str, np.ndarray, np.ndarray, str]],
                         per_shard: int = 1000) -> list[Path]:
    """Write ``(key, image uint8 (H, W, 3), control uint8 (H, W) or (H, W, C), caption)`` samples as
    tar shards ``shard-000000.tar``, ... in a local folder (upload it with ``wadi_core.storage.upload_dir``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tar: tarfile.TarFile | None = None
    count = 0
    try:
        for key, image, control, caption in samples:
            if "." in key:
                raise ValueError(f"sample key {key!r} contains a dot; readers split member names at the first dot")
            if count % per_shard == 0:
                if tar is not None:
                    tar.close()
                paths.append(out / f"shard-{len(paths):06d}.tar")
                tar = tarfile.open(paths[-1], "w")
            for ext, data in (("png", _png(image)), ("control.png", _png(control)), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            count += 1
    finally:
        if tar is not None:
            tar.close()
    return paths


def parse_control_tar(raw: bytes) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Samples of one in-memory shard and the counts of what was dropped; never raises on bad data."""
    bad = {r: 0 for r in CONTROL_BAD_REASONS}
    groups: dict[str, dict[str, bytes]] = {}
    # tarfile reads a truncated archive without complaint (short member data, EOF taken as the end):
    # members must lie inside the bytes, and the archive must end with its two zero blocks.
    damage = "" if len(raw) >= 1024 and not any(raw[-1024:]) else "no end-of-archive blocks (truncated?)"
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for member in tar:
                if member.offset_data + member.size > len(raw):
                    damage = f"member {member.name!r} runs past the end of the shard"
                    break
                if not member.isfile():
                    continue
                key, _, ext = Path(member.name).name.partition(".")
                f = tar.extractfile(member)
                if f is not None:
                    groups.setdefault(key, {})[ext] = f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        damage = str(e)
    if damage:
        log.warning("control shard is corrupt (%s): the %d samples before the damage are kept", damage, len(groups))
        bad["corrupt_shard"] += 1
    rows = []
    for key, parts in groups.items():
        if not all(p in parts for p in PARTS):
            bad["incomplete_sample"] += 1
            continue
        rows.append({"key": key, "image": parts["png"], "control": parts["control.png"],
                     "caption": parts["txt"].decode("utf-8", "replace").strip()})
    return rows, bad


def _table(rows: list[dict[str, Any]], bad: dict[str, int]) -> "pyarrow.Table":
    import pyarrow as pa  # noqa: PLC0415 -- pyarrow only where storage is read

    images = [r["image"] for r in rows]
    controls = [r["control"] for r in rows]
    captions = [r["caption"] for r in rows]
    codes = [0] * len(rows)
    for reason in CONTROL_BAD_REASONS:
        images += [b""] * bad.get(reason, 0)
        controls += [b""] * bad.get(reason, 0)
        captions += [""] * bad.get(reason, 0)
        codes += [bad_code(reason, CONTROL_BAD_REASONS)] * bad.get(reason, 0)
    return pa.table({"image": pa.array(images, pa.binary()), "control": pa.array(controls, pa.binary()),
                     "caption": pa.array(captions, pa.string()), "bad": pa.array(codes, pa.uint8())})


def read_control_batch(batch: "pyarrow.Table", uri: str) -> "pyarrow.Table":
    """Ray Data map_batches fn: shard paths -> rows ``image``, ``control`` (PNG bytes), ``caption``, ``bad``."""
    fs = cached_filesystem(uri)
    rows: list[dict[str, Any]] = []
    bad = {r: 0 for r in CONTROL_BAD_REASONS}
    for path in batch.column("path").to_pylist():
        raw = read_shard(fs, path)  # with retries; None when storage kept failing
        if raw is None:
            bad["unreadable_shard"] += 1
            continue
        shard_rows, shard_bad = parse_control_tar(raw)
        rows += shard_rows
        for k, v in shard_bad.items():
            bad[k] += v
    return _table(rows, bad)


def control_dataset(uri: str, seed: int, epoch: int = 0) -> "ray.data.Dataset":
    """Lazy Ray dataset of one epoch of the lake at ``uri``: shards shuffled with ``seed + epoch``."""
    return shard_path_dataset(uri, seed, epoch).map_batches(read_control_batch, batch_format="pyarrow",
                                                            batch_size=None, zero_copy_batch=True,
                                                            fn_kwargs={"uri": uri})


def decode_rows(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, int]]:
    """A numpy batch of lake rows -> images uint8 (B, H, W, 3), controls float (B, H, W) in [0, 1]
    (a colour control image is averaged to grey), captions, and counts of rows dropped (bad rows,
    PNGs that do not decode or whose size differs from the batch's first image)."""
    bad = {r: 0 for r in CONTROL_BAD_REASONS}
    images, controls, captions = [], [], []
    for img, ctl, cap, code in zip(batch["image"], batch["control"], batch["caption"], batch["bad"]):
        if code:
            bad[bad_reason(code, CONTROL_BAD_REASONS)] += 1
            continue
        try:
            with Image.open(io.BytesIO(img)) as im:
                x = np.asarray(im.convert("RGB"))
            with Image.open(io.BytesIO(ctl)) as im:
                c = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        except Exception:  # noqa: BLE001 - PIL raises many kinds on crafted bytes; the row is dropped and counted
            bad["undecodable_image"] += 1
            continue
        if (images and x.shape != images[0].shape) or c.shape != x.shape[:2]:
            bad["undecodable_image"] += 1
            continue
        images.append(x)
        controls.append(c)
        captions.append(str(cap))
    if not images:
        return np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0, 1, 1), np.float32), [], bad
    return np.stack(images), np.stack(controls), captions, bad
