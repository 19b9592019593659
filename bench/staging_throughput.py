"""Dataset staging vs boto3's TransferManager on the same objects, side by side in one run.

Against a moto S3 server on loopback (or any endpoint given with --endpoint and --bucket), with
objects made here: many small image-sized files plus a few large ones that go multipart. Times

  transfer-manager  list, then boto3.s3.transfer.TransferManager downloading every object at
                    once (max_concurrency = --workers): the reference;
  kubetune          `staging.stage`: list, download through one TransferManager (sizes from the
                    listing, no HEAD requests), verify size and ETag (MD5), write the index;
  restart           `stage` again on the same cache, as a restarted pod does (must download 0).

    uv run python bench/staging_throughput.py --small 512 --small-kib 200 --large 4 --large-mib 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from boto3.s3.transfer import TransferConfig, TransferManager
from kubetune.s3server import client, local_s3
from kubetune_trainer.config import StorageSpec
from kubetune_trainer.storage.staging import stage
from kubetune_trainer.storage.stores import open_store


def make_objects(s3, bucket: str, args: argparse.Namespace) -> int:
    sizes = [("small", args.small_kib * 1024)] * args.small + [("large", args.large_mib * 2**20)] * args.large
    s3.create_bucket(Bucket=bucket)

    def put(item: tuple[int, tuple[str, int]]) -> int:
        n, (kind, size) = item
        s3.put_object(Bucket=bucket, Key=f"data/{kind}/{n:05d}.bin", Body=os.urandom(size))
        return size

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(put, enumerate(sizes)))


def transfer_manager(s3, bucket: str, dest: Path, workers: int) -> float:
    """List, then download every object through one TransferManager (timed from the listing,
    as staging is)."""
    start = time.perf_counter()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="data/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    with TransferManager(s3, TransferConfig(max_concurrency=workers)) as manager:
        futures = []
        for key in keys:
            (dest / key).parent.mkdir(parents=True, exist_ok=True)
            futures.append(manager.download(bucket, key, str(dest / key)))
        for future in futures:
            future.result()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=256, help="number of small objects")
    parser.add_argument("--small-kib", type=int, default=200)
    parser.add_argument("--large", type=int, default=2, help="number of large (multipart) objects")
    parser.add_argument("--large-mib", type=int, default=32)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4, help="runs of each side; medians are compared")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with local_s3() as endpoint, tempfile.TemporaryDirectory() as tmp:
        s3 = client(endpoint)
        total = make_objects(s3, "bench", args)
        store = open_store("s3://bench/data/", StorageSpec(endpoint=endpoint, region="us-east-1"))
        references, ours = [], []
        for rep in range(args.repeats):  # alternating, so neither side always runs first
            for side in ("tm", "kubetune") if rep % 2 == 0 else ("kubetune", "tm"):
                if side == "tm":
                    references.append(transfer_manager(s3, "bench", Path(tmp) / f"tm{rep}", args.workers))
                else:
                    start = time.perf_counter()
                    first = stage(store, Path(tmp) / f"cache{rep}", workers=args.workers)
                    ours.append(time.perf_counter() - start)
        reference, ours = statistics.median(references), statistics.median(ours)
        start = time.perf_counter()
        again = stage(store, Path(tmp) / f"cache{args.repeats - 1}", workers=args.workers)
        restart = time.perf_counter() - start
    mib = total / 2**20
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, moto server on loopback",
        "objects": args.small + args.large,
        "mib": mib,
        "transfer_manager_mib_s": mib / reference,
        "kubetune_mib_s": mib / ours,
        "ratio": reference / ours,
        "restart_seconds": restart,
        "restart_downloaded": again.downloaded,
        "first_downloaded": first.downloaded,
    }
    print(f"{result['objects']} objects, {mib:.0f} MiB, {args.workers} workers")
    print(f"transfer-manager {result['transfer_manager_mib_s']:8.1f} MiB/s")
    print(f"kubetune stage   {result['kubetune_mib_s']:8.1f} MiB/s   ratio {result['ratio']:.2f}")
    print(f"restart          {restart:8.2f} s, downloaded {again.downloaded} objects")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
