"""What a run measures and reports: the event storage and its writers (metrics.jsonl, terminal,
Prometheus), and the report with its before → after summary."""
