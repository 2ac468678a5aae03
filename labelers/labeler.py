"""The rule labeler: reads every served answer and writes the operator's rules' labels as feedback.

`kto-loop label` runs it (and `kto-loop up` starts it beside the learner). It is one member of
its own consumer group (`KTO_LABELER_GROUP`) on the responses topic, and its delivery rules are:

- A polled batch is labeled, its labels are published (durable when `publish_many` returns),
  and only then are the offsets committed: a crash in between re-delivers the batch, never loses it.
- A label's event_id is a hash of the rule set's version, the rule's name and the response id, so
  a re-delivered answer is labeled with the same event ids and the learner's join drops the
  repeats: each answer is labeled once per rule-set version, whatever restarts or rebalances do.
- Answers served to no known user (anonymous) are not labeled: a label is always on a user's
  answer (`FeedbackEvent.user`), so that erasing the user erases it too.
- The rule set is the registry's current one, re-read every `rules_poll_s`; a rules file
  (`KTO_RULES_PATH`) is stored there as a new version at start-up when it differs, so that the
  file and `PUT /v1/rules` name one set with one history.
- Anything on the topic that is not a usable response is skipped (the learner dead-letters it).
- Custom labelers (labelers.plugins) label each answer like rules, their event ids fixed by
  their package's version; one that raises on an answer is counted and skipped.
- Judge rules are asked of the judge (`KTO_JUDGE_URL`, labelers.judge) for the whole batch before
  it is published; a verdict the judge could not give in bounded time is skipped and counted, so a
  judge outage delays labeling by at most its timeouts and never stops the rule labels. Without a
  judge configured, judge rules are skipped (counted, and logged once per rule set).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Annotated

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from foundation.settings import CommonSettings
from ingest.bus import Bus, BusUnavailable, Consumer, open_bus
from ingest.events import EventDecodeError, FeedbackEvent, ResponseEvent, Topics, decode_event, encode_event
from labelers.judge import Judge
from labelers.plugins import Plugin, load_plugins
from labelers.rules import Label, Rule, RuleSet, load_rules
from registry import Registry, RegistryError, open_registry

logger = logging.getLogger(__name__)

LAG_EVERY_S = 5.0
BUS_RETRY_S = 2.0


class LabelerSettings(CommonSettings):
    rules_path: Path | None = None
    """A TOML or YAML rules file (labelers.rules) stored as the current set at start-up; unset: the
    set `PUT /v1/rules` stored, if any."""

    labeler_group: str = Field("kto-labeler", min_length=1)
    """The consumer group of the labelers (several processes share the answers between them)."""

    labeler_batch: int = Field(500, ge=1)
    """Most answers one poll hands the labeler: each batch is published, then committed (answers)."""

    rules_poll_s: float = Field(2.0, gt=0)
    """How often the current rule set is re-read from the registry (seconds)."""

    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Prometheus metrics on this port (`/metrics`); unset: none."""

    host: str = "127.0.0.1"
    """Interface the metrics listen on (0.0.0.0 in the image)."""

    labelers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Custom labelers to run, by entry point name (labelers.plugins): `KTO_LABELERS=toxicity,pii`."""

    @field_validator("labelers", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value

    judge_url: str | None = None
    """An OpenAI-compatible API for judge rules, up to `/chat/completions` (e.g. `http://judge:8000/v1`)."""

    judge_model: str | None = None
    """The `model` asked; unset: the endpoint's default."""

    judge_api_key: SecretStr | None = None
    """Sent as `Authorization: Bearer …` when set."""

    judge_timeout_s: float = Field(10.0, gt=0)
    """Seconds one judge request may take (seconds)."""

    judge_retries: int = Field(2, ge=0)
    """Retries of a failed judge request (connection error, timeout, 429, 5xx), with backoff."""

    judge_concurrency: int = Field(4, ge=1)
    """Judge requests in flight at once."""


class LabelerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.responses = Counter("kto_labeler_responses_total", "Answers read from the responses topic.", registry=r)
        self.labels = Counter(
            "kto_labeler_labels_total", "Labels written, by rule source and label.", ["source", "label"], registry=r
        )
        self.skipped = Counter("kto_labeler_skipped_total", "Records not labeled, by reason.", ["reason"], registry=r)
        self.lag = Gauge("kto_labeler_lag_records", "Answers on the responses topic not labeled yet.", registry=r)
        self.rule_set = Gauge("kto_labeler_rule_set_version", "The rule set version in use (0: none).", registry=r)
        self.verdicts = Counter(
            "kto_labeler_judge_verdicts_total",
            "Judge verdicts by rule source and outcome: label, abstain (no strict yes/no, or no label for it), "
            "failed (no reply in bounded time), unconfigured (no KTO_JUDGE_URL).",
            ["source", "outcome"],
            registry=r,
        )


def label_event_id(version: int | str, source: str, response_id: str) -> str:
    """The same answer labeled by the same version of a labeler (a rule set's number, a plugin
    package's version) gets the same id, so a repeat is dropped downstream."""
    return hashlib.sha256(f"{version}\0{source}\0{response_id}".encode()).hexdigest()[:32]


def label_event(
    version: int | str, source: str, response: ResponseEvent, label: Label, now: float, weight: float = 1.0
) -> FeedbackEvent:
    assert response.user is not None  # anonymous answers are never labeled
    return FeedbackEvent(
        event_id=label_event_id(version, source, response.response_id),
        response_id=response.response_id,
        user=response.user,
        label=label,
        created_at=now,
        source=source,
        weight=weight,
    )


def labels_for(rule_set: RuleSet, version: int, response: ResponseEvent, now: float) -> list[FeedbackEvent]:
    """The labels the rules other than judge rules give one answer (none for an anonymous one)."""
    if response.user is None:
        return []
    labels = []
    for rule in rule_set.rules:
        if rule.kind == "judge" or not rule.applies_to(response):
            continue
        label = rule.label_of(response.completion)
        if label is not None:
            labels.append(label_event(version, rule.source, response, label, now, rule.weight))
    return labels


def judge_asks(rule_set: RuleSet, response: ResponseEvent) -> list[tuple[Rule, ResponseEvent]]:
    """The judge rules that apply to one answer, as questions for the judge."""
    if response.user is None:
        return []
    return [(rule, response) for rule in rule_set.rules if rule.kind == "judge" and rule.applies_to(response)]


class Labeler:
    """One labeler process's loop; see the module docstring."""

    def __init__(
        self,
        settings: LabelerSettings,
        bus: Bus,
        registry: Registry,
        metrics: LabelerMetrics,
        judge: Judge | None = None,
        plugins: list[Plugin] | None = None,
    ) -> None:
        self.settings, self.bus, self.registry, self.metrics, self.judge = settings, bus, registry, metrics, judge
        self.plugins = plugins or []
        self.topics = Topics(settings.topic_prefix)
        self.rule_set, self.version = RuleSet(), 0
        self._read_at = float("-inf")
        self._unjudged = -1  # the rule set version whose judge rules were reported unjudgeable

    def seed_from_file(self) -> None:
        """Store the rules file as the current set when it differs (RulesFileError if it is bad)."""
        if self.settings.rules_path is None:
            return
        wanted = load_rules(self.settings.rules_path).model_dump(mode="json", exclude_none=True)
        current = self.registry.rules()
        if current is None or current.rules != wanted:
            stored = self.registry.put_rules(wanted, actor="rules-file", reason=str(self.settings.rules_path))
            logger.info("rules file %s stored as rule set version %d", self.settings.rules_path, stored.version)

    def refresh_rules(self, now: float) -> None:
        if now - self._read_at < self.settings.rules_poll_s:
            return
        self._read_at = now
        try:
            current = self.registry.rules()
        except RegistryError as e:
            logger.warning("cannot read the rule set (%s); labeling with version %d meanwhile", e, self.version)
            return
        version = current.version if current else 0
        if version != self.version:
            # Validated when stored; a set a newer release wrote may not parse here: keep the last one.
            try:
                self.rule_set = RuleSet.model_validate(current.rules) if current else RuleSet()
            except ValueError as e:
                logger.error(
                    "rule set version %d cannot be used by this release (%s); keeping %d", version, e, self.version
                )
                return
            self.version = version
            self.metrics.rule_set.set(version)
            logger.info(
                "labeling with rule set version %d: %s", version, [r.name for r in self.rule_set.rules] or "none"
            )

    def run(self, stop: threading.Event) -> None:
        consumer: Consumer | None = None
        lag_at = float("-inf")
        try:
            while not stop.is_set():
                try:
                    if consumer is None:
                        consumer = self.bus.consumer(self.settings.labeler_group, [self.topics.responses])
                    self._label_once(consumer)
                    if time.monotonic() - lag_at >= LAG_EVERY_S:  # a broker round trip on Kafka: not every batch
                        lag_at = time.monotonic()
                        ends = self.bus.end_offsets([self.topics.responses])
                        lag = sum(max(0, end - (consumer.committed(t, p) or 0)) for (t, p), end in ends.items())
                        self.metrics.lag.set(lag)
                except BusUnavailable as e:
                    # A new member starts from the group's last commit: what was polled and not
                    # committed comes again once the bus is back.
                    logger.warning("bus unavailable (%s); retrying in %.0f s", e, BUS_RETRY_S)
                    if consumer is not None:
                        with contextlib.suppress(Exception):
                            consumer.close()
                        consumer = None
                    stop.wait(BUS_RETRY_S)
        finally:
            if consumer is not None:
                consumer.close()

    def _label_once(self, consumer: Consumer) -> None:
        """One batch: poll, label, publish, commit (see the module docstring)."""
        self.refresh_rules(time.monotonic())
        records = consumer.poll(timeout_s=1.0, max_records=self.settings.labeler_batch)
        if not records:
            return
        labels: list[FeedbackEvent] = []
        asks: list[tuple[Rule, ResponseEvent]] = []
        for record in records:
            self.metrics.responses.inc()
            try:
                event = decode_event(record.value)
            except EventDecodeError:
                self.metrics.skipped.labels(reason="undecodable").inc()
                continue
            if not isinstance(event, ResponseEvent):
                self.metrics.skipped.labels(reason="not_a_response").inc()
                continue
            if event.user is None:
                self.metrics.skipped.labels(reason="anonymous").inc()
                continue
            labels += labels_for(self.rule_set, self.version, event, time.time())
            labels += self._plugin_labels(event)
            asks += judge_asks(self.rule_set, event)
        labels += self._judged(asks)
        for label in labels:
            self.metrics.labels.labels(source=label.source, label=label.label).inc()
        if labels:  # durable before the commit below
            self.bus.publish_many(self.topics.feedback, [(e.response_id, encode_event(e)) for e in labels])
        consumer.commit()

    def _plugin_labels(self, response: ResponseEvent) -> list[FeedbackEvent]:
        if response.user is None:
            return []
        labels = []
        for plugin in self.plugins:
            try:
                label = plugin.labeler.label(response)
                if label not in (None, "desirable", "undesirable"):
                    raise ValueError(f"label(response) returned {label!r}, not desirable, undesirable or None")
            except Exception:  # its code, not ours: one bad answer must not stop the labeling
                logger.exception("custom labeler %s failed on %s", plugin.name, response.response_id)
                self.metrics.skipped.labels(reason=f"labeler_error:{plugin.name}").inc()
                continue
            if label is not None:
                labels.append(label_event(plugin.version, plugin.source, response, label, time.time()))
        return labels

    def _judged(self, asks: list[tuple[Rule, ResponseEvent]]) -> list[FeedbackEvent]:
        if not asks:
            return []
        if self.judge is None:
            for rule, _ in asks:
                self.metrics.verdicts.labels(source=rule.source, outcome="unconfigured").inc()
            if self._unjudged != self.version:
                self._unjudged = self.version
                logger.error("rule set %d has judge rules but no judge (KTO_JUDGE_URL): skipping them", self.version)
            return []
        labels = []
        for (rule, response), verdict in zip(asks, self.judge.verdicts(asks)):
            self.metrics.verdicts.labels(source=rule.source, outcome=verdict.outcome).inc()
            if verdict.outcome == "failed":
                logger.warning("judge gave no verdict on %s for %s: %s", response.response_id, rule.name, verdict.error)
            elif verdict.label is not None:
                labels.append(label_event(self.version, rule.source, response, verdict.label, time.time(), rule.weight))
        return labels


def run_labeler(settings: LabelerSettings, stop: threading.Event | None = None) -> None:
    """`kto-loop label`: open the bus and the registry, seed the rules file, label until stopped
    (by `stop`, or else SIGINT/SIGTERM)."""
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    metrics = LabelerMetrics()
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
    bus = open_bus(settings.bus_url)
    registry = open_registry(settings.registry_url, settings.adapter_dir)
    judge = None
    if settings.judge_url:
        judge = Judge(
            settings.judge_url,
            settings.judge_model,
            api_key=settings.judge_api_key.get_secret_value() if settings.judge_api_key else None,
            timeout_s=settings.judge_timeout_s,
            retries=settings.judge_retries,
            concurrency=settings.judge_concurrency,
        )
    try:
        labeler = Labeler(settings, bus, registry, metrics, judge, load_plugins(settings.labelers))
        labeler.seed_from_file()
        logger.info("labeler up: group %s on %s", settings.labeler_group, labeler.topics.responses)
        labeler.run(stop)
    finally:
        if judge is not None:
            judge.close()
        registry.close()
        bus.close()
