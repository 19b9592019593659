"""Fill storage.mirror from a machine with internet access: each spec's published weights
(hf://, https://, detectron2://, or a Detectron2 job's zoo default) are fetched and checked as a
trainer would, then uploaded where the mirror mapping (`storage.weights.mirrored`) expects them.

python -m kubetune_trainer.mirroring --config train.json [--to s3://bucket/weights/]   (`kubetune weights mirror`)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from kubetune_trainer import logs
from kubetune_trainer.config import TrainConfig, load_validated
from kubetune_trainer.errors import EXIT_BAD_INPUT, EXIT_OK, ConfigError, KubetuneError
from kubetune_trainer.storage.hub import HubRef
from kubetune_trainer.storage.stores import open_store, split_object_uri
from kubetune_trainer.storage.weights import PUBLISHED, Weights, fetch_weights, mirrored


def checkpoint_of(config: TrainConfig) -> str | None:
    """The weights a job starts from: model.checkpoint, or Detectron2's zoo default."""
    model = config.model
    if model.checkpoint is None and model.family == "detectron2":
        from kubetune_trainer.d2.build import require_detectron2, zoo_checkpoint

        require_detectron2()
        return zoo_checkpoint(model.variant)
    return model.checkpoint


def mirror(config: TrainConfig, target: str | None = None) -> list[str]:
    """Upload the job's published weights under the mirror; returns the URIs written."""
    target = target or config.storage.mirror
    if not target:
        raise ConfigError("no mirror to fill: set storage.mirror in the spec, or pass --to s3://bucket/prefix/")
    uri = checkpoint_of(config)
    if not uri or not uri.startswith(PUBLISHED):
        return []
    model = config.model
    weights = Weights(uri, model.family, model.variant, model.checkpoint_sha256, folder=model.family == "sam")
    origin = config.storage.model_copy(update={"mirror": None})  # from where it is published
    written = []
    with tempfile.TemporaryDirectory(prefix="kubetune-mirror-") as tmp:
        path, _ = fetch_weights(weights, origin, Path(tmp), None)
        targets = mirrored(uri, weights, target)
        if path.is_dir():
            names = HubRef.parse(uri).files(model.family, model.variant) if uri.startswith("hf://") else []
            files = [path / name for name in names]
        else:
            files = [path]
        for file, dest in zip(files, targets, strict=True):
            folder, key = split_object_uri(dest)
            open_store(folder, config.storage).upload(file, key)
            written.append(dest)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune_trainer.mirroring", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, action="append", help="TrainConfig JSON")
    parser.add_argument("--to", default=None, help="the mirror prefix (default: each spec's storage.mirror)")
    args = parser.parse_args(argv)
    logs.configure(0)
    try:
        for path in args.config:
            for uri in mirror(load_validated(path, TrainConfig), args.to):
                print(uri)
    except KubetuneError as exc:
        print(f"kubetune weights mirror: {exc}", file=sys.stderr)
        return exc.exit_code if exc.exit_code else EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
