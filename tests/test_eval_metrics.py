"""The validation, distillation and mixture figures of a step record become Prometheus series
(ops/prometheus.py): val loss and perplexity, the KL, and per dataset a token counter that
takes the increase of the record's running total and the window's share."""

from __future__ import annotations

from typing import Any

from ops.prometheus import METRICS, PrometheusSink


class Calls:
    """A backend that records what the sink asks of it."""

    def __init__(self) -> None:
        self.sets: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.incs: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, value: float, tags: dict[str, str]) -> None:
        assert name in METRICS and METRICS[name][0] == "counter", name
        key = (name, tuple(sorted(tags.items())))
        self.incs[key] = self.incs.get(key, 0.0) + value

    def set(self, name: str, value: float, tags: dict[str, str]) -> None:
        assert name in METRICS and METRICS[name][0] == "gauge", name
        self.sets[(name, tuple(sorted(tags.items())))] = value

    def observe(self, name: str, value: float, tags: dict[str, str]) -> None:
        pass

    def close(self) -> None:
        pass


TAGS = (("node", "n"), ("rank", "0"), ("run", "r"))


def record(step: int, web: int, code: int, **extra: Any) -> dict[str, Any]:
    return {
        "step": step,
        "loss": 3.0,
        "data_mix": {
            "web": {"tokens": web, "samples": web // 8, "share": 0.75, "weight": 0.7},
            "code": {"tokens": code, "samples": code // 8, "share": 0.25, "weight": 0.3},
        },
        **extra,
    }


def test_val_kl_and_dataset_series() -> None:
    b = Calls()
    sink = PrometheusSink(b, run="r", node="n", rank=0, gpu=None, step_series=True)
    sink.log(record(1, 80, 16, val_loss=2.5, val_ppl=12.18, distill_kl=0.25), 1)
    sink.log(record(2, 152, 40), 2)
    assert b.sets[("moeyard_val_loss", TAGS)] == 2.5
    assert b.sets[("moeyard_val_perplexity", TAGS)] == 12.18
    assert b.sets[("moeyard_distill_kl", TAGS)] == 0.25
    web = tuple(sorted({**dict(TAGS), "dataset": "web"}.items()))
    code = tuple(sorted({**dict(TAGS), "dataset": "code"}.items()))
    # Running totals 80 -> 152 and 16 -> 40: the counters end at the totals, not their sum.
    assert b.incs[("moeyard_dataset_tokens", web)] == 152
    assert b.incs[("moeyard_dataset_tokens", code)] == 40
    assert b.sets[("moeyard_dataset_share", web)] == 0.75
    # A record without an evaluation leaves the val series where the last evaluation put it.
    b2 = Calls()
    PrometheusSink(b2, run="r", node="n", rank=0, gpu=None, step_series=True).log(
        record(1, 8, 8), 1
    )
    assert ("moeyard_val_loss", TAGS) not in b2.sets
