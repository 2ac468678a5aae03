"""`kto-loop learn`: from live thumbs to published adapter versions, top to bottom.

Every turn of the loop: consume events into the replay buffer; compute reference log-probs of
new examples (once each); let the canary controller decide a running canary (learner.canary);
when enough new labels arrived (or enough time passed), warm-start from the head (the candidate
of the learner's running canary, else the active version), run K KTO steps, gate the result,
publish it with its lineage, and, when the gate passed and activation is automatic, release it:
start a canary with it, advance the running canary to it, or activate it directly when canaries
are off.

Crash safety: the buffer and its offsets are durable before anything trains on them; a publish
is atomic in the registry; the learner's own state (watermark, optimizer) is written after the
publish, so a crash mid-update retrains the same labels on the next start — from the head, into
a new version — and never counts a rating twice. A turn cut short by a full disk is treated the
same way without the restart: waited out, then the loop turns again (learner.disk_wait).
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Protocol

import torch

from foundation.disk import DiskProbe
from foundation.models import ModelRefused, default_device, ensure_demo_model, set_torch_threads
from ingest.bus import open_bus
from ingest.events import Topics
from learner import erasure
from learner.base_weights import load_base
from learner.buffer import Example, ExampleRef, ReplayBuffer
from learner.canary import CanaryController
from learner.consumer import EventJoiner
from learner.disk_wait import DiskWait
from learner.endpoint import MetricsEndpoint
from learner.gate import decide, evaluate
from learner.loss import paper_weights
from learner.metrics import LearnerMetrics
from learner.policy import Policy
from learner.retention import Retention
from learner.settings import LearnerSettings
from learner.state import LearnerState
from learner.update import plan_batches, run_update
from registry import open_registry

logger = logging.getLogger(__name__)


class HasResponseId(Protocol):
    """What the held-out split reads: an Example, an ExampleRef, or any stand-in with the id."""

    @property
    def response_id(self) -> str: ...


class CannotStart(RuntimeError):
    """A start-up failure that a restart cannot fix (the model cannot be loaded): `kto-loop learn` exits 2."""


def held_out(example: HasResponseId, fraction: float) -> bool:
    """A stable split by response_id: the same example is held out on every run."""
    digest = hashlib.sha256(example.response_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def main(settings: LearnerSettings, stop: threading.Event | None = None, metrics: LearnerMetrics | None = None) -> None:
    stop = stop or _stop_on_signals()
    # ---- metrics first: /healthz answers (and Prometheus sees the learner up) while the model loads ----
    metrics = metrics or LearnerMetrics()
    endpoint = (
        None
        if settings.metrics_port is None
        else MetricsEndpoint(
            metrics.registry, settings.host, settings.metrics_port, alive=lambda: not stop.is_set()
        ).start()
    )
    # ---- set-up: model, policy, backends, the learner's own state ----
    set_torch_threads(settings.torch_threads)
    device, _ = default_device()
    model_path = settings.model or ensure_demo_model(settings.data_dir)
    try:
        loaded = load_base(model_path, settings, device)
        policy = Policy(loaded, settings)
    except ModelRefused as exc:
        raise CannotStart(str(exc)) from exc
    except Exception as exc:
        raise CannotStart(f"the model {model_path} cannot be loaded: {exc}") from exc
    topics = Topics(settings.topic_prefix)
    bus = open_bus(settings.bus_url)
    bus.create_topics(topics.all, settings.topic_partitions)
    registry = open_registry(settings.registry_url, settings.adapter_dir)
    work_dir = settings.data_dir / "learner"
    buffer = ReplayBuffer(work_dir / "buffer.sqlite3")
    metrics.watch_buffer(buffer.counts)
    joiner = EventJoiner(bus, topics, buffer, group_id=settings.group_id, pending_ttl_s=settings.pending_ttl_s)
    state = LearnerState.load(work_dir / "state.pt")
    canary = CanaryController(registry, buffer, settings, metrics)
    retention = Retention(bus, buffer, registry, settings, metrics)
    metrics.disk.probe = DiskProbe(settings.written_paths(), int(settings.disk_reserve_mb * 2**20))
    disk = DiskWait(metrics.disk.probe, metrics, stop)
    rng = random.Random(settings.seed)
    optimizer = None
    last_update = time.monotonic()
    logger.info("learner up: %s on %s, watermark %d", settings.base_model_id, device, state.watermark)

    try:
        while not stop.is_set():
            # ---- 0. retention: bound the bus and the buffer, every KTO_RETENTION_EVERY_S (before
            #      the disk check: deleting is what frees a disk the bus filled) ----
            retention.tick()
            with disk:  # a turn cut short by a full disk is waited out, then the loop turns again
                disk.check()  # under the reserve: wait before writing anything
                # ---- 1. consume: events become durable examples, then offsets are committed ----
                joiner.poll_once(timeout_s=settings.poll_timeout_s)
                metrics.refresh_lag(joiner.lag)

                # ---- 2. reference log-probs, once per example, while it enters the buffer ----
                _fill_references(policy, buffer)

                # ---- 2b. the canary: promote, roll back, or report its evidence; erasures to the registry ----
                canary.step()
                erasure.report(buffer, registry)

                # ---- 3. is an update due? ----
                #      (examples the per-user cap deferred count only on the timer)
                fresh = [e for e in buffer.fresh(state.watermark) if not held_out(e, settings.held_out_fraction)]
                waited = time.monotonic() - last_update
                if not (
                    len(fresh) >= settings.min_new_labels
                    or (
                        waited >= settings.max_wait_s
                        and len(fresh) + len(state.deferred) >= settings.min_labels_on_timer
                    )
                ):
                    continue
                last_update = time.monotonic()
                watermark = buffer.max_seq()
                # Planned on the light index; only the examples picked are loaded with their tokens.
                index = buffer.index()
                test = buffer.load(
                    [r.response_id for r in index if held_out(r, settings.held_out_fraction)][-settings.held_out_max :]
                )
                waiting = set(state.deferred)  # a relabeled one is in `fresh` already, with a new seq
                fresh += buffer.load(
                    [r.response_id for r in index if r.response_id in waiting and r.seq <= state.watermark]
                )
                fresh_ids = {e.response_id for e in fresh}
                replay = [
                    r
                    for r in index
                    if not held_out(r, settings.held_out_fraction)
                    and r.seq <= state.watermark
                    and r.response_id not in fresh_ids
                ]

                # ---- 4. warm-start from the head: the candidate of the learner's canary while one
                #      runs (its lineage goes on learning, learner.canary), else the active version ----
                parent = canary.head()
                if parent is None:
                    policy.reset()
                elif parent != state.version or optimizer is None:
                    policy.load(registry.adapter_path(parent))
                if optimizer is None or parent != state.version:
                    optimizer = torch.optim.AdamW(
                        policy.trainable().values(), lr=settings.learning_rate, weight_decay=settings.weight_decay
                    )
                    if parent is not None and parent == state.version and state.optimizer is not None:
                        optimizer.load_state_dict(state.optimizer)  # same lineage: keep the moments
                before = evaluate(policy, test)
                logger.info(
                    "update starting: %d fresh labels, %d to replay, parent %s",
                    len(fresh),
                    len(replay),
                    parent or "base",
                )

                # ---- 5. K steps of KTO on fresh labels mixed with replay ----
                n_d = sum(e.desirable for e in fresh + replay)
                if settings.desirable_weight is not None and settings.undesirable_weight is not None:
                    weights = (settings.desirable_weight, settings.undesirable_weight)  # both or neither: settings
                else:
                    weights = paper_weights(n_d, len(fresh + replay) - n_d)
                planned = plan_batches(
                    fresh,
                    replay,
                    steps=settings.steps_per_update,
                    size=settings.micro_batch,
                    replay_fraction=settings.replay_fraction,
                    rng=rng,
                    max_user_share=settings.max_user_share,
                )
                batches = _loaded(buffer, planned)
                stats = run_update(
                    policy,
                    optimizer,
                    batches,
                    beta=settings.beta,
                    desirable_weight=weights[0],
                    undesirable_weight=weights[1],
                    max_grad_norm=settings.max_grad_norm,
                    source_weight=settings.source_weight,
                )

                # ---- 6. the gate ----
                finite = policy.finite()
                # KL on held-out contexts; with none yet, on the fresh ones (a version whose drift went
                # unmeasured would become a head that every descendant inherits)
                after = (
                    evaluate(policy, test, kl_contexts=test or fresh[-settings.held_out_max :]) if finite else before
                )
                gate = decide(
                    after, before, finite=finite, max_kl=settings.max_kl, tolerance=settings.accuracy_tolerance
                )

                # ---- 7. publish with lineage; canary (or activate) it when it passed ----
                trained = {e.response_id: e for batch in batches for e in batch}
                deferred = [e.response_id for e in fresh if e.response_id not in trained]
                by_source = dict(sorted(Counter(e.source for e in trained.values()).items()))
                lineage = {
                    "parent": parent,
                    "feedback_event_ids": sorted(e.feedback_event_id for e in trained.values()),
                    "fresh_examples": len(fresh) - len(deferred),
                    "deferred_examples": len(deferred),
                    "replayed_examples": sum(i not in fresh_ids for i in trained),
                    "labels": {
                        "desirable": sum(e.desirable for e in trained.values()),
                        "undesirable": sum(not e.desirable for e in trained.values()),
                    },
                    "labels_by_source": by_source,
                    "watermark": watermark,
                    "buffer": buffer.counts(),
                    "hyperparameters": {
                        "beta": settings.beta,
                        "weights": list(weights),
                        "source_weights": settings.source_weights,
                        "lr": settings.learning_rate,
                        "steps": settings.steps_per_update,
                        "micro_batch": settings.micro_batch,
                        "lora_rank": settings.lora_rank,
                        "lora_alpha": settings.lora_alpha,
                    },
                    "newest_label_at": max(e.labeled_at for e in fresh),
                }
                version_metrics = {**stats.summary(), "gate": gate.to_json()}
                version = _publish(policy, registry, settings, parent, version_metrics, lineage, gate)
                metrics.observe_update(
                    stats.summary(),
                    passed=gate.passed,
                    reason_codes=gate.codes,
                    seconds=time.monotonic() - last_update,
                    fresh_labeled_at=[e.labeled_at for e in trained.values() if e.seq > state.watermark],
                    published_at=time.time(),
                    labels_by_source=by_source,
                )
                buffer.mark_trained(list(trained), version)
                if gate.passed:
                    state.version, state.optimizer = version, optimizer.state_dict()
                    if settings.activation == "auto":
                        canary.release(version, parent, f"gate passed (loss {stats.summary()['loss']:.4f})")
                else:
                    logger.warning("version %s rejected by the gate: %s", version, "; ".join(gate.reasons))
                    optimizer = None  # the next update starts again from the head
                state.watermark, state.deferred = watermark, deferred
                state.save()
                retention.after_publish()  # what this version replaced goes now, not at the next tick
                logger.info("update -> %s: %s", version, stats.summary())
            if disk.interrupted:
                optimizer = None  # an update may have been cut short: the next one starts again from the head
    finally:
        if endpoint is not None:
            endpoint.close()  # before the buffer it reads at each scrape
        joiner.close()
        buffer.close()
        bus.close()
        registry.close()


def _loaded(buffer: ReplayBuffer, planned: list[list[Example | ExampleRef]]) -> list[list[Example]]:
    """The planned batches with each replayed ExampleRef loaded as its Example."""
    loaded = {
        e.response_id: e
        for e in buffer.load({e.response_id for batch in planned for e in batch if isinstance(e, ExampleRef)})
    }
    batches = [
        [
            e if isinstance(e, Example) else loaded[e.response_id]
            for e in batch
            if isinstance(e, Example) or e.response_id in loaded
        ]
        for batch in planned
    ]
    return [batch for batch in batches if len(batch) >= 2]  # z0 needs a mismatched pair


def _fill_references(policy: Policy, buffer: ReplayBuffer, chunk: int = 32) -> None:
    while todo := buffer.unreferenced(chunk):
        todo = [e for e in todo if e.kl_partner_completion_ids is not None]
        if not todo:
            return
        ref = policy.reference_logps([(e.prompt_ids, e.completion_ids) for e in todo])
        kl_ref = policy.reference_logps([e.kl_pair() for e in todo])
        buffer.set_reference([(e.response_id, float(r), float(k)) for e, r, k in zip(todo, ref, kl_ref)])


def _publish(policy: Policy, registry, settings: LearnerSettings, parent, metrics, lineage, gate) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="kto-adapter-"))
    try:
        policy.save(tmp, settings.base_model_id)
        info = registry.publish(
            tmp,
            base_model=settings.base_model_id,
            parent=parent,
            metrics=metrics,
            lineage=lineage,
            status="ready" if gate.passed else "rejected",
            rejected_reason=None if gate.passed else "gate: " + "; ".join(gate.reasons),
        )
        return info.version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
