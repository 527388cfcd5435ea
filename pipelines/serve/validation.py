"""Read a ``POST /generate`` request into prompts and seeds, or say exactly what is wrong with it.

No Ray and no web framework here: the HTTP layer hands over the raw body and headers and turns a
``BadRequest`` into a JSON error with its status, so every rule below is unit-testable and the
replica never sees input it cannot sample from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["BadRequest", "GenerateRequest", "RequestLimits", "MAX_SEED", "MODELS", "parse_generate_request",
           "wants_json"]

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes any 64-bit value; JSON clients keep to int64
MODELS = ("student", "teacher")
_FIELDS = {"prompt", "seed", "prompts", "seeds", "format"}


class BadRequest(ValueError):
    """A request the server refuses, with the HTTP status and a message that says what to send instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; the body limit is checked before the body is read."""

    max_body_bytes: int = 64 * 1024  # a 100 KB prompt is refused with 413 before JSON parsing
    max_prompt_chars: int = 1000     # CLIP reads 77 tokens; longer prompts are a client bug, not a wish
    max_prompts: int = 16            # one request's list form; more images: more requests (they batch)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_chars", "max_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve limit {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class GenerateRequest:
    """Validated prompts (stripped of nothing: the model sees what was sent) and one seed per prompt."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    model: Literal["student", "teacher"] = "student"
    many: bool = False          # the list form was used: the answer is always JSON
    base64: bool = False        # "format": "base64" asked for JSON with base64 PNGs


def wants_json(accept: str | None) -> bool:
    """True when the ``Accept`` header names JSON and not PNG (``*/*`` and no header mean PNG)."""
    if not accept:
        return False
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return "application/json" in kinds and "image/png" not in kinds


def check_body_size(content_length: str | None, limits: RequestLimits) -> None:
    """413 from the ``Content-Length`` header alone, so an oversized body is never read into memory."""
    if content_length is None:
        return
    try:
        n = int(content_length)
    except ValueError:
        raise BadRequest(400, f"Content-Length {content_length!r} is not a number") from None
    if n > limits.max_body_bytes:
        raise BadRequest(413, f"request body is {n} bytes, the limit is {limits.max_body_bytes}: "
                              f"send prompts of at most {limits.max_prompt_chars} characters")


def _seed(value: Any, where: str) -> int:
    # bool is an int subclass in Python; true/false as a seed is a client bug
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(422, f"{where} must be an integer in [0, 2**63-1], got {json.dumps(value)[:40]}")
    if not 0 <= value <= MAX_SEED:
        raise BadRequest(422, f"{where} must be in [0, 2**63-1] ({MAX_SEED}), got {value}")
    return value


def _prompt(value: Any, where: str, limits: RequestLimits) -> str:
    if not isinstance(value, str):
        raise BadRequest(422, f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRequest(422, f"{where} is empty: type a description, e.g. \"a red circle\"")
    if len(value) > limits.max_prompt_chars:
        raise BadRequest(422, f"{where} has {len(value)} characters, the limit is {limits.max_prompt_chars}")
    if "\x00" in value:
        raise BadRequest(422, f"{where} contains a NUL character")
    return value


def parse_generate_request(body: bytes, *, model: str | None = None, limits: RequestLimits | None = None
                           ) -> GenerateRequest:
    """``{"prompt": str, "seed": int}`` or ``{"prompts": [str], "seeds": [int]}`` (+ ``"format": "base64"``)
    -> ``GenerateRequest``; ``model`` is the ``?model=`` query value. Raises ``BadRequest``."""
    limits = limits or RequestLimits()
    name = model or "student"
    if name not in MODELS:
        raise BadRequest(422, f"model must be one of {', '.join(MODELS)}, got {name[:40]!r}")
    if len(body) > limits.max_body_bytes:  # also when the client sent no Content-Length (chunked)
        raise BadRequest(413, f"request body is {len(body)} bytes, the limit is {limits.max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(400, f"request body is not UTF-8 (byte {e.start}): send UTF-8 JSON") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(400, f"request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                              'send {"prompt": "a red circle", "seed": 0}') from None
    if not isinstance(doc, dict):
        raise BadRequest(422, 'request body must be a JSON object, e.g. {"prompt": "a red circle", "seed": 0}')
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise BadRequest(422, f"unknown field(s) {', '.join(unknown)[:200]}: use {', '.join(sorted(_FIELDS))}")
    fmt = doc.get("format", "png")
    if fmt not in ("png", "base64"):
        raise BadRequest(422, f"format must be \"png\" or \"base64\", got {json.dumps(fmt)[:40]}")
    if ("prompt" in doc) == ("prompts" in doc):
        raise BadRequest(422, 'send exactly one of "prompt" (a string) or "prompts" (a list of strings)')
    if "seeds" in doc and "prompts" not in doc:
        raise BadRequest(422, '"seeds" goes with "prompts"; with "prompt" send one "seed"')
    seed = _seed(doc["seed"], "seed") if "seed" in doc else 0
    if "prompt" in doc:
        return GenerateRequest((_prompt(doc["prompt"], "prompt", limits),), (seed,), name, False, fmt == "base64")
    prompts = doc["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise BadRequest(422, '"prompts" must be a non-empty list of strings')
    if len(prompts) > limits.max_prompts:
        raise BadRequest(413, f"{len(prompts)} prompts in one request, the limit is {limits.max_prompts}: "
                              "split them over several requests (the server batches them)")
    checked = tuple(_prompt(p, f"prompts[{i}]", limits) for i, p in enumerate(prompts))
    if "seeds" in doc:
        seeds = doc["seeds"]
        if not isinstance(seeds, list) or len(seeds) != len(prompts):
            raise BadRequest(422, f'"seeds" must be a list of {len(prompts)} integers, one per prompt')
        seeds_checked = tuple(_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds))
    else:
        seeds_checked = (seed,) * len(prompts)
    return GenerateRequest(checked, seeds_checked, name, True, fmt == "base64")
