"""Where the report's inputs and the page live under output.uri, and reading them back from a
store (s3:// or file://): what the trainer refreshes at each evaluation and `kubetune report`
rebuilds for any job, running or finished."""

from __future__ import annotations

import json
from typing import Any

from kubetune_trainer.errors import KubetuneError
from kubetune_trainer.metrics.events import METRICS_FILE
from kubetune_trainer.reporting.page import Inputs, build
from kubetune_trainer.storage.stores import ObjectStore

PAGE_KEY = "report/report.html"
CONFIG_KEY = "report/config.json"
GALLERY = "report/gallery/"
REPORT_KEY = "report.json"


def read_rows(text: str) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a line cut short by a writer that was killed is left out."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _json(store: ObjectStore, key: str) -> dict[str, Any] | None:
    try:
        value = json.loads(store.get_bytes(key))
    except (KubetuneError, ValueError):  # gone meanwhile, or not JSON
        return None
    return value if isinstance(value, dict) else None


def gallery(store: ObjectStore) -> list[tuple[str, bytes]]:
    rows = sorted(o.key for o in store.list(GALLERY) if o.key.endswith(".png"))
    return [(key.rsplit("/", 1)[-1], store.get_bytes(key)) for key in rows]


def inputs_from(store: ObjectStore) -> Inputs:
    """What a job has written so far; FileNotFoundError when there is no metric log at all."""
    keys = {o.key for o in store.list("")}
    if METRICS_FILE not in keys:
        raise FileNotFoundError(
            f"no {METRICS_FILE} under {store.uri}: not a kubetune output, or the job has not written one yet"
        )
    return Inputs(
        rows=read_rows(store.get_bytes(METRICS_FILE).decode("utf-8", "replace")),
        config=_json(store, CONFIG_KEY) if CONFIG_KEY in keys else _json(store, "final/config.json"),
        report=_json(store, REPORT_KEY) if REPORT_KEY in keys else None,
        gallery=gallery(store),
    )


def publish_page(store: ObjectStore, inputs: Inputs) -> str:
    """Write report.html under output.uri; returns its URI."""
    store.put_bytes(build(inputs).encode("utf-8"), PAGE_KEY)
    return f"{store.uri}{PAGE_KEY}"
