"""Look at a training run in the MLflow UI as a person would: start ``mlflow ui`` on 127.0.0.1,
open the run's pages in headless Chromium (Debian's ``chromium`` package) and save screenshots.

    python scripts/mlflow_screenshots.py --tracking-uri sqlite:///$PWD/runs/mlflow.db --out docs/images/mlflow

Pages: the run (overview), its model metrics charts, its artifacts (sample grids, the labelled
teacher | student grid), and the registered model version when there is one. The newest run of
``--experiment`` is used unless ``--run-id`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["find_chromium", "capture", "pages"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_chromium() -> str:
    """The path of a Chromium binary (Debian's ``chromium`` first); exits saying what to install when none is found."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: apt-get install chromium (Debian's package)")


def pages(tracking_uri: str, experiment: str, run_id: str | None) -> dict[str, str]:
    """``{name: URL fragment}`` of what to look at for the run."""
    import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import

    client = mlflow.MlflowClient(tracking_uri)
    if run_id is None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise SystemExit(f"no experiment {experiment!r} in {tracking_uri}")
        runs = client.search_runs([exp.experiment_id], "tags.`wadi.run_name` != ''",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise SystemExit(f"no training run in experiment {experiment!r}")
        run = runs[0]
    else:
        run = client.get_run(run_id)
    base = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    ml = "?workflowType=machine_learning"  # MLflow 3 opens on its GenAI view otherwise
    out = {"run": f"{base}{ml}", "run_metrics": f"{base}/model-metrics{ml}",
           "run_grid": f"{base}/artifacts/final_eval/teacher_vs_student.png{ml}"}
    registered = run.data.tags.get("wadi.registered_model")  # "<name>/<version>"
    if registered:
        name, version = registered.rsplit("/", 1)
        out["model_version"] = f"#/models/{name}/versions/{version}{ml}"
    return out


async def capture(chromium: str, shots: list[tuple[str, Path]], size: tuple[int, int], wait_s: float,
                   on_page: Any = None) -> None:
    """Each URL in one headless Chromium over the DevTools protocol: navigate, wait ``wait_s`` of
    real time (the UI fetches and draws its charts lazily), capture a PNG. ``on_page(call, url)``, when
    given, runs after each navigation with the DevTools ``call`` (scripts/serve_screenshot.py types there)."""
    import aiohttp  # noqa: PLC0415 -- aiohttp (a dev dependency) only when a screenshot is taken

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="wadi-chromium-") as profile:
        browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                    f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                                    f"--window-size={size[0]},{size[1]}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(100):
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                            page = next(t for t in await r.json() if t["type"] == "page")
                        break
                    except (aiohttp.ClientError, StopIteration):
                        await asyncio.sleep(0.2)
                else:
                    raise SystemExit("headless Chromium did not start")
                async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    ids = iter(range(1, 1_000_000))

                    async def call(method: str, **params: object) -> dict:
                        i = next(ids)
                        await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
                        while True:
                            msg = json.loads((await ws.receive()).data)
                            if msg.get("id") == i:
                                return msg.get("result", {})

                    await call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                               deviceScaleFactor=1, mobile=False)
                    for url, path in shots:
                        await call("Page.navigate", url=url)
                        if on_page is not None:
                            await on_page(call, url)
                        await asyncio.sleep(wait_s)
                        data = await call("Page.captureScreenshot", format="png")
                        path.write_bytes(base64.b64decode(data["data"]))
        finally:
            browser.terminate()
            browser.wait(timeout=20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", required=True, help="sqlite:///... (what jobs/distill.py printed)")
    ap.add_argument("--experiment", default="wadi-embedded")
    ap.add_argument("--run-id")
    ap.add_argument("--out", default="docs/images/mlflow")
    ap.add_argument("--size", default="1440,1000", help="window width,height")
    ap.add_argument("--wait-s", type=float, default=15.0,
                    help="seconds each page gets to fetch and draw (8 left a cold UI still loading, 2026-12-07)")
    args = ap.parse_args(argv)

    targets = pages(args.tracking_uri, args.experiment, args.run_id)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("mlflow ui did not come up") from None
                time.sleep(0.5)
        shots = [(f"http://127.0.0.1:{port}/{fragment}", out / f"{name}.png") for name, fragment in targets.items()]
        width, height = (int(v) for v in args.size.split(","))
        asyncio.run(capture(find_chromium(), shots, (width, height), args.wait_s))
        for url, path in shots:
            print(f"{path.stem:<15} {url} -> {path}")
    finally:
        server.terminate()
        server.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
