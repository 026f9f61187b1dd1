"""Telemetry and metric export: NVML and RAPL sampling, step metrics, sinks (stdout,
metrics.jsonl, Prometheus), the Grafana provisioning, the built-in ops page and the run
report. Imports neither trainer nor cluster."""
