"""Look at the serving page as a person would: open it in headless Chromium, type a prompt, save a screenshot.

    python jobs/serve.py model=runs/ray/wadi-embedded/export teacher=embedded &      # prints its URL
    python scripts/serve_screenshot.py --url http://127.0.0.1:8000/ --out docs/images/serve/page.png

Types the prompt key by key (the page redraws after each pause in typing), waits until the student's image
(and the teacher's, when served) has arrived, prints the times the page shows and saves the PNG. Exits 1
when no image arrived or the page showed an error. Chromium is driven by ``scripts/mlflow_screenshots.py``'s
DevTools helper (Debian's ``chromium`` package); loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlflow_screenshots import capture, find_chromium  # scripts/ is not a package

STATE_JS = """JSON.stringify({
  served: document.getElementById('served').textContent,
  student: document.getElementById('student-img').naturalWidth,
  teacher: document.getElementById('teacher-img').naturalWidth,
  teacherShown: !document.getElementById('teacher-panel').classList.contains('hidden'),
  studentTime: document.getElementById('student-time').textContent.trim(),
  teacherTime: document.getElementById('teacher-time').textContent.trim(),
  error: document.getElementById('error').textContent})"""


async def _state(call) -> dict:
    result = await call("Runtime.evaluate", expression=STATE_JS, returnByValue=True)
    return json.loads(result["result"]["value"])


def typist(prompt: str, key_delay_s: float, timeout_s: float, seen: dict):
    """``on_page`` for ``capture``: wait for the page, type ``prompt``, wait for the images; fills ``seen``."""

    async def on_page(call, _url: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (await _state(call))["served"]:  # /healthz answered: the page knows whether there is a teacher
            if loop.time() > deadline:
                raise SystemExit("the page never showed what it serves (GET /healthz failed?)")
            await asyncio.sleep(0.2)
        await call("Runtime.evaluate", expression="document.getElementById('prompt').focus()")
        for ch in prompt:
            await call("Input.insertText", text=ch)  # an input event per key, as typing does
            await asyncio.sleep(key_delay_s)
        while True:
            state = await _state(call)
            done = state["student"] > 0 and (not state["teacherShown"] or state["teacher"] > 0)
            if done or state["error"] or loop.time() > deadline:
                break
            await asyncio.sleep(0.2)
        seen.update(state)

    return on_page


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000/", help="the page (what jobs/serve.py printed)")
    ap.add_argument("--prompt", default="a large yellow triangle at the top",
                    help="the embedded domain draws one shape: size, colour, shape, position")
    ap.add_argument("--out", type=Path, default=Path("docs/images/serve/page.png"))
    ap.add_argument("--size", default="1000,720", help="window width,height")
    ap.add_argument("--key-delay-s", type=float, default=0.06, help="pause between keys")
    ap.add_argument("--timeout-s", type=float, default=120.0)
    args = ap.parse_args(argv)
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--url must be on loopback, got {args.url}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    seen: dict = {}
    width, height = (int(v) for v in args.size.split(","))
    asyncio.run(capture(find_chromium(), [(args.url, args.out)], (width, height), 0.5,
                         on_page=typist(args.prompt, args.key_delay_s, args.timeout_s, seen)))
    print(f"typed    {args.prompt!r}\nserved   {seen.get('served')}\nstudent  {seen.get('studentTime')}")
    if seen.get("teacherShown"):
        print(f"teacher  {seen.get('teacherTime')}")
    print(f"saved    {args.out}")
    if seen.get("error") or not seen.get("student"):
        print(f"no student image on the page: {seen.get('error') or 'timed out'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
