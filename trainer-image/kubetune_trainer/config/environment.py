"""The KUBETUNE_* variables the trainer reads, with their defaults: one place for the names the
trainer and the operator's rendering (which sets them in every pod) both use."""

from __future__ import annotations

CACHE_DIR = "KUBETUNE_CACHE_DIR"
"""Node-local folder for staged data, base weights and disk feature-cache entries."""
DEFAULT_CACHE_DIR = "~/.cache/kubetune"
CACHE_JOBS, CACHE_SHARED = "jobs", "shared"
"""Under it: each job's own folder, jobs/<namespace>/<name>, and the files the node's jobs
share (checked before reuse). In a cluster a pod mounts only its own job's folder and shared/."""

METRICS_PORT = "KUBETUNE_METRICS_PORT"
"""Prometheus port of local rank 0; local rank r serves METRICS_PORT + r; 0 disables."""
DEFAULT_METRICS_PORT = 9400
METRICS_ADDRESS = "KUBETUNE_METRICS_ADDRESS"
"""Interface the metrics endpoint binds: every one in a pod (Prometheus scrapes the pod IP),
loopback for `kubetune run --local` on a workstation."""
DEFAULT_METRICS_ADDRESS = "0.0.0.0"

LOG_FORMAT = "KUBETUNE_LOG_FORMAT"
"""json or console; unset: json unless stderr is a terminal."""
LOG_LEVEL = "KUBETUNE_LOG_LEVEL"
DEFAULT_LOG_LEVEL = "INFO"

TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"
"""Where a fatal error's one-line reason goes (Kubernetes reads /dev/termination-log)."""
DEFAULT_TERMINATION_LOG = "/dev/termination-log"

DETECTRON2_ZOO_URL = "KUBETUNE_DETECTRON2_ZOO_URL"
"""What detectron2:// stands for (Detectron2's own model-zoo prefix unless set: a mirror)."""
DEFAULT_DETECTRON2_ZOO_URL = "https://dl.fbaipublicfiles.com/detectron2/"
HF_TOKEN, HF_ENDPOINT = "HF_TOKEN", "HF_ENDPOINT"
"""huggingface_hub's own names: the token (from model.hfTokenSecret) and the Hub's address."""

STORAGE_RETRY_S = "KUBETUNE_STORAGE_RETRY_S"
"""How long transient storage errors (outage, timeouts, 5xx, SlowDown) are retried, with
backoff, before the trainer exits 1 so the Job retries the pod."""
DEFAULT_STORAGE_RETRY_S = 300.0

COLLECTIVE_TIMEOUT_S = "KUBETUNE_COLLECTIVE_TIMEOUT_S"
"""How long a collective (all-reduce, barrier) waits for its peers before the run fails: below
the job's progress deadline, so a hung rank ends the run instead of stalling it."""
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800

EXIT_RECORD_DIR = "KUBETUNE_EXIT_RECORD_DIR"
"""Set by the launcher: each failing rank writes its exit code and the moment it failed here first
thing, so the launcher reports the rank that failed first, not a peer that crashed when it left
(or the first rank's code lost when torchrun stopped it while it was still uploading its log)."""
