"""Load test of the served student (and teacher) over loopback HTTP: N concurrent clients, a fixed request count.

    # starts the app itself (private local Ray, a free 127.0.0.1 port) from a ServeConfig (jobs/serve.py's keys)
    python benchmarks/bench_serve.py model=runs/ray/wadi-embedded/export teacher=embedded \
        --requests 2000 --concurrency 32 --teacher-requests 200
    # the 2-core configuration of docs/RESULTS.md: a student replica per core, batches of 16 (the clients per
    # replica), the teacher on no reserved CPU (it runs after the student phase) with 2 torch threads
    python benchmarks/bench_serve.py model=runs/ray/wadi-embedded/export replicas.num_replicas=2 \
        batch.max_batch_size=16 teacher=embedded teacher_replicas.num_cpus=0 teacher_replicas.torch_threads=2
    # against a running `python jobs/serve.py` (loopback only)
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000

Clients send to the student replicas' own ports (Serve's direct ingress, ``--ingress direct``, the default:
no proxy hop, see docs/SERVING.md) or through Serve's HTTP proxy (``--ingress proxy``).
Each request is ``POST /generate {"prompt", "seed"}`` -> PNG, prompts from the embedded domain's eval list,
seed = request index. Reports p50 / p90 / p99 latency, images/s over the phase's wall time, errors (any
non-200, a timeout, a request left unsent at the time limit) and how busy the machine's cores were, for
the student then the teacher (``--teacher-concurrency`` clients), the student / teacher throughput ratio,
and the issue's targets beside the measured values; ``--out`` also keeps every request's (sent at,
latency, batch size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import ray
from ray import serve

from wadi_core.domain import eval_prompts

from pipelines.config.cli import load_job_config
from pipelines.evaluate.runs import resolve_tracking_uri
from pipelines.runtime.cluster import init_ray
from pipelines.serve.app import build_app
from pipelines.serve.direct import direct_ingress_urls
from pipelines.serve.options import ServeConfig, ray_serve_env

# issue #34, for the embedded default on 2 cores, 32 concurrent clients, 2,000 requests
TARGET_IMAGES_PER_S = 100.0
TARGET_P99_MS = 250.0
TARGET_ERRORS = 0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class PhaseResult:
    """One model's run: what was asked, what came back, how fast."""

    model: str
    requests: int
    concurrency: int
    ok: int
    errors: int
    unsent: int
    wall_s: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_batch: float
    client_cpu_ms: float      # the client's own CPU per request (its event loop thread): is the load generator the limit?
    machine_busy: float       # share of all cores' time busy during the phase (/proc/stat; NaN elsewhere): idle left?
    first_error: str | None
    # per answered request: (sent at s, latency ms, batch size, server ms in the handler, its batch's compute ms, replica)
    timeline: list[tuple[float, float, int, float, float, int]]


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat (steal counts as busy: lost to us), None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def _busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float:
    if before is None or after is None or after[1] == before[1]:
        return float("nan")
    return (after[0] - before[0]) / (after[1] - before[1])


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def run_phase(urls: list[str], model: str, prompts: list[str], requests: int, concurrency: int,
                    max_seconds: float, timeout_s: float) -> PhaseResult:
    """``requests`` POSTs by ``concurrency`` clients, client i on ``urls[i % len(urls)]`` (one per replica on the
    direct path); stops sending after ``max_seconds`` (the rest count as errors)."""
    query = "?model=teacher" if model == "teacher" else ""
    endpoints = [url.rstrip("/") + "/generate" + query for url in urls]
    latencies: list[float] = []
    batches: list[int] = []
    sent_at: list[float] = []
    server: list[tuple[float, float, int]] = []  # per answer: the server's ms in the handler, its batch's compute ms, replica
    errors: list[str] = []
    next_index = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    client_cpu_start = time.thread_time()
    ticks_start = _cpu_ticks()

    async def client(session: aiohttp.ClientSession, replica: int) -> None:
        endpoint = endpoints[replica]
        nonlocal next_index
        while next_index < requests and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            body = {"prompt": prompts[i % len(prompts)], "seed": i}
            t0 = time.perf_counter()
            try:
                async with session.post(endpoint, json=body) as r:
                    payload = await r.read()
                    if r.status != 200 or r.headers.get("content-type") != "image/png":
                        errors.append(f"HTTP {r.status}: {payload[:200]!r}")
                        continue
                    batches.append(int(r.headers.get("x-batch-size", "1")))
                    server.append((float(r.headers.get("x-latency-ms", "nan")),
                                   float(r.headers.get("x-compute-ms", "nan")), replica))
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            sent_at.append(t0 - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        await asyncio.gather(*(client(session, i % len(endpoints)) for i in range(concurrency)))
    wall = time.perf_counter() - start
    client_cpu_ms = (time.thread_time() - client_cpu_start) * 1000 / max(1, next_index)
    busy = _busy_share(ticks_start, _cpu_ticks())
    unsent = requests - next_index
    return PhaseResult(model, requests, concurrency, len(latencies), len(errors) + unsent, unsent, round(wall, 2),
                       round(len(latencies) / wall, 1), round(percentile(latencies, 50), 1),
                       round(percentile(latencies, 90), 1), round(percentile(latencies, 99), 1), round(max(latencies, default=float("nan")), 1),
                       round(sum(batches) / max(1, len(batches)), 2), round(client_cpu_ms, 2),
                       round(busy, 3),
                       errors[0] if errors else None,
                       [(round(t, 4), round(lat, 2), b, *srv) for t, lat, b, srv in zip(sent_at, latencies, batches, server)])


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}), got {host!r}: "
                         "this load test never leaves the machine")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(overrides: list[str], recipe: str | None) -> tuple[str, Any]:
    """Serve a ServeConfig on a private local Ray and a free loopback port; returns the URL and the config."""
    cfg = load_job_config(ServeConfig, recipe, overrides)
    tracking = cfg.tracking_uri
    if cfg.model.startswith(("models:/", "runs:/")) and tracking is None:
        tracking = resolve_tracking_uri(None)
    os.environ.update(ray_serve_env(cfg))  # before the local Ray starts: its Serve processes inherit it
    init_ray(include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg.student_options(), cfg.teacher_options(), cfg.limits, tracking), name="wadi",
              route_prefix="/")
    return f"http://127.0.0.1:{port}", cfg


def _healthz(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=60) as r:
        return json.loads(r.read())


def _verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def report(student: PhaseResult, teacher: PhaseResult | None) -> str:
    """The results table and the targets beside them."""
    rows = [(f"{'model':<8} {'requests':>8} {'clients':>7} {'ok':>6} {'errors':>6} {'images/s':>9} {'p50 ms':>8} "
             f"{'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean batch':>10} {'client CPU ms/req':>17} {'cores busy':>10}")]
    for r in [student] + ([teacher] if teacher else []):
        rows.append(f"{r.model:<8} {r.requests:>8} {r.concurrency:>7} {r.ok:>6} {r.errors:>6} {r.images_per_s:>9.1f} "
                    f"{r.p50_ms:>8.1f} {r.p90_ms:>8.1f} {r.p99_ms:>8.1f} {r.max_ms:>8.1f} {r.mean_batch:>10.2f} {r.client_cpu_ms:>17.2f} {r.machine_busy:>10.0%}")
        if r.first_error:
            rows.append(f"         first error: {r.first_error}")
    rows += ["", "targets (issue #34: embedded default, 2 cores, 32 clients, 2,000 requests)",
             (f"  student images/s  >= {TARGET_IMAGES_PER_S:>5.0f}   measured {student.images_per_s:>8.1f}   "
              f"{_verdict(student.images_per_s >= TARGET_IMAGES_PER_S)}"),
             (f"  student p99 ms    <= {TARGET_P99_MS:>5.0f}   measured {student.p99_ms:>8.1f}   "
              f"{_verdict(student.p99_ms <= TARGET_P99_MS)}"),
             (f"  student errors    == {TARGET_ERRORS:>5d}   measured {student.errors:>8d}   "
              f"{_verdict(student.errors == TARGET_ERRORS)}")]
    # closed loop (each client waits for its answer): mean latency = clients / throughput (Little's law)
    rows.append(f"  {student.concurrency} clients in a closed loop: p99 <= {TARGET_P99_MS:.0f} ms needs at least "
                f"{student.concurrency / (TARGET_P99_MS / 1000):.0f} images/s (mean latency = clients / images/s)")
    if teacher and teacher.images_per_s > 0:
        rows.append(f"  student / teacher throughput: {student.images_per_s / teacher.images_per_s:.1f}x "
                    f"({student.images_per_s:.1f} / {teacher.images_per_s:.1f} images/s)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="jobs/serve.py config keys (without --url)")
    ap.add_argument("--config", default=None, metavar="RECIPE", help="a recipe for the served config (without --url)")
    ap.add_argument("--url", help="a running server on loopback instead of starting one")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--teacher-requests", type=int, default=200, help="0: no teacher phase")
    ap.add_argument("--teacher-concurrency", type=int, default=8,
                    help="clients of the teacher phase (25 steps: 32 waiting clients would queue for ~15 s each)")
    ap.add_argument("--warmup", type=int, default=64, help="untimed student requests first")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="per phase: requests not sent by then are errors")
    ap.add_argument("--timeout-s", type=float, default=60.0, help="per request")
    ap.add_argument("--ingress", choices=("direct", "proxy"), default="direct",
                    help="direct: to the student replicas' own ports (Serve's direct ingress, no proxy hop); "
                         "proxy: through Serve's HTTP proxy (the app's URL)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.teacher_concurrency < 1:
        raise SystemExit("--requests, --concurrency and --teacher-concurrency must be >= 1")
    prompts = eval_prompts(500, seed=1, split="train")
    if args.url:
        if args.overrides or args.config:
            raise SystemExit("with --url the server's own config applies: drop the KEY=VALUE overrides")
        _check_loopback(args.url)
        url = args.url
    else:
        url, cfg = start_app(args.overrides, args.config)
    try:
        health = _healthz(url)
        print(f"[bench] {url}: student {health['student']} teacher {health['teacher']}", flush=True)
        urls = [url]
        if args.ingress == "direct":
            replicas = cfg.replicas.num_replicas if not args.url else 64
            urls = direct_ingress_urls(urlparse(url).hostname, health["student"]["uri"], replicas)
            if not urls:
                raise SystemExit("--ingress direct: no student replica answers on its own port (Serve's direct "
                                 "ingress needs RAY_SERVE_THROUGHPUT_OPTIMIZED=1, the default throughput_optimized="
                                 "true); or pass --ingress proxy")
        print(f"[bench] ingress {args.ingress}: {' '.join(urls)}", flush=True)
        if args.warmup:
            asyncio.run(run_phase(urls, "student", prompts, args.warmup, args.concurrency, args.max_seconds,
                                  args.timeout_s))
        student = asyncio.run(run_phase(urls, "student", prompts, args.requests, args.concurrency, args.max_seconds,
                                        args.timeout_s))
        teacher = None
        if args.teacher_requests and health.get("teacher"):
            asyncio.run(run_phase(urls, "teacher", prompts, min(args.teacher_concurrency, args.teacher_requests),
                                  args.teacher_concurrency, args.max_seconds, args.timeout_s))  # warm-up
            teacher = asyncio.run(run_phase(urls, "teacher", prompts, args.teacher_requests, args.teacher_concurrency,
                                            args.max_seconds, args.timeout_s))
        print(report(student, teacher), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"url": url, "ingress": args.ingress, "urls": urls, "health": health, "student": asdict(student),
                                            "teacher": asdict(teacher) if teacher else None}, indent=2))
    finally:
        if not args.url:
            serve.shutdown()
            ray.shutdown()
    return 0 if student.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
