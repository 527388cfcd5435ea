"""Serving the one-step student with Ray Serve (pipelines/serve, jobs/serve.py).

Request validation, the config and the sampler are checked without Ray; then one private local Ray
serves a tiny export (and the embedded teacher with 2 steps) on a free loopback port, and the HTTP API
is checked as a client sees it: images, JSON, the teacher, every bad input as a 4xx with a clear
message followed by a good request that still works, batching under concurrent requests, same seed
-> same bytes. The last test runs ``jobs/serve.py`` and stops it with SIGTERM.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.serve.options import BatchOptions, ModelOptions, ReplicaOptions, ServeConfig, deployment_options
from pipelines.serve.validation import (MAX_SEED, BadRequest, RequestLimits, check_body_size, parse_generate_request,
                                        wants_json)

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _decode(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def student_export(tmp_path_factory) -> Path:
    """A one-step export of the embedded teacher with a perturbed LoRaD student (not the identity)."""
    from wadi_core.export import export_one_step_pipeline
    from wadi_core.models import load_teacher
    from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller

    torch.manual_seed(0)
    d = WaDiDistiller(load_teacher("embedded"), VSDConfig(student=AdapterSpec("lorad", 2), fake=AdapterSpec("lorad", 2)))
    with torch.no_grad():
        for p in d.parameters("student"):
            p.add_(0.05 * torch.randn_like(p))
    return export_one_step_pipeline(d, tmp_path_factory.mktemp("serve") / "export")


# ------------------------------------------------------------------------------- validation (no Ray)
def _body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_single_and_list_forms_parse():
    one = parse_generate_request(_body({"prompt": "a red circle", "seed": 7}))
    assert (one.prompts, one.seeds, one.model, one.many, one.base64) == (("a red circle",), (7,), "student", False,
                                                                         False)
    many = parse_generate_request(_body({"prompts": ["a", "b"], "seeds": [1, MAX_SEED], "format": "base64"}),
                                  model="teacher")
    assert (many.prompts, many.seeds, many.model, many.many, many.base64) == (("a", "b"), (1, MAX_SEED), "teacher",
                                                                              True, True)
    assert parse_generate_request(_body({"prompts": ["a", "b"], "seed": 3})).seeds == (3, 3)
    assert parse_generate_request(_body({"prompt": "ünïcødé ✓"})).seeds == (0,)


LIMITS = RequestLimits(max_body_bytes=2048, max_prompt_chars=100, max_prompts=4)
BAD = [
    (b"", 400, "not valid JSON"),
    (b'{"prompt": "a red', 400, "not valid JSON"),
    ('{"prompt": "caf\xe9"}'.encode("latin-1"), 400, "not UTF-8"),
    (_body(["a red circle"]), 422, "must be a JSON object"),
    (_body({"prompt": ""}), 422, "prompt is empty"),
    (_body({"prompt": " \t\n "}), 422, "prompt is empty"),
    (_body({"prompt": 5}), 422, "prompt must be a string"),
    (_body({"prompt": "x" * 101}), 422, "101 characters, the limit is 100"),
    (_body({"prompt": "x" * 5000}), 413, "5014 bytes, the limit is 2048"),
    (_body({"prompt": "a\x00b"}), 422, "NUL"),
    (_body({"seed": 1}), 422, "exactly one of"),
    (_body({"prompt": "a", "prompts": ["b"]}), 422, "exactly one of"),
    (_body({"prompt": "a", "seed": -1}), 422, r"\[0, 2\*\*63-1\].*got -1"),
    (_body({"prompt": "a", "seed": 2**63}), 422, r"got 9223372036854775808"),
    (_body({"prompt": "a", "seed": 1.5}), 422, "must be an integer"),
    (_body({"prompt": "a", "seed": "1"}), 422, "must be an integer"),
    (_body({"prompt": "a", "seed": True}), 422, "must be an integer"),
    (_body({"prompt": "a", "seeds": [1]}), 422, '"seeds" goes with "prompts"'),
    (_body({"prompts": []}), 422, "non-empty list"),
    (_body({"prompts": "a"}), 422, "non-empty list"),
    (_body({"prompts": ["a"] * 5}), 413, "5 prompts in one request, the limit is 4"),
    (_body({"prompts": ["a", " "]}), 422, r"prompts\[1\] is empty"),
    (_body({"prompts": ["a", "b"], "seeds": [1]}), 422, "list of 2 integers"),
    (_body({"prompts": ["a", "b"], "seeds": [1, -2]}), 422, r"seeds\[1\]"),
    (_body({"prompt": "a", "format": "jpeg"}), 422, "format must be"),
    (_body({"prompt": "a", "sede": 1}), 422, "unknown field.*sede"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_requests_are_refused_with_status_and_message(body: bytes, status: int, message: str):
    with pytest.raises(BadRequest, match=message) as e:
        parse_generate_request(body, limits=LIMITS)
    assert e.value.status == status


def test_unknown_model_and_oversized_content_length_are_refused():
    with pytest.raises(BadRequest, match="model must be one of student, teacher") as e:
        parse_generate_request(_body({"prompt": "a"}), model="teacher2")
    assert e.value.status == 422
    with pytest.raises(BadRequest, match="102400 bytes, the limit is 65536") as e:
        check_body_size("102400", RequestLimits())
    assert e.value.status == 413
    with pytest.raises(BadRequest, match="not a number"):
        check_body_size("lots", RequestLimits())
    check_body_size(None, RequestLimits())  # chunked: the body is counted as it is read


@pytest.mark.parametrize("accept, expected", [(None, False), ("*/*", False), ("image/png", False),
                                              ("application/json", True), ("application/json; q=1.0", True),
                                              ("image/png, application/json", False)])
def test_accept_header_chooses_json(accept, expected):
    assert wants_json(accept) is expected


# ------------------------------------------------------------------------------- config (no Ray)
def test_config_maps_to_serve_deployment_options():
    cfg = ServeConfig(model="/x", teacher="embedded", batch=BatchOptions(16, 0.02),
                      replicas=ReplicaOptions(num_replicas=2, num_cpus=2, num_gpus=1))
    student, teacher = cfg.student_options(), cfg.teacher_options()
    assert (student.steps, student.guidance, teacher.steps, teacher.guidance) == (1, 1.0, 25, 3.0)
    opts = deployment_options(student)
    assert opts == {"ray_actor_options": {"num_cpus": 2, "num_gpus": 1}, "max_ongoing_requests": 32,
                    "num_replicas": 2}
    auto = deployment_options(ModelOptions("/x", replicas=ReplicaOptions(autoscaling=True, min_replicas=1,
                                                                         max_replicas=3)))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 32.0}
    assert ServeConfig().teacher_options() is None
    assert [ReplicaOptions(num_cpus=c, torch_threads=t).cpu_threads for c, t in ((0, 0), (0.5, 0), (3, 0), (0, 2))] \
        == [1, 1, 3, 2]


_BATCHES_OF_BIG_TENSORS = """
import ctypes, resource, sys
sys.path.insert(0, ".")
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages only, so faults count pages
import torch
from pipelines.runtime.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def batch():  # a batch's activations: a block above glibc's largest mmap threshold (32 MiB), freed at its end
    return float(torch.ones(1 << 24)[-1])  # 64 MiB, every page written
for _ in range(3):
    batch()
faults = []
for _ in range(21):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    batch()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sorted(faults)[10])  # the median batch
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_stops_the_page_faults_of_each_batch():
    """What ``replicas.keep_freed_memory`` does in a replica: batch after batch of a big tensor, glibc by default
    returns the freed block to the kernel and faults it back in (a fault per 4 KiB page, every batch); kept,
    the next batch reuses it (the median batch faults no page)."""
    def faults(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", _BATCHES_OF_BIG_TENSORS, mode], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], float(out[1])

    (_, returned), (kept, reused) = faults("return"), faults("keep")
    assert kept == "True"
    assert returned >= 16_000, f"glibc kept the block without being told ({returned} faults a batch): nothing to show"
    assert reused < 100, (reused, returned)


def test_throughput_optimized_sets_ray_serve_env_for_the_local_ray(monkeypatch):
    from pipelines.serve.options import ray_serve_env

    drain = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
    monkeypatch.delenv(drain, raising=False)
    assert ray_serve_env(ServeConfig()) == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", drain: "1"}
    assert ray_serve_env(ServeConfig(throughput_optimized=False)) == {}
    # a cluster's pods need the switch, and keep Serve's drain for the load balancer in front of them
    assert ray_serve_env(ServeConfig(), local=False) == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    monkeypatch.setenv(drain, "20")  # the user's own value stays
    assert ray_serve_env(ServeConfig()) == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", drain: "20"}


def test_direct_ingress_urls_find_this_app_only(monkeypatch):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pipelines.serve.direct import direct_ingress_urls

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- http.server's name
            body = json.dumps({"status": "ok", "student": {"uri": "/exports/a"}}).encode()
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(port))
        assert direct_ingress_urls("127.0.0.1", "/exports/a", replicas=1, span=1) == [f"http://127.0.0.1:{port}/"]
        assert direct_ingress_urls("127.0.0.1", "/exports/b", replicas=1, span=1) == []  # another app's replica
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("overrides, message", [
    ({"port": 70000}, "port must be in 1..65535"),
    ({"dtype": "half"}, "dtype must be"),
    ({"teacher": "embedded", "teacher_steps": 0}, "teacher_steps must be >= 1"),
    ({"batch.max_batch_size": 0}, "batch.max_batch_size must be >= 1"),
    ({"replicas.min_replicas": 3, "replicas.max_replicas": 2}, "min_replicas <= max_replicas"),
    ({"replicas.torch_threads": -1}, "torch_threads must be >= 0"),
    ({"replicas.gil_switch_interval_s": 0}, r"gil_switch_interval_s must be in \[1e-6, 0.1\] seconds"),
    ({"limits.max_prompts": 0}, "max_prompts must be >= 1"),
])
def test_config_errors_name_the_key(overrides, message):
    from wadi_core.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=message):
        from_dict(ServeConfig, overrides)


def test_job_cli_prints_config_and_refuses_unknown_keys():
    run = subprocess.run([sys.executable, "jobs/serve.py", "--print-config", "teacher=embedded",
                          "batch.max_batch_size=8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "teacher: embedded" in run.stdout and "max_batch_size: 8" in run.stdout
    bad = subprocess.run([sys.executable, "jobs/serve.py", "batch.max_batchsize=8"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "max_batchsize" in bad.stderr


# ------------------------------------------------------------------------------- sampler (no Ray)
def test_sampler_same_seed_same_bytes_and_batch_independent(student_export):
    from pipelines.serve.sampler import Sampler

    sampler = Sampler(student_export)
    a = sampler.pngs(["a red circle"], [7])[0]
    assert sampler.pngs(["a red circle"], [7])[0] == a
    assert sampler.pngs(["a red circle"], [8])[0] != a
    batch = sampler.images(["a blue square", "a red circle"], [1, 7])
    # the noise is per prompt: batching changes at most float rounding (one grey level)
    assert np.abs(batch[1].astype(int) - _decode(a).astype(int)).max() <= 1
    assert sampler.device == "cpu" and sampler.dtype == torch.float32


# ------------------------------------------------------------------------------- the served app (Ray Serve)
@pytest.fixture(scope="module")
def served(student_export):
    """The app on a private local Ray at http://127.0.0.1:<free port>/ (batches of up to 8, 0.3 s window)."""
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    from pipelines.runtime.cluster import init_ray
    from pipelines.serve.app import build_app

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        student = ModelOptions(str(student_export), batch=BatchOptions(8, 0.3),
                               replicas=ReplicaOptions(num_cpus=0.5, gil_switch_interval_s=0.002))
        teacher = ModelOptions("embedded", steps=2, guidance=3.0, batch=BatchOptions(4, 0.01),
                               replicas=ReplicaOptions(num_cpus=0.5, torch_threads=2, keep_freed_memory=False))
        serve.run(build_app(student, teacher, RequestLimits(max_prompts=4)), name="wadi", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, body: bytes | dict, path: str = "/generate", **kw):
    import requests

    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return requests.post(url + path, data=data, headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                         timeout=120, **kw)


@pytest.mark.ray
@pytest.mark.slow
def test_healthz_and_page(served):
    import requests

    health = requests.get(served + "/healthz", timeout=60).json()
    assert health["status"] == "ok"
    assert health["student"]["steps"] == 1 and health["student"]["device"] == "cpu"
    assert health["teacher"]["steps"] == 2 and health["teacher"]["guidance"] == 3.0
    # each replica process runs with its own configured GIL switch interval (the teacher keeps the default)
    assert health["student"]["gil_switch_interval_s"] == pytest.approx(0.002)
    assert health["teacher"]["gil_switch_interval_s"] == pytest.approx(ReplicaOptions().gil_switch_interval_s)
    # torch's threads: from num_cpus (0.5 -> at least 1) unless torch_threads says otherwise
    assert (health["student"]["torch_threads"], health["teacher"]["torch_threads"]) == (1, 2)
    # glibc keeps freed memory in the student's process (the default), not in the teacher's (turned off)
    linux_glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    assert (health["student"]["keeps_freed_memory"], health["teacher"]["keeps_freed_memory"]) == (linux_glibc, False)
    page = requests.get(served + "/", timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="prompt"' in page.text and "/generate" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from outside


@pytest.mark.ray
@pytest.mark.slow
def test_generate_png_json_and_seed_determinism(served, student_export):
    from pipelines.serve.sampler import Sampler

    r = _post(served, {"prompt": "a red circle", "seed": 7})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert r.headers["x-model"] == "student" and r.headers["x-seed"] == "7"
    assert _decode(r.content).shape == (32, 32, 3)
    assert _post(served, {"prompt": "a red circle", "seed": 7}).content == r.content
    assert _post(served, {"prompt": "a red circle", "seed": 8}).content != r.content
    # what the replica serves is the export sampled in this process: the same bytes
    assert Sampler(student_export).pngs(["a red circle"], [7])[0] == r.content

    as_json = _post(served, {"prompt": "a red circle", "seed": 7}, headers={"Accept": "application/json"})
    assert as_json.headers["content-type"] == "application/json"
    assert base64.b64decode(as_json.json()["images"][0]["png_base64"]) == r.content
    fmt = _post(served, {"prompt": "a red circle", "seed": 7, "format": "base64"}).json()
    assert base64.b64decode(fmt["images"][0]["png_base64"]) == r.content

    many = _post(served, {"prompts": ["a red circle", "a blue square"], "seeds": [7, 9]})
    doc = many.json()
    assert many.status_code == 200 and doc["model"] == "student"
    assert [(i["prompt"], i["seed"]) for i in doc["images"]] == [("a red circle", 7), ("a blue square", 9)]
    first = _decode(base64.b64decode(doc["images"][0]["png_base64"]))
    assert np.abs(first.astype(int) - _decode(r.content).astype(int)).max() <= 1


@pytest.mark.ray
@pytest.mark.slow
def test_teacher_answers_beside_the_student(served):
    t = _post(served, {"prompt": "a red circle", "seed": 7}, params={"model": "teacher"})
    assert t.status_code == 200 and t.headers["x-model"] == "teacher", t.text
    s = _post(served, {"prompt": "a red circle", "seed": 7})
    assert _decode(t.content).shape == _decode(s.content).shape and t.content != s.content
    assert _post(served, {"prompt": "a red circle", "seed": 7}, params={"model": "teacher"}).content == t.content


@pytest.mark.ray
@pytest.mark.slow
def test_bad_inputs_get_4xx_json_and_the_replica_keeps_serving(served):
    import requests

    cases = [
        (b"{not json", {}, 400, "not valid JSON"),
        (b'{"prompt": "caf\xe9"}', {}, 400, "not UTF-8"),
        ({"prompt": "   "}, {}, 422, "prompt is empty"),
        ({"prompt": "x" * 100_000}, {}, 413, "the limit is 65536"),
        ({"prompts": ["a"] * 5}, {}, 413, "5 prompts in one request, the limit is 4"),
        ({"prompt": "a", "seed": 2**63}, {}, 422, r"\[0, 2\*\*63-1\]"),
        ({"prompt": "a", "seed": -1}, {}, 422, r"\[0, 2\*\*63-1\]"),
        ({"prompt": "a"}, {"params": {"model": "gpt"}}, 422, "model must be one of"),
    ]
    for body, kw, status, message in cases:
        r = _post(served, body, **kw)
        assert r.status_code == status, (message, r.status_code, r.text[:200])
        assert r.headers["content-type"] == "application/json"
        assert __import__("re").search(message, r.json()["error"]), r.json()
    # a body without Content-Length (chunked) is counted as it is read
    chunked = requests.post(served + "/generate", data=(b"x" * 8192 for _ in range(16)), timeout=60)
    assert chunked.status_code == 413 and "over the limit" in chunked.json()["error"]
    ok = _post(served, {"prompt": "a red circle", "seed": 1})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert requests.get(served + "/healthz", timeout=60).json()["status"] == "ok"


@pytest.mark.ray
@pytest.mark.slow
def test_concurrent_requests_are_batched_and_keep_their_seeds(served):
    prompts = [f"a red circle number {i}" for i in range(8)]
    alone = {i: _decode(_post(served, {"prompt": p, "seed": i}).content) for i, p in enumerate(prompts)}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _post(served, {"prompt": prompts[i], "seed": i}), range(8)))
    assert all(a.status_code == 200 for a in answers)
    sizes = [int(a.headers["x-batch-size"]) for a in answers]
    assert max(sizes) > 1, sizes        # the 0.3 s window gathered concurrent requests
    assert max(sizes) <= 8, sizes       # never above max_batch_size
    for i, a in enumerate(answers):     # each answer is its own prompt and seed, not a neighbour's
        assert np.abs(_decode(a.content).astype(int) - alone[i].astype(int)).max() <= 1


@pytest.mark.ray
@pytest.mark.slow
def test_load_test_phase_counts_what_it_sent(served):
    """benchmarks/bench_serve.py's phase against the served app: every request answered and timed, the latency
    order statistics ordered, a timeline row per answer; a dead URL's requests are counted as errors."""
    import asyncio
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).parents[1] / "benchmarks" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    r = asyncio.run(bench.run_phase([served], "student", prompts, 12, 4, max_seconds=120, timeout_s=60))
    assert (r.ok, r.errors, r.unsent, len(r.timeline)) == (12, 0, 0, 12)
    assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms <= r.max_ms
    assert 1 <= r.mean_batch <= 8 and r.images_per_s > 0
    assert all(0 <= t <= r.wall_s and lat > 0 and 1 <= b <= 8 for t, lat, b, *_ in r.timeline)
    # the server's side of each answer: its time in the handler and its batch's compute, both inside the latency
    assert all(0 < compute <= server <= lat and replica == 0 for _, lat, _, server, compute, replica in r.timeline)
    assert sys.platform != "linux" or 0 < r.machine_busy <= 1
    teacher = asyncio.run(bench.run_phase([served], "teacher", prompts, 2, 2, max_seconds=120, timeout_s=120))
    assert (teacher.ok, teacher.errors) == (2, 0)
    dead = asyncio.run(bench.run_phase([f"http://127.0.0.1:{_free_port()}"], "student", prompts, 3, 1,
                                       max_seconds=30, timeout_s=5))
    assert (dead.ok, dead.errors, dead.timeline) == (0, 3, []) and "ClientConnectorError" in dead.first_error


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_prints_the_url_and_stops_on_sigterm(student_export, tmp_path):
    import requests

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "jobs/serve.py", f"model={student_export}", f"port={port}",
                             "replicas.num_cpus=0.5"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "[serve] the same API straight from" in line:
                break
        assert any(f"[serve] open http://127.0.0.1:{port}/ (the page)" in ln for ln in lines), "".join(lines)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=60).json()["status"] == "ok"
        # throughput_optimized (the default): the replica also answers on its own loopback port, past the proxy
        direct = lines[-1].split("(the fast path): ", 1)[-1].split()
        assert direct and all(u.startswith("http://127.0.0.1:") for u in direct), "".join(lines)
        assert requests.get(direct[0] + "healthz", timeout=60).json()["student"]["uri"] == str(student_export)
        png = requests.post(direct[0] + "generate", json={"prompt": "a red circle", "seed": 3}, timeout=120)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "[serve] SIGTERM received: shutting the application down (serve.shutdown)" in out
    assert "[serve] stopped" in out
    # no 30 s direct-ingress drain on the job's own Ray (Serve then gives up waiting and says so)
    assert "failed to shut down" not in out, out
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
