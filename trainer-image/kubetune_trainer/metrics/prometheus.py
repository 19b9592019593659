"""Prometheus metrics of one trainer rank, under the names the dashboard and alerts use
(docs/architecture.md). Fed only by `PrometheusWriter.write` from the event storage."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector

from kubetune_trainer.metrics.events import Snapshot

LABELS = ("job", "namespace", "rank", "family")
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CKPT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class PrometheusWriter:
    def __init__(self, job: str, namespace: str, rank: int, family: str) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.labels = {"job": job, "namespace": namespace, "rank": str(rank), "family": family}
        r = self.registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, LABELS + extra, registry=r)

        self.gauges = {
            "loss": gauge("kubetune_train_loss", "Training loss of the last step (mean over ranks)"),
            "step": gauge("kubetune_train_step", "Optimizer steps done"),
            "total_steps": gauge("kubetune_train_total_steps", "Optimizer steps the run will take"),
            "epoch": gauge("kubetune_train_epoch", "Current epoch (0-based)"),
            "lr": gauge("kubetune_train_learning_rate", "Learning rate of the last step"),
            "images_per_second": gauge("kubetune_train_images_per_second", "Training images per second over all ranks"),
            "amp/grad_scale": gauge("kubetune_amp_grad_scale", "GradScaler scale (fp16)"),
            "checkpoint/last_step": gauge("kubetune_checkpoint_last_step", "Step of the newest complete checkpoint"),
        }
        self.eval_metric = gauge("kubetune_eval_metric", "Validation metric of the last evaluation", ("metric",))
        self.train_metric = gauge(
            "kubetune_train_metric",
            "Running training metric of the last step's masks (empty_share, target_prob, soft_dice_at_logits, "
            "miou_at_logits; mean over ranks)",
            ("metric",),
        )
        self.best_metric = gauge(
            "kubetune_eval_best_metric", "Best validation value of the early-stopping metric so far", ("metric",)
        )
        self.baseline_metric = gauge(
            "kubetune_eval_baseline_metric",
            "The base model's validation value of the early-stopping metric, before training",
            ("metric",),
        )
        self.loss_component = gauge("kubetune_train_loss_component", "One term of the training loss", ("component",))
        self.gpu_memory = gauge("kubetune_gpu_memory_bytes", "GPU memory held by this rank", ("kind",))
        self.histograms = {
            "step_seconds": Histogram(
                "kubetune_train_step_seconds",
                "Wall time of one optimizer step",
                LABELS,
                buckets=STEP_BUCKETS,
                registry=r,
            ),
            "data_wait_seconds": Histogram(
                "kubetune_data_wait_seconds",
                "Time the step waited for its batch",
                LABELS,
                buckets=STEP_BUCKETS,
                registry=r,
            ),
            "checkpoint_seconds": Histogram(
                "kubetune_checkpoint_seconds", "Time to write one checkpoint", LABELS, buckets=CKPT_BUCKETS, registry=r
            ),
        }
        self.counters = {
            "images": Counter(
                "kubetune_train_images_total", "Training images processed by this rank", LABELS, registry=r
            ),
            "amp/skipped_steps": Counter(
                "kubetune_amp_skipped_steps_total",
                "Steps skipped by the GradScaler (inf/NaN gradients)",
                LABELS,
                registry=r,
            ),
        }
        self.s3_bytes = Counter(
            "kubetune_s3_bytes_total", "Bytes moved to/from object storage", LABELS + ("direction",), registry=r
        )
        for direction in ("download", "upload"):
            self.s3_bytes.labels(**self.labels, direction=direction)
        for name, metric in {**self.counters, **self.histograms}.items():
            metric.labels(**self.labels)  # export zero-valued series from the start
            del name

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return server.server_port

    def write(self, snap: Snapshot) -> None:
        lab = self.labels
        for key, value in snap.scalars.items():
            if key in self.gauges:
                self.gauges[key].labels(**lab).set(value)
            elif key.startswith("eval/class/"):
                continue  # per-class results stay in the report: the number of classes is the user's
            elif key.startswith("eval/"):
                self.eval_metric.labels(**lab, metric=key[5:]).set(value)
            elif key.startswith("train/"):
                self.train_metric.labels(**lab, metric=key[6:]).set(value)
            elif key.startswith("best/"):
                self.best_metric.labels(**lab, metric=key[5:]).set(value)
            elif key.startswith("baseline/"):
                self.baseline_metric.labels(**lab, metric=key[9:]).set(value)
            elif key.startswith("loss_"):
                self.loss_component.labels(**lab, component=key).set(value)
            elif key.startswith("gpu_memory/"):
                self.gpu_memory.labels(**lab, kind=key[11:]).set(value)
        for key, values in snap.observations.items():
            for v in values:
                self.histograms[key].labels(**lab).observe(v)
        for key, amount in snap.increments.items():
            if key.startswith("s3_bytes/"):
                self.s3_bytes.labels(**lab, direction=key[9:]).inc(amount)
            else:
                self.counters[key].labels(**lab).inc(amount)

    def close(self) -> None:
        pass
