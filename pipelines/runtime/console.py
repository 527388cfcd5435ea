"""What a job prints: a few lines for a person on the terminal, everything in a log file.

A distillation job's raw output is mostly Ray's: INFO blocks of Ray Data and Ray Train, progress
bars redrawn from every worker, library warnings. :func:`quiet_console` sends file descriptors 1
and 2 (this process and every process it starts: Ray's own included, and the worker output Ray
forwards to the driver) through a pipe: every line goes to the log file, and only the lines meant
for a person reach the terminal: the job's own (:func:`say`, and ``[wadi]`` lines from the workers),
warnings raised by this project's code, and a traceback that ends the job. ``--verbose`` tees
everything to both.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from pathlib import Path
from typing import IO, Iterator

__all__ = ["quiet_console", "say", "keep_on_console", "MARK"]

MARK = "[wadi]"  # lines the workers print for a person carry it (pipelines/train/worker.py)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\s*\((?:[A-Za-z_.]+ )?pid=\d+(?:, ip=[^)]*)?\)\s*")
#: Paths of this project's code: warnings raised there are for the user (lease taken over, a
#: checkpoint skipped, ...); the libraries' own deprecation notes are not.
_OWN_CODE = re.compile(r"/(?:pipelines|wadi_core|jobs)/[\w/]+\.py:\d+: \w*Warning: ")

_console: IO[str] | None = None  # the terminal (stdout, stderr) while quiet_console is active
_console_err: IO[str] | None = None
_log: IO[bytes] | None = None
_lock = threading.Lock()  # the log file is written by the pump and by say()


def _plain(line: str) -> str:
    """The line as a person reads it: the last redraw of a ``\r`` line, no colours, no Ray prefix."""
    return _RAY_PREFIX.sub("", _ANSI.sub("", line.split("\r")[-1]))


def keep_on_console(line: str) -> bool:
    """The line (one line of the combined output, Ray's prefixes and colours included) is for a
    person: a ``[wadi]`` line, or a warning raised by this project's code."""
    text = _plain(line)
    return text.startswith(MARK) or bool(_OWN_CODE.search(text))


def say(*parts: object, err: bool = False) -> None:
    """Print for a person: on the terminal (and in the log) whether or not the console is quiet;
    ``err``: on standard error when it is not."""
    text = " ".join(str(p) for p in parts)
    if _console is None:
        print(text, flush=True, file=sys.stderr if err else sys.stdout)
        return
    sys.stdout.flush()
    with _lock:
        _log.write((text + "\n").encode())
        _log.flush()
    out = _console_err if err else _console
    out.write(text + "\n")
    out.flush()


@contextlib.contextmanager
def quiet_console(log_path: str | os.PathLike, verbose: bool = False) -> Iterator[Path]:
    """For the block, fds 1 and 2 go to ``log_path`` (appended) and, filtered by
    :func:`keep_on_console` (everything when ``verbose``), to the terminal. Yields the log path.
    Processes started in the block (Ray's) write into the same pipe: shut them down inside it."""
    global _console, _console_err, _log
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    read_fd, write_fd = os.pipe()
    log = open(path, "ab")  # noqa: SIM115 - closed below
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    terminal_err = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    def pump() -> None:
        last = ""  # Ray can deliver a worker's line twice (its log file and its stream): show it once
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in pipe:
                with _lock:
                    if log.closed:  # a straggler after the block ended
                        return
                    log.write(raw)
                    log.flush()
                line = raw.decode("utf-8", "replace")
                if verbose:
                    terminal.write(line)
                elif keep_on_console(line) and _plain(line) != last:
                    last = _plain(line)
                    terminal.write(last.rstrip("\n") + "\n")
                terminal.flush()

    thread = threading.Thread(target=pump, name="wadi-console", daemon=True)
    thread.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _console, _console_err, _log = (None, None, None) if verbose else (terminal, terminal_err, log)
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _console = _console_err = _log = None
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)  # the last writer of the pipe is gone: the pump ends
        thread.join(timeout=5)  # a straggling child may still hold it: its last lines are dropped
        with _lock:
            log.close()
        terminal.close()
        terminal_err.close()
        os.close(saved_out)
        os.close(saved_err)
