"""Prompt throughput through Ray Data: local shards and S3 (moto server on 127.0.0.1).

Target (the project's): 1.4 M prompts (JourneyDB-sized) from S3 in <= 20 s through the 2-way
split on an idle 2-core machine; the S3 / local ratio of the same run says what object storage
costs on top of the parse. The 2-way split is the trainer's (``pipelines.data.prompts.exact_split`` with
``preserve_order``), read by 2 consumer tasks. Before the S3 pass, a per-shard profile on the
driver (no Ray): S3 requests per shard (counted in moto's request log), read and parse seconds.
Writes the benchmark shards into a temporary folder (never committed) unless ``--data`` points at
existing ones. Results: docs/RESULTS.md.

    python benchmarks/bench_prompt_throughput.py --baseline-shards 0  # 1.4 M prompts, local + S3
    python benchmarks/bench_prompt_throughput.py --prompts 200000 --no-s3
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from pipelines.data.prompts import exact_split, list_shards, prompt_dataset, read_shard  # noqa: E402
from pipelines.runtime.cluster import init_ray  # noqa: E402
from wadi_core.prompts.shards import parse_prompt_tar, prompt_shard_bytes  # noqa: E402

#: The project's goal: 1.4 M prompts from S3 in 20 s (2-way split, idle 2-core machine).
TARGET_PROMPTS, TARGET_S = 1_400_000, 20.0

WORDS = (
    "a photo of an old lighthouse on a cliff at sunset with dramatic clouds cinematic lighting "
    "portrait of a woman in a red coat standing in the rain neon city street reflections detailed "
    "oil painting of a quiet harbour boats morning mist soft colours watercolor illustration fox "
    "forest autumn leaves golden hour wide angle ultra detailed octane render fantasy castle"
).split()


def make_shards(root: Path, n_prompts: int, shard_size: int, seed: int = 0) -> int:
    """JourneyDB-like shards: ~200-char caption + ~300-char meta per sample."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    n_shards = (n_prompts + shard_size - 1) // shard_size
    for s in tqdm(range(n_shards), desc="writing shards", unit="shard"):
        lo, hi = s * shard_size, min(n_prompts, (s + 1) * shard_size)
        samples = []
        for i in range(lo, hi):
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 45)))
            meta = {"img_path": f"./{i // 10000:03d}/{i:08d}.jpg", "prompt": caption + " --ar 16:9 --v 5",
                    "style": ["cinematic"], "source": "bench"}
            samples.append((f"{i:09d}", caption, meta))
        (root / f"prompts-{s:05d}.tar").write_bytes(prompt_shard_bytes(samples))
    (root / "manifest.json").write_text(json.dumps({"num_prompts": n_prompts, "num_shards": n_shards}))
    return n_shards


def time_driver(ds_factory, label: str) -> dict:
    """Iterate the whole dataset on the driver; prompts/s over good captions."""
    t0 = time.perf_counter()
    ds = ds_factory()
    n = 0
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        n += table.num_rows
    dt = time.perf_counter() - t0
    row = {"path": label, "prompts": n, "seconds": round(dt, 2), "prompts_per_s": round(n / dt)}
    print(json.dumps(row), flush=True)
    return row


def time_split(ds_factory, label: str, n_consumers: int = 2) -> dict:
    """Like the train path: ``exact_split`` (``streaming_split(n, equal=False)``, preserve_order)
    read by ``n`` consumer tasks."""
    import ray  # noqa: PLC0415 -- Ray only on the cluster path
    from ray.train import DataConfig  # noqa: PLC0415 -- Ray only on the cluster path

    @ray.remote(num_cpus=0.1)
    def consume(it) -> int:
        rows = 0
        for table in it.iter_batches(batch_size=1024, batch_format="pyarrow"):
            rows += table.num_rows
        return rows

    t0 = time.perf_counter()
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # as pipelines.run._trainer
    splits = [s["p"] for s in exact_split(ingest).configure({"p": ds_factory()}, n_consumers, None, None)]
    n = sum(ray.get([consume.remote(s) for s in splits]))
    dt = time.perf_counter() - t0
    row = {"path": label, "prompts": n, "seconds": round(dt, 2), "prompts_per_s": round(n / dt)}
    print(json.dumps(row), flush=True)
    return row


def wait_idle(below: float, timeout_s: float = 600.0) -> float:
    """Wait until the 1-minute load average is below ``below`` (0: no wait); the load then."""
    deadline = time.time() + timeout_s
    while below and os.getloadavg()[0] >= below and time.time() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def moto_requests(log: Path) -> collections.Counter:
    """Requests by method so far, from the moto server's request log."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
    return collections.Counter(m.group(1) for m in re.finditer(r'"(GET|HEAD|PUT|POST|DELETE) ', text))


def profile_shards(uri: str, n: int, log: Path | None = None) -> dict:
    """Per-shard cost on the driver (no Ray): read (``pipelines.data.prompts.read_shard``, with its
    retries) and parse seconds, and S3 requests per shard when ``log`` is moto's request log."""
    fs, paths = list_shards(uri)
    paths = paths[:n]
    before = moto_requests(log) if log else collections.Counter()
    read_s = parse_s = 0.0
    for path in paths:
        t0 = time.perf_counter()
        raw = read_shard(fs, path)
        t1 = time.perf_counter()
        parse_prompt_tar(raw or b"")
        read_s, parse_s = read_s + t1 - t0, parse_s + time.perf_counter() - t1
    row = {"profile": uri, "shards": len(paths), "read_s_per_shard": round(read_s / len(paths), 3),
           "parse_s_per_shard": round(parse_s / len(paths), 3)}
    if log:
        time.sleep(0.2)  # the server's log line follows its answer
        row["requests_per_shard"] = {k: round(v / len(paths), 1) for k, v in (moto_requests(log) - before).items()}
    print(json.dumps(row), flush=True)
    return row


def start_moto(log: Path | None = None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=out, stderr=out)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=1_400_000)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--data", help="existing shard folder (skip writing)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--baseline-shards", type=int, default=10,
                    help="shards read with ray.data.read_webdataset for comparison (0 = skip)")
    ap.add_argument("--profile-shards", type=int, default=5, help="shards of the per-shard profile (0 = skip)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="LOAD",
                    help="before each timed pass, wait (up to 10 min) for the 1-minute load to drop below LOAD "
                         "(a shared machine; 0 = do not wait)")
    args = ap.parse_args()

    import ray  # noqa: PLC0415 -- Ray only on the cluster path

    tmp = tempfile.TemporaryDirectory(prefix="wadi-bench-")
    root = Path(args.data) if args.data else Path(tmp.name) / "shards"
    if not args.data:
        make_shards(root, args.prompts, args.shard_size)
    shards = sorted(root.glob("*.tar"))
    size_gb = sum(p.stat().st_size for p in shards) / 1e9
    print(f"{len(shards)} shards, {size_gb:.2f} GB of tar in {root}", flush=True)

    proc = moto_log = None
    profiles = []
    if args.profile_shards:
        profiles.append(profile_shards(str(root), args.profile_shards))
    if not args.no_s3:  # upload before Ray starts: its workers inherit the AWS_* environment
        import boto3  # noqa: PLC0415 -- the AWS SDK only for s3:// paths

        moto_log = Path(tmp.name) / "moto.log"
        proc, endpoint = start_moto(moto_log)
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="prompts")
        t0 = time.perf_counter()
        for p in tqdm(shards, desc="uploading to moto", unit="shard"):
            s3.upload_file(str(p), "prompts", f"lake/{p.name}")
        print(f"upload: {time.perf_counter() - t0:.1f} s", flush=True)
        if args.profile_shards:
            profiles.append(profile_shards("s3://prompts/lake", args.profile_shards, moto_log))

    init_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext  # noqa: PLC0415 -- Ray only on the cluster path

    DataContext.get_current().enable_progress_bars = False
    # Warm-up (untimed): start the worker processes, so the first timed pass does not pay for them.
    ray.data.range(8, override_num_blocks=8).map_batches(lambda b: b, batch_format="pyarrow").materialize()
    local, remote = str(root), "s3://prompts/lake"
    passes = [(time_driver, local, 0, "local, fast tar parser, driver")]
    passes += [] if args.no_s3 else [(time_driver, remote, 0, "s3 (moto), fast tar parser, driver")]
    passes += [(time_split, local, 1, "local, fast tar parser, 2-way split")]
    passes += [] if args.no_s3 else [(time_split, remote, 1, "s3 (moto), fast tar parser, 2-way split")]
    results = []
    try:
        s3_before = moto_requests(moto_log) if moto_log else None
        for timer, uri, seed, label in passes:  # local and S3 side by side: the ratio sees the same load
            load = wait_idle(args.wait_idle)
            row = timer(lambda uri=uri, seed=seed: prompt_dataset(uri, seed=seed), label)
            row["load_1min_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
            results.append(row)
        if moto_log:
            time.sleep(0.5)
            requests = moto_requests(moto_log) - s3_before
            print(f"S3 requests of the two Ray passes ({2 * len(shards)} shard reads): {dict(requests)}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
    if args.baseline_shards:
        sub = [str(p) for p in shards[: args.baseline_shards]]
        results.append(time_driver(lambda: ray.data.read_webdataset(sub, suffixes=["txt"]),
                                   f"local, read_webdataset baseline ({len(sub)} shards)"))
    rate = TARGET_PROMPTS / TARGET_S
    print(f"\nsummary (prompts/s; the project's target: {TARGET_PROMPTS / 1e6:.1f} M prompts from S3 in "
          f"{TARGET_S:.0f} s through the 2-way split = {rate / 1e3:.0f}k/s, idle machine):")
    for r in results:
        eta = TARGET_PROMPTS / max(r["prompts_per_s"], 1)
        load = r.get("load_1min_before_after")
        print(f"  {r['path']:<48} {r['prompts_per_s']:>9,d}/s   1.4M in {eta:5.1f} s"
              + (f"   (1-min load {load[0]:.1f} -> {load[1]:.1f})" if load else ""))
    by = {r["path"]: r for r in results}
    verdict = {}
    for mode in ("driver", "2-way split"):
        local, s3 = by.get(f"local, fast tar parser, {mode}"), by.get(f"s3 (moto), fast tar parser, {mode}")
        if local and s3:
            ratio = local["prompts_per_s"] / max(s3["prompts_per_s"], 1)
            verdict[mode] = {"s3_over_local_time": round(ratio, 2),
                             "s3_1.4M_s": round(TARGET_PROMPTS / max(s3["prompts_per_s"], 1), 1)}
            print(f"  S3 / local time ({mode}, same run): {ratio:.2f}x")
    split = verdict.get("2-way split")
    if split:
        ok = split["s3_1.4M_s"] <= TARGET_S
        print(f"  target: 1.4M from S3 (2-way split) in {split['s3_1.4M_s']:.1f} s vs {TARGET_S:.0f} s: "
              f"{'MET' if ok else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "profiles": profiles, "verdict": verdict},
                                              indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
