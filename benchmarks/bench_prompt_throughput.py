"""Prompt throughput through Ray Data: local shards and S3 (moto server on 127.0.0.1).

Target: 1.4 M prompts (JourneyDB-sized) in <= 60 s on a 2-core machine. Writes the benchmark
shards into a temporary folder (never committed) unless ``--data`` points at existing ones.

    python benchmarks/bench_prompt_throughput.py                      # 1.4 M prompts, local + S3
    python benchmarks/bench_prompt_throughput.py --prompts 200000 --no-s3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from pipelines.cluster import init_ray  # noqa: E402
from pipelines.data import prompt_dataset  # noqa: E402
from pipelines.tarshards import write_prompt_shard  # noqa: E402

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
        write_prompt_shard(root / f"prompts-{s:05d}.tar", samples)
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
    """Like the train path: ``streaming_split(n, equal=True)`` read by ``n`` consumer actors."""
    import ray

    @ray.remote(num_cpus=0.1)
    def consume(it) -> int:
        rows = 0
        for table in it.iter_batches(batch_size=1024, batch_format="pyarrow"):
            rows += table.num_rows
        return rows

    t0 = time.perf_counter()
    splits = ds_factory().streaming_split(n_consumers, equal=True)
    n = sum(ray.get([consume.remote(s) for s in splits]))
    dt = time.perf_counter() - t0
    row = {"path": label, "prompts": n, "seconds": round(dt, 2), "prompts_per_s": round(n / dt)}
    print(json.dumps(row), flush=True)
    return row


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    args = ap.parse_args()

    import ray

    tmp = tempfile.TemporaryDirectory(prefix="wadi-bench-")
    root = Path(args.data) if args.data else Path(tmp.name) / "shards"
    if not args.data:
        make_shards(root, args.prompts, args.shard_size)
    shards = sorted(root.glob("*.tar"))
    size_gb = sum(p.stat().st_size for p in shards) / 1e9
    print(f"{len(shards)} shards, {size_gb:.2f} GB of tar in {root}", flush=True)

    init_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    results = []
    results.append(time_driver(lambda: prompt_dataset(str(root), seed=0), "local, fast tar parser, driver"))
    results.append(time_split(lambda: prompt_dataset(str(root), seed=1), "local, fast tar parser, 2-way split"))
    if args.baseline_shards:
        sub = [str(p) for p in shards[: args.baseline_shards]]
        results.append(time_driver(lambda: ray.data.read_webdataset(sub, suffixes=["txt"]),
                                   f"local, read_webdataset baseline ({len(sub)} shards)"))

    if not args.no_s3:
        import boto3

        proc, endpoint = start_moto()
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        try:
            s3 = boto3.client("s3", endpoint_url=endpoint)
            s3.create_bucket(Bucket="prompts")
            t0 = time.perf_counter()
            for p in tqdm(shards, desc="uploading to moto", unit="shard"):
                s3.upload_file(str(p), "prompts", f"lake/{p.name}")
            print(f"upload: {time.perf_counter() - t0:.1f} s", flush=True)
            # Ray workers started before the env change: pass it explicitly via the dataset's remote args.
            ray.shutdown()
            init_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
            DataContext.get_current().enable_progress_bars = False
            results.append(time_driver(lambda: prompt_dataset("s3://prompts/lake", seed=0),
                                       "s3 (moto), fast tar parser, driver"))
            results.append(time_split(lambda: prompt_dataset("s3://prompts/lake", seed=1),
                                      "s3 (moto), fast tar parser, 2-way split"))
        finally:
            proc.terminate()
    print("\nsummary (prompts/s; target 1.4M in 60 s = 23.3k/s):")
    for r in results:
        eta = 1_400_000 / max(r["prompts_per_s"], 1)
        print(f"  {r['path']:<48} {r['prompts_per_s']:>9,d}/s   1.4M in {eta:5.1f} s")
    ray.shutdown()


if __name__ == "__main__":
    main()
