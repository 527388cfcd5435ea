"""The Ray Serve application: the student deployment (HTTP ingress, batched sampling) and an optional teacher.

    POST /generate            {"prompt": "a red circle", "seed": 7}            -> image/png
    POST /generate            {"prompts": ["a", "b"], "seeds": [1, 2]}         -> JSON, base64 PNGs
    POST /generate?model=teacher ...                                          -> the teacher's answer
    GET  /healthz, GET /       (the draw-as-you-type page)

The student replica is the ingress, so a student request costs one hop (proxy -> replica); requests are
batched per replica by ``@serve.batch``, whose size and wait come from the config. The teacher, when
served, is a second deployment called through its handle with the same batching.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at decoration time
# (through Serve's ingress wrapper), and a string "Request" makes it a required query parameter.
import asyncio
import base64
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from wadi_core.config import from_dict

from pipelines.runtime.memory import keep_freed_memory
from pipelines.serve.options import ModelOptions, ServeConfig, deployment_options
from pipelines.serve.validation import BadRequest, RequestLimits, check_body_size, parse_generate_request, wants_json

__all__ = ["build_app", "app_builder", "StudentServer", "TeacherModel", "PAGE"]

PAGE = Path(__file__).with_name("page.html")
http = FastAPI(title="WaDi one-step student", docs_url=None, redoc_url=None)


def _load_sampler(model: ModelOptions, tracking_uri: str | None) -> Any:
    """Resolve the URI on this replica's node (MLflow, s3:// and folders alike) and load the pipeline."""
    import torch  # noqa: PLC0415 -- the model stack loads in the replica, not where the app is built

    from pipelines.evaluate.generation import resolve_model_dir  # noqa: PLC0415 -- the same: torch
    from pipelines.serve.sampler import Sampler  # noqa: PLC0415 -- the same: torch, diffusers

    if tracking_uri and model.uri.startswith(("models:/", "runs:/")):
        import mlflow  # noqa: PLC0415 -- MLflow only for models:/ and runs:/ URIs

        mlflow.set_tracking_uri(tracking_uri)
    if not torch.cuda.is_available():  # Ray gives a CPU actor OMP_NUM_THREADS from num_cpus; torch reads it once
        torch.set_num_threads(model.replicas.cpu_threads)
    return Sampler(resolve_model_dir(model.uri), model.steps, model.guidance, model.dtype)


class _BatchedModel:
    """Loads one model and samples single (prompt, seed) calls in batches, off the replica's event loop."""

    def _setup(self, model: ModelOptions, tracking_uri: str | None) -> None:
        self.options = model
        # before the model loads: its weights and every batch after them come from a heap that is kept
        self.keeps_freed_memory = model.replicas.keep_freed_memory and keep_freed_memory()
        self.sampler = _load_sampler(model, tracking_uri)
        # the replica's process is this deployment's alone: the sampler thread hands the GIL back sooner, so the
        # event loop takes in the requests of the next batch while this one is sampled
        sys.setswitchinterval(model.replicas.gil_switch_interval_s)
        # one thread: batches run one after the other (torch already uses the replica's cores), while the
        # event loop keeps accepting the requests that form the next batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self.generate_batch.set_max_batch_size(model.batch.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(model.batch.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def generate_batch(self, prompts: list[str], seeds: list[int]) -> list[dict[str, Any]]:
        """One PNG per (prompt, seed); each answer also says how large its batch was and how long it took."""
        start = time.perf_counter()
        pngs = await asyncio.get_running_loop().run_in_executor(self._executor, self.sampler.pngs, prompts, seeds)
        compute_ms = (time.perf_counter() - start) * 1000
        return [{"png": png, "batch_size": len(prompts), "compute_ms": compute_ms} for png in pngs]

    def describe(self) -> dict[str, Any]:
        """What this replica serves, for ``/healthz``."""
        return {"uri": self.options.uri, "steps": self.options.steps, "guidance": self.options.guidance,
                "device": self.sampler.device, "dtype": str(self.sampler.dtype).removeprefix("torch."),
                "torch_threads": self.sampler.threads,
                "gil_switch_interval_s": sys.getswitchinterval(), "keeps_freed_memory": self.keeps_freed_memory}


@serve.deployment(name="teacher")
class TeacherModel(_BatchedModel):
    """The multi-step teacher, for side-by-side answers; called by the student's ingress through its handle."""

    def __init__(self, model: ModelOptions, tracking_uri: str | None = None):
        self._setup(model, tracking_uri)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


@serve.deployment(name="student")
@serve.ingress(http)
class StudentServer(_BatchedModel):
    """The one-step student and the HTTP routes; ``teacher`` is the teacher deployment's handle or None."""

    def __init__(self, model: ModelOptions, tracking_uri: str | None = None, limits: RequestLimits | None = None,
                 teacher: DeploymentHandle | None = None):
        self._setup(model, tracking_uri)
        self.limits = limits or RequestLimits()
        self.teacher = teacher
        self.page = PAGE.read_text(encoding="utf-8")

    @http.get("/", response_class=HTMLResponse)
    async def page_html(self) -> HTMLResponse:
        """The draw-as-you-type page."""
        return HTMLResponse(self.page)

    @http.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness and what is served (the page reads whether there is a teacher from here)."""
        teacher = await self.teacher.describe.remote() if self.teacher is not None else None
        return {"status": "ok", "student": self.describe(), "teacher": teacher, "limits": asdict(self.limits)}

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit (a chunked upload has no Content-Length)."""
        check_body_size(request.headers.get("content-length"), self.limits)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise BadRequest(413, f"request body is over the limit of {self.limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @http.post("/generate")
    async def generate(self, request: Request) -> Response:
        """Images for one prompt or a list; PNG for one unless JSON is asked for (Accept or "format": "base64")."""
        start = time.perf_counter()
        try:
            req = parse_generate_request(await self._read_body(request), model=request.query_params.get("model"),
                                         limits=self.limits)
        except BadRequest as e:
            return _error(e.status, e.message)
        if req.model == "teacher" and self.teacher is None:
            return _error(404, "no teacher is served: start jobs/serve.py with teacher.uri=embedded (or a folder)")
        if req.model == "teacher":
            calls = [self.teacher.generate_batch.remote(p, s) for p, s in zip(req.prompts, req.seeds)]
        else:
            calls = [self.generate_batch(p, s) for p, s in zip(req.prompts, req.seeds)]
        try:
            results = await asyncio.gather(*calls)
        except Exception as e:  # a real fault of the model (out of memory, a broken file): say which, keep serving
            return _error(500, f"{req.model} failed to generate: {type(e).__name__}: {str(e)[:300]}")
        latency_ms = (time.perf_counter() - start) * 1000
        headers = {"X-Model": req.model, "X-Latency-Ms": f"{latency_ms:.1f}",
                   "X-Batch-Size": str(max(r["batch_size"] for r in results)),
                   "X-Compute-Ms": f"{max(r['compute_ms'] for r in results):.1f}"}
        if not req.many and not req.base64 and not wants_json(request.headers.get("accept")):
            return Response(results[0]["png"], media_type="image/png", headers={**headers, "X-Seed": str(req.seeds[0])})
        return JSONResponse({
            "model": req.model, "latency_ms": round(latency_ms, 1),
            "images": [{"prompt": p, "seed": s, "batch_size": r["batch_size"], "compute_ms": round(r["compute_ms"], 1),
                        "png_base64": base64.b64encode(r["png"]).decode("ascii")}
                       for p, s, r in zip(req.prompts, req.seeds, results)],
        }, headers=headers)


def build_app(student: ModelOptions, teacher: ModelOptions | None = None, limits: RequestLimits | None = None,
              tracking_uri: str | None = None) -> serve.Application:
    """The bound application: ``serve.run(build_app(...))``; ``tracking_uri`` resolves ``models:/`` URIs."""
    teacher_handle = None
    if teacher is not None:
        teacher_handle = TeacherModel.options(**deployment_options(teacher)).bind(teacher, tracking_uri)
    # the ingress holds HTTP requests too (page, healthz, teacher calls in flight): room beyond its own batches
    ingress = StudentServer.options(**deployment_options(student, max_ongoing_extra=64))
    return ingress.bind(student, tracking_uri, limits or RequestLimits(), teacher_handle)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Ray Serve's application builder (``serve run pipelines.serve.app:app_builder model=...``, a RayService's
    ``serveConfigV2`` ``import_path``): ``args`` are ``ServeConfig`` keys, nested or dotted; host and port
    are Serve's ``http_options`` there, not these. ``models:/`` URIs use the replicas' MLFLOW_TRACKING_URI."""
    cfg = from_dict(ServeConfig, dict(args))
    return build_app(cfg.student_options(), cfg.teacher_options(), cfg.limits, cfg.tracking_uri)
