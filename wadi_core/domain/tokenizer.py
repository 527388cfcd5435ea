"""A CLIP BPE tokenizer for the domain, built offline (no hub download).

transformers 5's ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently yields a 2-token
vocabulary, so we write ``vocab.json`` + ``merges.txt`` and load them with ``from_pretrained``.
The vocabulary holds all 256 byte symbols (alone and word-final), so any text tokenizes;
every domain word is one token thanks to a left-to-right chain of merges.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from wadi_core.domain.attributes import vocabulary

__all__ = ["write_tokenizer_files", "build_tokenizer", "BOS", "EOS"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable-unicode map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _apply_bpe(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    ranks = {m: i for i, m in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def write_tokenizer_files(out_dir: str | os.PathLike, words: Iterable[str] | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for a CLIP BPE whose whole-word tokens are ``words``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    for word in sorted(set(words if words is not None else vocabulary())):
        # Simulate BPE with the merges so far and glue what is left, lowest priority last, so
        # that merges added for later words never split an earlier word (it is one token).
        pieces = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            if pieces[0] + pieces[1] not in known:
                vocab.append(pieces[0] + pieces[1])
                known.add(pieces[0] + pieces[1])
            pieces = _apply_bpe(pieces, merges)
    vocab += [BOS, EOS]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return out


def build_tokenizer(work_dir: str | os.PathLike, model_max_length: int = 32):
    """Write the files into ``work_dir`` and load a ``CLIPTokenizer`` from them."""
    from transformers import CLIPTokenizer  # noqa: PLC0415 -- transformers: seconds to import

    write_tokenizer_files(work_dir)
    return CLIPTokenizer.from_pretrained(str(work_dir), model_max_length=model_max_length,
                                         pad_token=EOS, bos_token=BOS, eos_token=EOS, unk_token=EOS)
