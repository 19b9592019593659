"""Status from recorded Job/pod states: every phase, failure kinds, conditions, progress."""

from __future__ import annotations

import dataclasses

import pytest
from kubetune_operator.observing import (
    UNANSWERED_LIMIT,
    Scrape,
    derive_status,
    failure_reason,
    format_duration,
    parse_metrics,
    slim_job,
    slim_pod,
)
from kubetune_operator.reconciling import bounded
from kubetune_operator.specs import FineTuneJob, FineTuneJobStatus

from tests.factories import example_job

T0, T1 = "2026-11-22T10:00:00Z", "2026-11-22T10:05:00Z"


def ftj(**spec) -> FineTuneJob:
    raw = example_job(namespace="ml", **spec)
    raw["metadata"]["generation"] = 3
    return FineTuneJob.model_validate(raw)


def job(suspend: bool = False, **status) -> dict:
    return {"metadata": {"name": "labpics-sam2"}, "spec": {"suspend": suspend}, "status": status}


def cond(kind: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": T1}


def pod(phase: str, index: int = 0, terminated: dict | None = None) -> dict:
    status: dict = {"phase": phase, "podIP": f"10.0.0.{index + 1}"}
    if terminated:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {"metadata": {"labels": {"batch.kubernetes.io/job-completion-index": str(index)}}, "status": status}


BAD_INPUT = {
    "exitCode": 2,
    "message": "bucket 'datasets' does not exist (s3://datasets/labpics/ at http://minio:9000)\n",
    "finishedAt": T1,
    "reason": "Error",
}
RUNNING = Scrape(
    step=500,
    total_steps=2000,
    epoch=1,
    loss=0.25,
    learning_rate=1e-5,
    images_per_second=64.0,
    mean_step_seconds=0.5,
    checkpoint_step=500,
    best=("miou", 0.81),
)

CASES = [
    ("no job yet", ftj(), None, [], None, "Pending", "Creating"),
    (
        "pods unscheduled",
        ftj(),
        job(active=2, startTime=T0),
        [pod("Pending"), pod("Pending", 1)],
        None,
        "Pending",
        "PodsPending",
    ),
    (
        "staging",
        ftj(),
        job(active=2, startTime=T0),
        [pod("Running"), pod("Running", 1)],
        Scrape(),
        "Staging",
        "Starting",
    ),
    (
        "running",
        ftj(),
        job(active=2, startTime=T0),
        [pod("Running"), pod("Running", 1)],
        RUNNING,
        "Running",
        "Training",
    ),
    (
        "succeeded",
        ftj(),
        job(succeeded=2, completionTime=T1, conditions=[cond("Complete")]),
        [],
        None,
        "Succeeded",
        "Completed",
    ),
    (
        "bad input",
        ftj(),
        job(
            failed=1,
            conditions=[cond("Failed", "PodFailurePolicy", "Container trainer for pod x failed with exit code 2")],
        ),
        [pod("Failed", terminated=BAD_INPUT)],
        None,
        "Failed",
        "PodFailurePolicy",
    ),
    (
        "backoff exhausted",
        ftj(),
        job(
            failed=4, conditions=[cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]
        ),
        [],
        None,
        "Failed",
        "BackoffLimitExceeded",
    ),
    (
        "deadline",
        ftj(),
        job(failed=0, conditions=[cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]),
        [],
        None,
        "Failed",
        "DeadlineExceeded",
    ),
    ("suspended", ftj(runPolicy={"suspend": True}), job(suspend=True), [], None, "Suspended", "Suspended"),
    ("kueue waits", ftj(queueName="team-a"), job(suspend=True), [], None, "Pending", "WaitingForAdmission"),
    ("kueue admitted", ftj(queueName="team-a"), job(active=2), [pod("Running")], RUNNING, "Running", "Training"),
]


@pytest.mark.parametrize(
    ("name", "resource", "observed", "pods", "scrape", "phase", "reason"), CASES, ids=[c[0] for c in CASES]
)
def test_phase_table(name, resource, observed, pods, scrape, phase, reason) -> None:
    status = derive_status(resource, FineTuneJobStatus(), observed, pods, scrape, T1)
    assert status.phase == phase
    current = {c.type: c for c in status.conditions}
    assert current["Created"].status == ("True" if observed else "False")
    if phase in ("Succeeded", "Failed"):
        assert current[phase].status == "True" and current[phase].reason == reason
    else:
        assert current["Running"].reason == reason
    assert status.observed_generation == 3


def test_failure_message_is_the_trainers_reason() -> None:
    _, resource, observed, pods, scrape, *_ = CASES[5]
    status = derive_status(resource, FineTuneJobStatus(), observed, pods, scrape, T1)
    assert (
        status.message == "bucket 'datasets' does not exist (s3://datasets/labpics/ at http://minio:9000) (exit code 2)"
    )
    assert status.restarts == 1 and status.completion_time == T1
    assert failure_reason(CASES[6][2], []) == "Job has reached the specified backoff limit"


def test_a_failure_decided_before_its_pods_end_has_a_completion_time() -> None:
    """The Job controller marks FailureTarget when a pod matches a FailJob rule and Failed only once
    the other pods have terminated; the status is final at the first (real API, Kubernetes 1.31+)."""
    target = job(failed=1, conditions=[cond("FailureTarget", "PodFailurePolicy")])
    failed = pod("Failed", 0, {"exitCode": 2, "message": "DataError: no usable sample\n", "finishedAt": T1})
    status = derive_status(ftj(), FineTuneJobStatus(), target, [failed, pod("Running", 1)], None, T1)
    assert status.phase == "Failed" and status.completion_time == T1


def test_running_status_carries_progress() -> None:
    status = derive_status(ftj(), FineTuneJobStatus(), CASES[3][2], CASES[3][3], RUNNING, T1)
    p = status.progress
    assert (p.step, p.total_steps, p.percent, p.epoch, p.loss) == (500, 2000, 25.0, 1, 0.25)
    assert p.eta == "12m30s" and p.images_per_second == 64.0
    assert status.best_metric.metric == "miou" and status.best_metric.value == 0.81
    assert status.last_checkpoint == "s3://runs/labpics-sam2/checkpoints/step-00000500/"
    assert status.start_time == T0


def test_conditions_keep_their_transition_time() -> None:
    first = derive_status(ftj(), FineTuneJobStatus(), CASES[3][2], CASES[3][3], RUNNING, T0)
    later = derive_status(ftj(), first, CASES[3][2], CASES[3][3], RUNNING, T1)
    running = next(c for c in later.conditions if c.type == "Running")
    assert running.status == "True" and running.last_transition_time == T0


def test_terminal_phase_sticks_and_progress_completes() -> None:
    running = derive_status(ftj(), FineTuneJobStatus(), CASES[3][2], CASES[3][3], RUNNING, T0)
    done = derive_status(ftj(), running, CASES[4][2], [], None, T1)
    assert done.phase == "Succeeded" and done.progress.percent == 100.0 and done.progress.step == 2000
    assert done.best_metric.value == 0.81  # kept from the last scrape


def test_parse_metrics_reads_rank_zero_only() -> None:
    text = (
        "\n".join(
            [
                "# TYPE kubetune_train_step gauge",
                'kubetune_train_step{family="sam2",job="j",namespace="n",rank="0"} 40.0',
                'kubetune_train_step{family="sam2",job="j",namespace="n",rank="1"} 39.0',
                "# TYPE kubetune_train_total_steps gauge",
                'kubetune_train_total_steps{family="sam2",job="j",namespace="n",rank="0"} 100.0',
                "# TYPE kubetune_train_step_seconds histogram",
                'kubetune_train_step_seconds_sum{family="sam2",job="j",namespace="n",rank="0"} 20.0',
                'kubetune_train_step_seconds_count{family="sam2",job="j",namespace="n",rank="0"} 40.0',
                "# TYPE kubetune_eval_best_metric gauge",
                'kubetune_eval_best_metric{family="sam2",job="j",metric="dice",namespace="n",rank="0"} 0.7',
            ]
        )
        + "\n"
    )
    scrape = parse_metrics(text)
    assert (scrape.step, scrape.total_steps, scrape.mean_step_seconds, scrape.best) == (40, 100, 0.5, ("dice", 0.7))


def test_format_duration() -> None:
    assert [format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_baseline_metric_travels_from_the_trainer_to_status() -> None:
    """The trainer's own exposition (a real registry) read by the operator's parser."""
    from kubetune_trainer.metrics.events import EventStorage
    from kubetune_trainer.metrics.prometheus import PrometheusWriter
    from prometheus_client import generate_latest

    writer = PrometheusWriter("j", "n", 0, "sam")
    storage = EventStorage()
    storage.put(**{"baseline/f1": 0.31, "best/f1": 0.74, "step": 0})
    writer.write(storage.drain())
    scrape = parse_metrics(generate_latest(writer.registry).decode())
    assert scrape.baseline == ("f1", 0.31) and scrape.best == ("f1", 0.74)
    status = derive_status(ftj(), FineTuneJobStatus(), CASES[3][2], CASES[3][3], scrape, T1)
    assert (status.baseline_metric.metric, status.baseline_metric.value) == ("f1", 0.31)
    later = derive_status(ftj(), status, CASES[4][2], [], None, T1)
    assert later.baseline_metric == status.baseline_metric  # kept after the pods are gone


@pytest.mark.parametrize(
    ("terminated", "kind"),
    [
        ({**BAD_INPUT, "message": "OOM: OutOfMemoryError: CUDA out of memory; lower training.batchSize\n"}, "OOM"),
        ({**BAD_INPUT, "exitCode": 137, "reason": "OOMKilled", "message": ""}, "OOM"),  # the kernel's kill
        ({**BAD_INPUT, "message": "NonFiniteLoss: the loss was NaN/inf for 20 steps\n"}, "NonFiniteLoss"),
        ({**BAD_INPUT, "message": "DataError: data.train: no usable sample\n"}, "DataError"),
        ({**BAD_INPUT, "message": "Note: something else\n"}, "PodFailurePolicy"),  # not a class: the Job's reason
    ],
)
def test_a_failure_class_becomes_the_failed_conditions_reason(terminated: dict, kind: str) -> None:
    failed = job(failed=1, conditions=[cond("Failed", "PodFailurePolicy", "failed with exit code 2")])
    status = derive_status(ftj(), FineTuneJobStatus(), failed, [pod("Failed", terminated=terminated)], None, T1)
    assert status.phase == "Failed"
    assert {c.type: c.reason for c in status.conditions}["Failed"] == kind
    assert f"(exit code {terminated['exitCode']})" in status.message


def test_failures_are_counted_once_per_job_by_class() -> None:
    from kubetune_operator.telemetry import OperatorMetrics

    metrics = OperatorMetrics()
    for uid, kind in (("a", "OOM"), ("a", "OOM"), ("b", "OOM"), ("c", "DataError")):
        metrics.count_failure(uid, kind)
    value = lambda k: metrics.registry.get_sample_value("kubetune_operator_failures_total", {"class": k})  # noqa: E731
    assert (value("OOM"), value("DataError")) == (2.0, 1.0)


def test_phase_counts_follow_jobs_from_many_threads() -> None:
    """Handlers run in kopf's thread pool: counts stay exact while threads move jobs between phases."""
    from concurrent.futures import ThreadPoolExecutor

    from kubetune_operator.telemetry import OperatorMetrics

    metrics = OperatorMetrics()

    def lifecycle(uid: str) -> None:
        for phase in ("Pending", "Staging", "Running", "Running", "Succeeded"):
            metrics.set_phase(uid, phase)
        if uid.endswith("0"):
            metrics.set_phase(uid, None)  # deleted

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lifecycle, [f"job-{i}" for i in range(500)]))
    count = lambda phase: metrics.registry.get_sample_value("kubetune_operator_jobs", {"phase": phase})  # noqa: E731
    assert (count("Succeeded"), count("Running"), count("Pending")) == (450.0, 0.0, 0.0)


def test_a_step_that_does_not_move_past_the_deadline_is_a_stall() -> None:
    resource = ftj(runPolicy={"progressDeadlineSeconds": 240})
    running = job(active=2)
    pods = [pod("Running", 0), pod("Running", 1)]
    first = derive_status(resource, FineTuneJobStatus(), running, pods, RUNNING, T0)
    assert first.step_changed_at == T0 and "Stalled" not in {c.type for c in first.conditions}
    later = derive_status(resource, first, running, pods, RUNNING, T1)  # the same step, five minutes on
    stalled = {c.type: c for c in later.conditions}["Stalled"]
    assert (stalled.status, stalled.reason) == ("True", "NoProgress")
    assert stalled.message == "step 500 has not moved for 5m00s (runPolicy.progressDeadlineSeconds 240)"
    moved = derive_status(resource, later, running, pods, dataclasses.replace(RUNNING, step=501), T1)
    assert {c.type: c.status for c in moved.conditions}["Stalled"] == "False" and moved.step_changed_at == T1
    never = derive_status(ftj(runPolicy={"progressDeadlineSeconds": None}), first, running, pods, RUNNING, T1)
    assert "Stalled" not in {c.type for c in never.conditions}


def test_the_failing_ranks_last_lines_reach_status_redacted() -> None:
    lines = (
        '{"event": "step", "step": 41}\n{"event": "upload", "key": "AKIAABCDEFGHIJKLMNOP"}\nOOM: CUDA out of memory\n'
    )
    failed = job(failed=1, conditions=[cond("Failed", "PodFailurePolicy", "failed with exit code 2")])
    status = derive_status(
        ftj(), FineTuneJobStatus(), failed, [pod("Failed", terminated={**BAD_INPUT, "message": lines})], None, T1
    )
    assert status.last_failure.splitlines()[0] == '{"event": "step", "step": 41}'
    assert "AKIA" not in status.last_failure and "***" in status.last_failure
    assert status.message == "OOM: CUDA out of memory (exit code 2)"


def test_status_messages_are_bounded_with_a_count_of_what_was_cut() -> None:
    assert bounded("short") == "short"
    long = "spec.model.overrides.X: unknown key; " * 200
    cut = bounded(long, limit=100)
    assert cut.startswith(long[:100]) and cut.endswith(f"... ({len(long) - 100} more characters cut)")


def test_a_running_job_whose_metrics_do_not_answer_stays_running() -> None:
    """A failed scrape is not a phase change: the pods still run. After UNANSWERED_LIMIT misses in
    a row the message says so; the last progress stays."""
    resource, observed, pods = ftj(), job(active=2), [pod("Running"), pod("Running", 1)]
    running = derive_status(resource, FineTuneJobStatus(), observed, pods, RUNNING, T0)
    assert running.phase == "Running" and running.message == "step 500 of 2000"
    for missed in range(UNANSWERED_LIMIT):
        quiet = derive_status(resource, running, observed, pods, None, T1, unanswered=missed)
        assert quiet.phase == "Running" and quiet.message == "step 500 of 2000"
        assert quiet.conditions == running.conditions  # nothing to write
    silent = derive_status(resource, running, observed, pods, None, T1, unanswered=UNANSWERED_LIMIT)
    assert silent.phase == "Running" and silent.progress == running.progress
    assert silent.message == "step 500; rank 0's metrics are not answering"
    # Pods that stop running do change the phase.
    assert derive_status(resource, running, observed, [pod("Pending")], None, T1).phase == "Pending"


@pytest.mark.parametrize(
    ("name", "resource", "observed", "pods", "scrape", "phase", "reason"), CASES, ids=[c[0] for c in CASES]
)
def test_the_slim_views_the_watches_keep_derive_the_same_status(
    name, resource, observed, pods, scrape, phase, reason
) -> None:
    """The operator keeps only part of each Job and pod in memory: the status from that part is the
    status from the whole objects."""
    full = derive_status(resource, FineTuneJobStatus(), observed, pods, scrape, T1)
    slim = derive_status(
        resource, FineTuneJobStatus(), observed and slim_job(observed), [slim_pod(p) for p in pods], scrape, T1
    )
    assert slim == full


def test_the_pod_that_failed_first_explains_the_failure_not_the_ones_stopped_after() -> None:
    """Once rank 0 exits 2, the Job controller deletes the other pod (SIGTERM, exit 143) a moment
    later: the newer ending is a consequence, not the reason."""
    cause = pod("Failed", 0, terminated=BAD_INPUT)
    stopped = pod("Failed", 1, terminated={"exitCode": 143, "reason": "Error", "finishedAt": "2026-11-22T10:05:09Z"})
    stopped["metadata"]["deletionTimestamp"] = "2026-11-22T10:05:08Z"
    failed = job(failed=2, conditions=[cond("FailureTarget", "PodFailurePolicy")])
    status = derive_status(ftj(), FineTuneJobStatus(), failed, [stopped, cause], None, T1)
    assert status.message.endswith("(exit code 2)") and status.message.startswith("bucket 'datasets'")
    assert status.last_failure.startswith("bucket 'datasets' does not exist")
