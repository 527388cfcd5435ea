"""Prompt shards, the one format of the prompt lake: WebDataset tars of ``<key>.txt`` (caption) +
``<key>.json`` (metadata, ``{"key": key, ...}``), ``{prefix}-000000.tar`` ..., and ``manifest.json``.

One writer (``write_prompt_shards``, built on ``prompt_shard_bytes``) and one reader
(``parse_prompt_tar``; ``read_prompt_shards`` walks a lake with it). Keys contain no dots (readers
split a member name at its first dot) and a sample's members are adjacent. Tars are POSIX ustar,
byte-reproducible (mtime 0, no owner; each header as ``tarfile`` writes it in USTAR format), so
``tarfile``, Ray's ``read_webdataset`` and ``webdataset.WebDataset`` read them too.

Why the reader does not use ``tarfile``: a prompt is ~0.5 KB of text but each tar member costs a
512-byte header, and Python's ``tarfile`` spends most of its time building ``TarInfo`` objects
(~75 % of a ``read_webdataset`` pass). ``parse_prompt_tar`` walks the headers of a shard already
in memory with bytes slicing only, checks each header's checksum, and keeps just the captions
(and, when asked, the keys and metadata).

A shard that is not a tar, has a bad header (checksum, a negative or oversized size field, a
zero or malformed PAX record length), is truncated or is larger than ``max_shard_bytes`` is
*corrupt*: the samples parsed before the damage are kept and the shard is counted once. Bad
records (no caption, an empty caption, a caption that is not UTF-8, a caption longer than
``max_caption_bytes``) are counted and dropped; nothing in the parser raises on bad data, and every
header moves the read position forward by at least one block, so a parse always ends.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from wadi_core import storage

__all__ = ["write_prompt_shards", "prompt_shard_bytes", "parse_prompt_tar", "ParsedShard", "read_prompt_shards",
           "read_manifest", "check_sample_key", "shard_manifest", "MANIFEST", "BAD_REASONS", "bad_code", "bad_reason", "MAX_CAPTION_BYTES",
           "MAX_SHARD_BYTES"]

MANIFEST = "manifest.json"

BLOCK = 512
#: Reasons a record (or shard) is dropped; these become metric names ``data/bad_<reason>``.
BAD_REASONS = ("corrupt_shard", "empty_caption", "undecodable", "missing_caption", "too_long",
               "unreadable_shard")  # the last: storage kept failing on every retry (pipelines.data.prompts)


def bad_code(reason: str, reasons: Sequence[str] = BAD_REASONS) -> int:
    """A dropped row's code in a lake table's ``bad`` column: 1 + the reason's index (0 is a good row)."""
    return 1 + reasons.index(reason)


def bad_reason(code: int, reasons: Sequence[str] = BAD_REASONS) -> str:
    """The reason behind a nonzero ``bad`` code (``bad_code``'s inverse)."""
    return reasons[int(code) - 1]


#: Defaults of the recipe keys ``data.max_caption_bytes`` and ``data.max_shard_bytes``.
MAX_CAPTION_BYTES = 16 * 1024
MAX_SHARD_BYTES = 1 << 30
MAX_META_BYTES = 64 * 1024  # GNU long-name / PAX header payloads (names, not data)


class CorruptTar(ValueError):
    """The bytes are not a well-formed tar from this point on."""


TOO_LONG = b"\0too-long\0"  # sentinel (compared by identity) for a caption over the cap


@dataclass
class ParsedShard:
    """What one shard held: its good captions, bad-record counts and why it is corrupt ("" = clean)."""

    captions: list[str] = field(default_factory=list)
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_REASONS, 0))
    error: str = ""  # why the shard counts as corrupt ("" = clean)
    # (key, caption as written, metadata) of each good sample; only with ``parse_prompt_tar(records=True)``
    records: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)


def _octal(field_bytes: bytes) -> int:
    """Numeric tar field: NUL/space-terminated octal, or GNU base-256 when the top bit is set."""
    if field_bytes and field_bytes[0] & 0x80:
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> bytes | None:
    """The ``path`` record of a PAX extended header (``"<len> path=<value>\\n"`` records).

    ``<len>`` counts the whole record, its own digits and the newline included; a length that
    is not decimal, too short to hold ``"<len> k=\\n"``, or runs past the header is corrupt.
    """
    data = data.rstrip(b"\0")
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise CorruptTar(f"bad PAX record length {data[pos:pos + 20]!r}")
        length = int(digits)
        end = pos + length
        if length < len(digits) + 3 or end > len(data) or data[end - 1] != 10:
            raise CorruptTar(f"bad PAX record length {length} at offset {pos} of a {len(data)}-byte header")
        record = data[space + 1 : end - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value
        pos += length
    return None


def _split_key(name: bytes) -> tuple[bytes, bytes]:
    """WebDataset convention: key = dir + basename up to its first dot; the rest is the extension."""
    slash = name.rfind(b"/") + 1
    dot = name.find(b".", slash)
    if dot < 0:
        return name, b""
    return name[:dot], name[dot + 1 :]


def _verify_checksums(buf: bytes, offsets: list[int], stored: list[int]) -> int:
    """Index of the first header whose checksum is wrong, or -1 (vectorised: one numpy pass)."""
    if not offsets:
        return -1

    arr = np.frombuffer(buf, dtype=np.uint8, count=len(buf) // BLOCK * BLOCK).reshape(-1, BLOCK)
    headers = arr[np.asarray(offsets, dtype=np.int64) // BLOCK]
    # The checksum counts its own 8-byte field as spaces.
    sums = headers.sum(axis=1, dtype=np.int64) - headers[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    bad = np.flatnonzero(sums != np.asarray(stored, dtype=np.int64))
    return int(bad[0]) if bad.size else -1


def parse_prompt_tar(
    buf: bytes | bytearray | memoryview,
    caption_ext: str = "txt",
    max_caption_bytes: int = MAX_CAPTION_BYTES,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    records: bool = False,
) -> ParsedShard:
    """Captions of every sample in an in-memory tar shard; never raises on bad data.

    One pass with bytes slicing collects members; header checksums are then verified in one
    vectorised pass, and samples from the first bad header on are dropped. Captions longer than
    ``max_caption_bytes`` count as ``too_long``; a shard over ``max_shard_bytes`` is corrupt.
    ``records`` also keeps each good sample's key, unstripped caption and ``.json`` metadata.
    """
    out = ParsedShard()
    if len(buf) > max_shard_bytes:
        out.error = f"shard of {len(buf):,} bytes is over data.max_shard_bytes={max_shard_bytes:,}"
        out.bad["corrupt_shard"] += 1
        return out
    buf = bytes(buf)
    want = caption_ext.encode()
    n = len(buf)
    off = 0
    long_name: bytes | None = None
    offsets: list[int] = []  # header offsets, for the checksum pass
    stored: list[int] = []
    # One entry per sample: (index of its first header, caption bytes or None, key, metadata bytes or None)
    samples: list[tuple[int, bytes | None, bytes, bytes | None]] = []
    cur_key: bytes | None = None
    cur_first = 0
    cur_caption: bytes | None = None
    cur_meta: bytes | None = None
    error = ""
    try:
        while True:
            if off + BLOCK > n:
                raise CorruptTar(f"truncated header at byte {off}" if off != n else "missing end-of-archive blocks")
            if buf[off] == 0 and buf[off : off + BLOCK].count(0) == BLOCK:
                break  # end of archive
            if buf[off + 257 : off + 262] != b"ustar":
                raise CorruptTar(f"no tar header at byte {off}")
            try:
                size = int(buf[off + 124 : off + 135], 8)
                chk = int(buf[off + 148 : off + 154], 8)
            except ValueError:
                try:
                    size, chk = _octal(buf[off + 124 : off + 136]), _octal(buf[off + 148 : off + 156])
                except ValueError:
                    raise CorruptTar(f"unreadable header at byte {off}") from None
            if size < 0 or chk < 0:
                raise CorruptTar(f"negative size or checksum field in the header at byte {off}")
            offsets.append(off)
            stored.append(chk)
            kind = buf[off + 156]
            start = off + BLOCK
            end = start + size
            if end > n:
                raise CorruptTar(f"member at byte {off} runs past the end of the shard (truncated)")
            hdr_off, off = off, start + (size + BLOCK - 1) // BLOCK * BLOCK
            if kind in (76, 120) and size > MAX_META_BYTES:
                raise CorruptTar(f"{size:,}-byte long-name/PAX header at byte {hdr_off} (at most {MAX_META_BYTES:,})")
            if kind == 76:  # b"L": GNU long name of the next member
                long_name = buf[start:end].rstrip(b"\0")
                continue
            if kind == 120:  # b"x": PAX extended header of the next member
                long_name = _pax_path(buf[start:end]) or long_name
                continue
            if kind not in (48, 0, 55):  # regular files only ("0", NUL, "7")
                continue
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = buf[hdr_off : hdr_off + 100]
                nul = name.find(0)
                if nul >= 0:
                    name = name[:nul]
                if buf[hdr_off + 345] != 0:
                    name = buf[hdr_off + 345 : hdr_off + 500].split(b"\0", 1)[0] + b"/" + name
            slash = name.rfind(47) + 1
            dot = name.find(46, slash)
            key, ext = (name, b"") if dot < 0 else (name[:dot], name[dot + 1 :])
            if key != cur_key:
                if cur_key is not None:
                    samples.append((cur_first, cur_caption, cur_key, cur_meta))
                cur_key, cur_first, cur_caption, cur_meta = key, len(offsets) - 1, None, None
            if ext == want:
                # An over-long member is never copied: a 50 MB "caption" costs nothing.
                cur_caption = buf[start:end] if size <= max_caption_bytes else TOO_LONG
            elif records and ext == b"json" and size <= MAX_META_BYTES:
                cur_meta = buf[start:end]
    except CorruptTar as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - a shard must never take the run down
        error = f"{type(e).__name__}: {e}"
    if cur_key is not None and not error:  # the sample being read when the damage hit is dropped
        samples.append((cur_first, cur_caption, cur_key, cur_meta))
    first_bad = _verify_checksums(buf, offsets, stored)
    if first_bad >= 0:
        error = error or f"bad header checksum at byte {offsets[first_bad]}"
        samples = [s for s in samples if s[0] < first_bad]
    if error:
        out.error = error
        out.bad["corrupt_shard"] += 1
    captions = out.captions
    bad = out.bad
    for _, raw, key, meta in samples:
        if raw is None:
            bad["missing_caption"] += 1
            continue
        if raw is TOO_LONG:
            bad["too_long"] += 1
            continue
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            bad["undecodable"] += 1
            continue
        if _visible(text):
            captions.append(text)
            if records:
                out.records.append((key.decode("utf-8", "replace"), raw.decode("utf-8"), _metadata(meta)))
        else:
            bad["empty_caption"] += 1
    return out


def _metadata(raw: bytes | None) -> dict[str, Any]:
    """A sample's ``.json`` member as a dict ({} when it has none or it is not a JSON object)."""
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _visible(text: str) -> bool:
    """The caption has something to read: not only whitespace, NUL and other control or
    zero-width characters (a letter or digit answers at once; emoji count as visible)."""
    return any(ch.isalnum() for ch in text) or any(
        not (ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp")) for ch in text)


def _ustar_header(name: bytes, size: int) -> bytes:
    """The 512-byte header ``tarfile`` writes in USTAR format for a regular file (mode 644, owner
    0, mtime 0, no user or group names), names up to 100 bytes."""
    if len(name) > 100:
        raise ValueError(f"member name longer than 100 bytes: {name[:40]!r}...")
    hdr = bytearray(BLOCK)
    hdr[0 : len(name)] = name
    hdr[100:108] = b"0000644\0"
    hdr[108:116] = b"0000000\0"
    hdr[116:124] = b"0000000\0"
    hdr[124:136] = b"%011o\0" % size
    hdr[136:148] = b"00000000000\0"
    hdr[148:156] = b" " * 8
    hdr[156] = 48  # "0": regular file
    hdr[257:265] = b"ustar\x0000"
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def check_sample_key(key: str) -> None:
    """WebDataset keys: Ray splits a member name at its first dot, and '/' would make a folder."""
    if "." in key or "/" in key or not key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")


def prompt_shard_bytes(samples: Iterable[tuple[str, str, Mapping[str, Any] | None]]) -> bytes:
    """One shard: ``(key, caption, metadata)`` samples as ``<key>.txt`` + ``<key>.json`` ustar members.

    The metadata member holds ``{"key": key, **metadata}``; ``None`` leaves it out (a caption-only
    sample, e.g. in the reader's tests).
    """
    out = bytearray()
    pad = bytes(BLOCK)
    for key, caption, meta in samples:
        check_sample_key(key)
        members = [(b"txt", caption.encode("utf-8"))]
        if meta is not None:
            members.append((b"json", json.dumps({"key": key, **meta}, ensure_ascii=False).encode("utf-8")))
        for ext, data in members:
            out += _ustar_header(key.encode("utf-8") + b"." + ext, len(data))
            out += data
            out += pad[: -len(data) % BLOCK]
    out += pad * 2  # end of archive (tarfile would also pad to a 10 KiB record: readers need not)
    return bytes(out)


def shard_manifest(count: int, shards: list[str], shard_size: int, **extra: Any) -> dict[str, Any]:
    """The ``manifest.json`` beside the shards."""
    return {"num_prompts": count, "num_shards": len(shards), "shard_size": shard_size, "shards": shards, **extra}


def write_prompt_shards(
    samples: Iterable[tuple[str, str, dict[str, Any]]],
    out_uri: str,
    shard_size: int = 10_000,
    prefix: str = "prompts",
    manifest_extra: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``(key, caption, metadata)`` samples as ``{prefix}-000000.tar`` ... under ``out_uri``
    (local folder or ``s3://`` prefix). Returns the manifest (also written to ``out_uri/manifest.json``)."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    shards: list[str] = []
    batch: list[tuple[str, str, dict[str, Any]]] = []
    count = 0

    def flush() -> None:
        if not batch:
            return
        name = f"{prefix}-{len(shards):06d}.tar"
        storage.write_bytes(storage.join(out_uri, name), prompt_shard_bytes(batch))
        shards.append(name)
        batch.clear()

    for key, text, meta in tqdm(samples, desc="shards", disable=not progress, mininterval=5, unit="prompt"):
        check_sample_key(key)
        batch.append((key, text, meta))
        count += 1
        if len(batch) == shard_size:
            flush()
    flush()
    manifest = shard_manifest(count, shards, shard_size, **(manifest_extra or {}))
    storage.write_bytes(storage.join(out_uri, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(uri: str) -> dict[str, Any]:
    """The ``manifest.json`` of the lake at ``uri``."""
    return json.loads(storage.read_bytes(storage.join(uri, MANIFEST)))


def read_prompt_shards(uri: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield ``(key, caption, metadata)`` from every ``.tar`` under ``uri`` (sorted by shard name).

    Strict, unlike the training stream: a corrupt shard or a bad record raises ``ValueError``
    naming the shard (a lake read back whole should be exactly what was written).
    """
    for shard in storage.list_files(uri, ".tar"):
        parsed = parse_prompt_tar(storage.read_bytes(shard), max_caption_bytes=MAX_SHARD_BYTES, records=True)
        bad = {k: v for k, v in parsed.bad.items() if v}
        if parsed.error or bad:
            raise ValueError(f"prompt shard {shard} is damaged ({parsed.error or bad}): rewrite it with "
                             "wadi_core.prompts.write_prompt_shards (jobs/make_prompt_shards.py)")
        yield from parsed.records
