"""The Prometheus sink: one metrics record per logged step becomes Prometheus series.

Two backends share one set of metric definitions:
- "client": a `prometheus_client` HTTP endpoint in this process, on a private registry
  (rank r of a node listens on `ops.prometheus_port` + its local rank, on
  `ops.prometheus_host`, 127.0.0.1 by default);
- "ray": `ray.util.metrics`, exported by Ray's metrics agent on each node. Ray prefixes the
  names with `ray_`; the dashboard matches both spellings. `ray` is imported here only, when
  this backend is built, so that trainer/ never imports it.

Every rank exports its own GPU's series (labels run, node, rank, gpu) and, on local rank 0,
the node's CPU package energy; rank 0 alone exports the step series (labels run, node,
rank). A value that was not measured is never set, so its series does not exist.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from ops.config import OpsConfig, OpsConfigError
from ops.metrics import CHECKPOINT_TIME_KEY
from ops.nvml import CLOCK_EVENT_REASONS, nvml_uuid

log = logging.getLogger("moeyard.ops")

STEP_LABELS = ("run", "node", "rank")
GPU_LABELS = ("run", "node", "rank", "gpu")
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# name -> (kind, help, labels). The exported names get `_total` (counters) or `_bucket`,
# `_sum`, `_count` (histograms) appended, and `ray_` prepended under Ray.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "moeyard_tokens": ("counter", "Tokens trained on (global)", STEP_LABELS),
    "moeyard_model_flops": ("counter", "Model FLOPs computed (global, training)", STEP_LABELS),
    "moeyard_steps": ("counter", "Optimizer steps", STEP_LABELS),
    "moeyard_step_seconds": ("histogram", "Mean step time of each logging window", STEP_LABELS),
    "moeyard_loss": ("gauge", "Training loss (lm + aux + z)", STEP_LABELS),
    "moeyard_lm_loss": ("gauge", "Language-model loss", STEP_LABELS),
    "moeyard_tokens_per_second": ("gauge", "Global tokens per second", STEP_LABELS),
    "moeyard_mfu": ("gauge", "Model FLOPs utilization (0-1)", STEP_LABELS),
    "moeyard_data_wait_ratio": ("gauge", "Share of step time waiting for data", STEP_LABELS),
    "moeyard_energy_per_token_joules": ("gauge", "Joules per token (window)", STEP_LABELS),
    "moeyard_checkpoint_seconds": ("gauge", "Seconds the last checkpoint took", STEP_LABELS),
    "moeyard_expert_load_max_over_mean": (
        "gauge",
        "Busiest expert's tokens over the mean, per MoE layer",
        (*STEP_LABELS, "layer"),
    ),
    "moeyard_expert_load_cv": (
        "gauge",
        "Coefficient of variation of tokens per expert, per MoE layer",
        (*STEP_LABELS, "layer"),
    ),
    "moeyard_router_entropy": (
        "gauge",
        "Mean routing entropy over the logging window / ln(experts) (0-1), per MoE layer",
        (*STEP_LABELS, "layer"),
    ),
    "moeyard_routing_churn": (
        "gauge",
        "Share of the probe's tokens whose top-1 expert changed over the window, per MoE layer",
        (*STEP_LABELS, "layer"),
    ),
    "moeyard_expert_idle_logs": (
        "gauge",
        "Longest run of logged steps in which one expert got no token, per MoE layer",
        (*STEP_LABELS, "layer"),
    ),
    "moeyard_router_collapse": (
        "gauge",
        "1 while the layer meets model.moe.collapse_idle_logs or collapse_cv, else 0",
        (*STEP_LABELS, "layer"),
    ),
    "moeyard_gpu_energy_joules": ("counter", "GPU energy (NVML counter deltas)", GPU_LABELS),
    "moeyard_gpu_power_watts": ("gauge", "GPU power draw", GPU_LABELS),
    "moeyard_gpu_utilization_percent": ("gauge", "GPU utilization", GPU_LABELS),
    "moeyard_gpu_memory_used_bytes": ("gauge", "GPU memory used", GPU_LABELS),
    "moeyard_gpu_memory_total_bytes": ("gauge", "GPU memory total", GPU_LABELS),
    "moeyard_gpu_temperature_celsius": ("gauge", "GPU temperature", GPU_LABELS),
    "moeyard_gpu_sm_clock_hertz": ("gauge", "GPU SM clock", GPU_LABELS),
    "moeyard_gpu_clock_event": (
        "gauge",
        "1 while a clock event (throttle) reason is active",
        (*GPU_LABELS, "reason"),
    ),
    "moeyard_cpu_energy_joules": ("counter", "CPU package energy (RAPL)", STEP_LABELS),
    "moeyard_val_loss": ("gauge", "Validation loss (eval.*), at evaluation steps", STEP_LABELS),
    "moeyard_val_perplexity": ("gauge", "Validation perplexity, exp(val_loss)", STEP_LABELS),
    "moeyard_distill_kl": ("gauge", "Distillation KL(teacher || student) x T^2", STEP_LABELS),
    "moeyard_dataset_tokens": (
        "counter",
        "Tokens trained on per dataset of a data.mix (global)",
        (*STEP_LABELS, "dataset"),
    ),
    "moeyard_dataset_share": (
        "gauge",
        "Share of the samples since the last logged step per dataset of a data.mix",
        (*STEP_LABELS, "dataset"),
    ),
}

# record key in the GPU sample -> (metric, scale)
_GPU_GAUGES = (
    ("power_w", "moeyard_gpu_power_watts", 1.0),
    ("util_pct", "moeyard_gpu_utilization_percent", 1.0),
    ("mem_used_bytes", "moeyard_gpu_memory_used_bytes", 1.0),
    ("mem_total_bytes", "moeyard_gpu_memory_total_bytes", 1.0),
    ("temp_c", "moeyard_gpu_temperature_celsius", 1.0),
    ("sm_clock_mhz", "moeyard_gpu_sm_clock_hertz", 1e6),
)
_STEP_GAUGES = (
    ("loss", "moeyard_loss"),
    ("lm_loss", "moeyard_lm_loss"),
    ("tokens_per_s", "moeyard_tokens_per_second"),
    ("mfu", "moeyard_mfu"),
    ("data_wait_share", "moeyard_data_wait_ratio"),
    ("energy_per_token_j", "moeyard_energy_per_token_joules"),
    (CHECKPOINT_TIME_KEY, "moeyard_checkpoint_seconds"),
    ("val_loss", "moeyard_val_loss"),
    ("val_ppl", "moeyard_val_perplexity"),
    ("distill_kl", "moeyard_distill_kl"),
)


class Backend(Protocol):
    def inc(self, name: str, value: float, tags: dict[str, str]) -> None: ...

    def set(self, name: str, value: float, tags: dict[str, str]) -> None: ...

    def observe(self, name: str, value: float, tags: dict[str, str]) -> None: ...

    def close(self) -> None: ...


class ClientBackend:
    """`prometheus_client` metrics on a private registry, served over HTTP.

    Raises:
        OpsConfigError: the port cannot be bound (taken, or not allowed).
    """

    def __init__(self, *, host: str, port: int, port_key: str = "ops.prometheus_port") -> None:
        import prometheus_client as pc

        self.registry = pc.CollectorRegistry()
        self._metrics: dict[str, Any] = {}
        for name, (kind, help_, labels) in METRICS.items():
            m: Any
            if kind == "counter":
                m = pc.Counter(name, help_, labels, registry=self.registry)
            elif kind == "gauge":
                m = pc.Gauge(name, help_, labels, registry=self.registry)
            else:
                m = pc.Histogram(name, help_, labels, registry=self.registry, buckets=STEP_BUCKETS)
            self._metrics[name] = m
        try:
            self._server, self._thread = pc.start_http_server(
                port, addr=host, registry=self.registry
            )
        except OSError as e:
            raise OpsConfigError(
                f"cannot serve Prometheus metrics on {host}:{port} ({port_key}): {e.strerror or e}"
            ) from None
        self.host, self.port = host, port
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    def inc(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._metrics[name].labels(**tags).inc(value)

    def set(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._metrics[name].labels(**tags).set(value)

    def observe(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._metrics[name].labels(**tags).observe(value)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class RayBackend:
    """`ray.util.metrics`, exported through Ray's metrics agent of this node."""

    def __init__(self) -> None:
        from ray.util import metrics as rm  # only here: trainer/ must not import ray

        self._metrics: dict[str, Any] = {}
        for name, (kind, help_, labels) in METRICS.items():
            m: Any
            if kind == "counter":
                m = rm.Counter(name, description=help_, tag_keys=labels)
            elif kind == "gauge":
                m = rm.Gauge(name, description=help_, tag_keys=labels)
            else:
                m = rm.Histogram(
                    name, description=help_, boundaries=list(STEP_BUCKETS), tag_keys=labels
                )
            self._metrics[name] = m

    def inc(self, name: str, value: float, tags: dict[str, str]) -> None:
        if value > 0:  # Ray's Counter.inc rejects 0
            self._metrics[name].inc(value, tags=tags)

    def set(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._metrics[name].set(value, tags=tags)

    def observe(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._metrics[name].observe(value, tags=tags)

    def close(self) -> None:
        pass


class PrometheusSink:
    """A metric sink (`log`, `close`) that turns records into Prometheus series.

    Args:
        backend: where the series go.
        run, node, rank: labels.
        gpu: this rank's GPU UUID (label of the GPU series), or None.
        step_series: export the step series (rank 0).
        linger_s: seconds `close()` waits before stopping the backend.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        run: str,
        node: str,
        rank: int,
        gpu: str | None,
        step_series: bool,
        linger_s: float = 0.0,
    ) -> None:
        self.backend = backend
        self.tags = {"run": run, "node": node, "rank": str(rank)}
        self.gpu_tags = {**self.tags, "gpu": nvml_uuid(gpu) if gpu else ""}
        self.rank = rank
        self.step_series = step_series
        self.linger_s = linger_s
        self._last_step: int | None = None
        self._dataset_tokens: dict[str, int] = {}  # per data.mix dataset, as last exported

    def log(self, metrics: dict[str, Any], step: int) -> None:
        b = self.backend
        own: dict[str, Any] = next(
            (d for d in metrics.get("devices", ()) if d["rank"] == self.rank), {}
        )
        for key, name, scale in _GPU_GAUGES:
            if key in own:
                b.set(name, own[key] * scale, self.gpu_tags)
        if "energy_j" in own:
            b.inc("moeyard_gpu_energy_joules", own["energy_j"], self.gpu_tags)
        if "clock_event_mask" in own:
            mask = int(own["clock_event_mask"])
            for bit, reason in CLOCK_EVENT_REASONS:
                b.set(
                    "moeyard_gpu_clock_event",
                    float(bool(mask & bit)),
                    {**self.gpu_tags, "reason": reason},
                )
        if "cpu_energy_j" in own:
            b.inc("moeyard_cpu_energy_joules", own["cpu_energy_j"], self.tags)
        if not self.step_series:
            return
        for key, name in _STEP_GAUGES:
            v = metrics.get(key)
            if isinstance(v, int | float):
                b.set(name, float(v), self.tags)
        tokens = metrics.get("tokens_window")
        if tokens:
            b.inc("moeyard_tokens", float(tokens), self.tags)
            if "flops_per_token" in metrics:
                b.inc("moeyard_model_flops", float(tokens) * metrics["flops_per_token"], self.tags)
        steps = (
            step - self._last_step if self._last_step is not None else metrics.get("window_steps")
        )
        if steps:
            b.inc("moeyard_steps", float(steps), self.tags)
        self._last_step = step
        if "step_time_s" in metrics:
            b.observe("moeyard_step_seconds", float(metrics["step_time_s"]), self.tags)
        for layer in metrics.get("moe", ()):
            tags = {**self.tags, "layer": str(layer["layer"])}
            b.set("moeyard_expert_load_max_over_mean", float(layer["max_over_mean"]), tags)
            b.set("moeyard_expert_load_cv", float(layer["cv"]), tags)
            for key, series in (
                ("entropy_norm", "moeyard_router_entropy"),
                ("churn", "moeyard_routing_churn"),
                ("idle_logs", "moeyard_expert_idle_logs"),
                ("collapse", "moeyard_router_collapse"),
            ):
                if key in layer:
                    b.set(series, float(layer[key]), tags)
        for name, d in (metrics.get("data_mix") or {}).items():
            tags = {**self.tags, "dataset": name}
            # The record holds each dataset's running total; the counter takes the increase.
            grown = int(d["tokens"]) - self._dataset_tokens.get(name, 0)
            self._dataset_tokens[name] = int(d["tokens"])
            if grown > 0:
                b.inc("moeyard_dataset_tokens", float(grown), tags)
            b.set("moeyard_dataset_share", float(d["share"]), tags)

    def close(self) -> None:
        if self.linger_s > 0:
            time.sleep(self.linger_s)  # a last scrape can still collect the final values
        self.backend.close()


def build_prometheus_sink(
    cfg: OpsConfig, *, run: str, node: str, rank: int, local_rank: int, gpu: str | None
) -> PrometheusSink | None:
    """The sink `cfg.prometheus` asks for, or None when it is "off".

    Raises:
        OpsConfigError: the client endpoint's port cannot be bound.
    """
    if cfg.prometheus == "off":
        return None
    if cfg.prometheus == "client":
        port = cfg.prometheus_port + local_rank
        backend: Backend = ClientBackend(
            host=cfg.prometheus_host,
            port=port,
            port_key=(
                "ops.prometheus_port"
                if local_rank == 0
                else f"ops.prometheus_port + local rank {local_rank}"
            ),
        )
    else:
        backend = RayBackend()
    return PrometheusSink(
        backend,
        run=run,
        node=node,
        rank=rank,
        gpu=gpu,
        step_series=rank == 0,
        linger_s=cfg.prometheus_linger_s if cfg.prometheus == "client" else 0.0,
    )
