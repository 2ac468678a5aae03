"""The processes that run beside this server (`kto-loop up`'s learner and labeler), as it reports them.

The server does not start them (kto_loop.supervisor does, and must not be imported from here);
whoever does gives `create_app` a `ProcessReport`, which `/readyz` and `/metrics` read. Plain
`kto-loop serve` has none and reports nothing about other processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    """`learner`, `labeler`."""
    up: bool
    """Running now."""
    pid: int | None
    restarts: int
    """Times it was started again after it died."""
    last_exit: int | None
    """Its last exit status (negative: killed by that signal), None while it never exited."""
    gave_up: str | None = None
    """Why it is no longer restarted (it exited saying a restart cannot fix it), else None."""

    def to_json(self) -> dict[str, object]:
        return {
            "up": self.up,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "gave_up": self.gave_up,
        }


ProcessReport = Callable[[], list[ProcessStatus]]
"""The status of every process run beside the server, at the time of the call."""


class ProcessCollector(Collector):
    """`kto_process_up{process}` and `kto_process_restarts_total{process}` from the report, read at
    each scrape (no samples without a report)."""

    def __init__(self) -> None:
        self.report: ProcessReport | None = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "kto_process_up", "1 while a process run beside the server is running.", labels=["process"]
        )
        restarts = CounterMetricFamily(
            "kto_process_restarts", "Times a process run beside the server was restarted.", labels=["process"]
        )
        for p in self.report() if self.report is not None else []:
            up.add_metric([p.name], 1.0 if p.up else 0.0)
            restarts.add_metric([p.name], p.restarts)
        yield up
        yield restarts

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("kto_process_up", "", labels=["process"])
        yield CounterMetricFamily("kto_process_restarts", "", labels=["process"])
