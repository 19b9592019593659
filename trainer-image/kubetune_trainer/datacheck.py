"""Read a job's dataset exactly as its trainer will (staged from S3 into the node cache, the same
readers, the same checks) and say what each split holds and skips, before any GPU time is spent.

python -m kubetune_trainer.datacheck --config train.json [--json]   (`kubetune validate --data`)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kubetune_trainer import logs
from kubetune_trainer.config import TrainConfig, load_validated
from kubetune_trainer.datasets.checks import check_split
from kubetune_trainer.datasets.readers import read_split
from kubetune_trainer.errors import EXIT_BAD_INPUT, EXIT_OK, KubetuneError
from kubetune_trainer.storage.staging import stage
from kubetune_trainer.storage.stores import open_store
from kubetune_trainer.training.inputs import job_cache, shared_files


def check(config: TrainConfig) -> dict[str, dict]:
    """Per split, the summary `datasets.checks` makes of it."""
    data = config.data
    cache = job_cache(config.job)
    root = stage(open_store(data.source, config.storage), cache, shared_files()).root
    splits = ("train", "validation") if data.validation else ("train",)
    out = {}
    for which in splits:  # validation keeps images without objects, as evaluation does
        split = check_split(read_split(data, root, which, cache / "extracted"), keep_empty=which == "validation")
        out[which] = split.summary
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune_trainer.datacheck", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig JSON")
    parser.add_argument("--json", action="store_true", help='print {"splits": {"train": {...}, ...}}')
    args = parser.parse_args(argv)
    logs.configure(0)
    try:
        summaries = check(load_validated(args.config, TrainConfig))
    except KubetuneError as exc:
        print(f"kubetune validate --data: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps({"splits": {k: s.as_json() for k, s in summaries.items()}}, indent=2))
    else:
        print("\n".join(line for s in summaries.values() for line in s.lines()))
    empty = [k for k, s in summaries.items() if s.images == 0]
    if empty:
        print(f"kubetune validate --data: no usable sample in split {', '.join(empty)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
