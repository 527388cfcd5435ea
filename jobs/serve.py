"""Serve the one-step student over HTTP with Ray Serve: an API, a page that draws as you type, an optional teacher.

    # the student README command 1 registered (runs/mlflow.db under the current folder), on 127.0.0.1:8000
    python jobs/serve.py
    # an export folder, with the embedded teacher beside it (25 steps, CFG 3) and a larger batch window
    python jobs/serve.py model=runs/ray/wadi-embedded/export teacher=embedded batch.batch_wait_timeout_s=0.02
    # from S3, two replicas of 1 GPU each (float16), autoscaling up to 4
    python jobs/serve.py model=s3://bucket/export replicas.num_gpus=1 replicas.autoscaling=true replicas.max_replicas=4
    python jobs/serve.py --print-config          # every key

Open the printed URL for the page; ``POST /generate`` takes ``{"prompt": "...", "seed": 0}`` (PNG back) or
``{"prompts": [...], "seeds": [...]}`` (JSON with base64 PNGs); ``GET /healthz``. Runs until Ctrl-C or
SIGTERM, then shuts the application down (``serve.shutdown``). With ``throughput_optimized`` (the default) it
also prints the student replicas' own loopback URLs (Serve's direct ingress, no proxy hop: the fast path on a
small machine). docs/SERVING.md has the details.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from wadi_core.redact import redact

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.runtime.cluster import init_ray
from pipelines.serve.options import ServeConfig, ray_serve_env


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    """The job's config from the command line (``--config``, dotted overrides, ``--print-config``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    return config_from_args(ServeConfig, p.parse_intermixed_args(argv))


def _tracking_uri(cfg: ServeConfig) -> str | None:
    """Absolute tracking URI for MLflow model URIs, resolved here (the replicas' working folder may differ)."""
    uris = [cfg.model] + ([cfg.teacher] if cfg.teacher else [])
    if not any(u.startswith(("models:/", "runs:/")) for u in uris):
        return cfg.tracking_uri
    from pipelines.evaluate.runs import resolve_tracking_uri  # noqa: PLC0415 -- torch: only for MLflow model URIs

    return resolve_tracking_uri(cfg.tracking_uri)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    # Ray Serve, FastAPI and torch load once the config is checked: --help and --print-config stay fast.
    from ray import serve  # noqa: PLC0415 -- see above

    from pipelines.evaluate.metrics import env_for_workers  # noqa: PLC0415 -- see above
    from pipelines.serve.app import build_app  # noqa: PLC0415 -- see above

    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    # a local Ray of its own unless RAY_ADDRESS names a cluster; replicas get the S3 / MLflow environment, and
    # Serve's own settings reach the controller and proxy too through the environment the local Ray inherits
    serve_env = ray_serve_env(cfg, local=not os.environ.get("RAY_ADDRESS"))
    if serve_env and os.environ.get("RAY_ADDRESS"):
        print(f"[serve] RAY_ADDRESS is set: {', '.join(serve_env)} must be in the cluster's own environment "
              "(infra/kuberay/rayservice-student.yaml sets it); not set from here", flush=True)
    else:
        os.environ.update(serve_env)
    own_ray = init_ray(runtime_env={"env_vars": env_for_workers()}, include_dashboard=False)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        app = build_app(cfg.student_options(), cfg.teacher_options(), cfg.limits, _tracking_uri(cfg))
        print(redact(f"[serve] loading {cfg.model}" + (f" and the teacher {cfg.teacher}" if cfg.teacher else "")
                     + " (the first start takes a while)"), flush=True)
        serve.run(app, name="wadi", route_prefix="/")
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        url = f"http://{host}:{cfg.port}/"
        print(f"[serve] open {url} (the page); POST {url}generate, GET {url}healthz; Ctrl-C or SIGTERM stops it",
              flush=True)
        if serve_env and own_ray:
            from pipelines.serve.direct import direct_ingress_urls  # noqa: PLC0415 -- see above

            direct = direct_ingress_urls(host, cfg.model, cfg.replicas.num_replicas)
            if direct:
                print(f"[serve] the same API straight from the student replica(s), no proxy hop (the fast path): "
                      f"{' '.join(direct)}", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after serve.run: Ctrl-C while loading still interrupts it
            signal.signal(sig, on_signal)
        while not stop.wait(timeout=1.0):
            pass
        what = "serve.shutdown" if own_ray else "serve.delete, the cluster's other applications keep running"
        print(f"[serve] {received[0]} received: shutting the application down ({what})", flush=True)
    finally:
        import ray  # noqa: PLC0415 -- already loaded by serve above

        if own_ray:
            serve.shutdown()
            ray.shutdown()
        else:  # a shared cluster: remove this application only
            serve.delete("wadi")
    print("[serve] stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
