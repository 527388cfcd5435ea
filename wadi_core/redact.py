"""Credentials out of printed text: the user info of every URI (``s3://KEY:SECRET@bucket``,
``http://user:pw@host``) replaced by ``***`` before a value is logged, printed or tracked."""

from __future__ import annotations

import re
from typing import Any, Mapping

# A URI token: scheme "://" then everything up to whitespace, a quote or an angle bracket.
_URI = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s'\"<>]+)")


def _user_info_end(rest: str) -> int:
    """Index of the "@" that ends the user info of a URI (``rest``: what follows "scheme://"), or -1."""
    end = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if i >= 0:
            end = min(end, i)
    authority = rest[:end]
    at = authority.rfind("@")
    if at < 0:
        # A secret with an unescaped "/" (common in AWS keys) ends the authority early:
        # "KEY:SEC/RET@bucket". "user:<not a port>" followed by a later "@" is user info too.
        _, colon, after = authority.partition(":")
        later = rest.find("@", end)
        if not colon or after.isdigit() or later < 0:
            return -1
        at = later
    return at


def _redact_match(m: re.Match[str]) -> str:
    scheme, rest = m.group("scheme"), m.group("rest")
    at = _user_info_end(rest)
    return m.group(0) if at < 0 else f"{scheme}***{rest[at:]}"


def without_user_info(uri: str) -> str:
    """``uri`` with its user info (and the "@") removed."""
    scheme, sep, rest = uri.partition("://")
    at = _user_info_end(rest) if sep else -1
    return uri if at < 0 else f"{scheme}://{rest[at + 1:]}"


def redact(value: Any) -> Any:
    """``value`` with the user info of every URI in it replaced by ``***`` (strings, and the
    strings inside lists, tuples and dicts); other values are returned as they are."""
    if isinstance(value, str):
        return _URI.sub(_redact_match, value) if "://" in value else value
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
