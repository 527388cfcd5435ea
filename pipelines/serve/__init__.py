"""Serve an exported one-step student (and optionally its teacher) over HTTP with Ray Serve.

``validation`` reads and checks request bodies (no Ray: unit-testable), ``sampler`` turns prompts
and seeds into PNG bytes with a diffusers pipeline (no Ray), ``app`` holds the Ray Serve
deployments, the HTTP routes and the draw-as-you-type page (``page.html``). The entry point is
``jobs/serve.py``; the load test ``benchmarks/bench_serve.py``; docs/SERVING.md says how to use it.
"""
