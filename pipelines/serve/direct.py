"""Where the student replicas answer HTTP themselves (Ray Serve's direct ingress), found by asking their ``/healthz``.

With ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` each ingress replica also serves the application on its own port,
allocated from ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT`` (30000) upwards on the proxy's host. A request sent
there skips the Serve proxy, the hop that lets requests reach the replica only one or two at a time on a
small CPU machine (docs/SERVING.md, "Load test").
"""

from __future__ import annotations

import json
import os
import urllib.request

__all__ = ["direct_ingress_urls"]

DEFAULT_FIRST_PORT = 30000


def _serves(url: str, uri: str, timeout_s: float) -> bool:
    """Whether ``url`` answers ``/healthz`` as this application serving ``uri`` (not another one on the machine)."""
    try:
        with urllib.request.urlopen(url + "healthz", timeout=timeout_s) as r:
            return (json.loads(r.read()).get("student") or {}).get("uri") == uri
    except (OSError, ValueError, AttributeError):
        return False


def direct_ingress_urls(host: str, uri: str, replicas: int, span: int = 64, timeout_s: float = 2.0) -> list[str]:
    """``http://host:port/`` of up to ``replicas`` replicas serving ``uri`` on their own ports, [] if none."""
    first = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", DEFAULT_FIRST_PORT))
    urls: list[str] = []
    for port in range(first, first + span):
        url = f"http://{host}:{port}/"
        if _serves(url, uri, timeout_s):
            urls.append(url)
            if len(urls) == replicas:
                break
    return urls
