"""The `kubetune` command.

kubetune run SPEC.yaml --local [--nproc-per-node N]   run a FineTuneJob on this machine
kubetune demo                                         a complete small fine-tune, no setup
kubetune validate SPEC.yaml                           check a spec and print the trainer config
kubetune validate SPEC.yaml --data [--json]           read its data as the trainer will; say what is usable
kubetune weights mirror SPEC.yaml... [--to URI]       copy the specs' published weights to storage.mirror
kubetune report OUTPUT_URI [--out FILE]               build report.html for a running or finished job
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune_trainer.errors import EXIT_BAD_INPUT, KubetuneError


def _run(args: argparse.Namespace) -> int:
    from .local import default_nproc, load_spec, run_local

    if not args.local:
        print(
            "kubetune run: only --local is available here; in a cluster, `kubectl apply -f` the spec", file=sys.stderr
        )
        return EXIT_BAD_INPUT
    job = load_spec(args.spec)
    return run_local(job.train_config(default_namespace="local"), args.nproc_per_node or default_nproc())


def _validate(args: argparse.Namespace) -> int:
    from .local import check_data, load_spec

    config = load_spec(args.spec).train_config(default_namespace="local" if args.data else "default")
    if args.data:
        return check_data(config, as_json=args.json)
    print(config.model_dump_json(by_alias=True, indent=2))
    return 0


def _mirror(args: argparse.Namespace) -> int:
    from .local import load_spec, mirror_weights

    configs = [load_spec(path).train_config(default_namespace="local") for path in args.specs]
    return mirror_weights(configs, args.to)


def _report(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import StorageSpec
    from kubetune_trainer.reporting.files import inputs_from
    from kubetune_trainer.reporting.page import build
    from kubetune_trainer.storage.stores import open_store

    uri = args.uri if args.uri.endswith("/") else args.uri + "/"
    store = open_store(uri, StorageSpec(endpoint=args.endpoint, region=args.region))
    try:
        inputs = inputs_from(store)
    except FileNotFoundError as exc:
        print(f"kubetune report: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out or Path(f"{(inputs.config or {}).get('job', {}).get('name', 'kubetune')}-report.html")
    out.write_text(build(inputs), encoding="utf-8")
    state = "finished" if inputs.report else "running or stopped"
    print(f"report of {uri} ({state}, {len(inputs.gallery)} gallery images): {out.resolve()}")
    return 0


def _render(args: argparse.Namespace) -> int:
    import yaml
    from kubetune_operator.rendering import render_all
    from kubetune_operator.settings import OperatorSettings

    from .local import load_spec

    job = load_spec(args.spec)
    if job.metadata.namespace is None:
        job = job.model_copy(update={"metadata": job.metadata.model_copy(update={"namespace": args.namespace})})

    class BlockDumper(yaml.SafeDumper):
        """Multi-line strings (the trainer config JSON) as readable literal blocks."""

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    BlockDumper.add_representer(str, text)
    print(yaml.dump_all(render_all(job, OperatorSettings()), Dumper=BlockDumper, sort_keys=False), end="")
    return 0


def _crd(args: argparse.Namespace) -> int:
    from kubetune_operator.manifests.crd import crd_yaml

    print(crd_yaml(), end="")
    return 0


def _monitoring(args: argparse.Namespace) -> int:
    from kubetune_operator.manifests.monitoring import alerts_yaml, dashboard_json

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dashboard.json").write_text(dashboard_json())
    (args.out / "alerts.yaml").write_text(alerts_yaml())
    print(f"wrote {args.out / 'dashboard.json'} and {args.out / 'alerts.yaml'}")
    return 0


def _operator(args: argparse.Namespace) -> int:
    from kubetune_operator.handlers import run
    from kubetune_operator.settings import OperatorSettings

    run(OperatorSettings())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, steps=args.steps, nproc=args.nproc_per_node, checkpoint=args.checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="Kubernetes-native fine-tuning of SAM2, SAM and Detectron2 models"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a FineTuneJob spec")
    run.add_argument("spec", type=Path)
    run.add_argument("--local", action="store_true", help="run on this machine through torchrun")
    run.add_argument("--nproc-per-node", type=int, default=None, help="processes (default: GPUs, or 1)")
    run.set_defaults(func=_run)
    val = sub.add_parser("validate", help="validate a spec and print the trainer config it becomes")
    val.add_argument("spec", type=Path)
    val.add_argument("--data", action="store_true", help="stage and read the data; per split: what is usable")
    val.add_argument("--json", action="store_true", help="with --data: the summary as JSON")
    val.set_defaults(func=_validate)
    weights = sub.add_parser("weights", help="published base weights").add_subparsers(dest="action", required=True)
    mirror = weights.add_parser("mirror", help="copy the specs' hf://, https://, detectron2:// weights to the mirror")
    mirror.add_argument("specs", type=Path, nargs="+")
    mirror.add_argument("--to", default=None, help="mirror prefix, s3:// or file:// (default: storage.mirror)")
    mirror.set_defaults(func=_mirror)
    report = sub.add_parser("report", help="build report.html of a job from its output.uri (s3:// or file://)")
    report.add_argument("uri", help="the job's output.uri")
    report.add_argument("--out", type=Path, default=None, help="where to write it (default: ./<job>-report.html)")
    report.add_argument("--endpoint", default=None, help="S3 endpoint URL (MinIO, Ceph...; default: AWS)")
    report.add_argument("--region", default=None, help="S3 region")
    report.set_defaults(func=_report)
    render = sub.add_parser("render", help="print the ConfigMap, Service and Job the operator would create")
    render.add_argument("spec", type=Path)
    render.add_argument("--namespace", default="default", help="namespace when the spec names none")
    render.set_defaults(func=_render)
    sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition").set_defaults(func=_crd)
    mon = sub.add_parser("monitoring", help="write the Grafana dashboard and Prometheus alerts for the chart")
    mon.add_argument("--out", type=Path, default=Path("charts/kubetune/files"))
    mon.set_defaults(func=_monitoring)
    sub.add_parser("operator", help="run the operator (settings from KUBETUNE_* variables)").set_defaults(
        func=_operator
    )
    demo = sub.add_parser("demo", help="fine-tune SAM2 tiny on a synthetic dataset served from a local S3")
    demo.add_argument("--out", type=Path, default=Path("kubetune-demo"), help="where results are copied")
    demo.add_argument("--steps", type=int, default=None, help="default: 300 from random weights, 120 with --checkpoint")
    demo.add_argument("--nproc-per-node", type=int, default=None)
    demo.add_argument("--checkpoint", type=Path, default=None, help="Meta's sam2.1_hiera_tiny.pt, if you have it")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KubetuneError as exc:
        print(f"kubetune: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
