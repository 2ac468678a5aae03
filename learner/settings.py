"""The learner's settings (`KTO_*` environment variables, validated at start-up)."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from foundation.settings import CommonSettings
from ingest.events import LABELER_PATTERN, SOURCE_KINDS, source_kind
from ingest.signals import SIGNALS

DEFAULT_SOURCE_WEIGHTS = {
    "human": 1.0,
    "rule": 1.0,
    "judge": 1.0,
    "annotator": 1.0,
    "implicit": 0.5,
    **{f"implicit:{s.name}": s.weight for s in SIGNALS.values()},
}
"""A rule or a judge labels what the operator asked for as surely as a thumb does; they are cheaper,
not weaker, evidence of it. Lower one to let people's thumbs dominate where both label. An
annotator's verdict is a person's explicit one. Implicit signals weigh less: each act is a noisier
verdict than a thumb (the reasoning per signal: ingest.signals)."""


class LearnerSettings(CommonSettings):
    # ---- cadence ----
    min_new_labels: int = Field(32, ge=1)
    """An update starts once this many new labels arrived (labels)."""

    max_wait_s: float = Field(10.0, gt=0)
    """…or once this long passed since the last update with at least `min_labels_on_timer` new ones (seconds)."""

    min_labels_on_timer: int = Field(8, ge=1)
    """New labels needed for a timer-triggered update (labels)."""

    # ---- the update ----
    beta: float = Field(0.3, gt=0)
    """KTO β: how far the policy may move from the reference.

    0.3, not the paper's 0.1: online, each update warm-starts from the last and the gate bounds
    KL to the base, so a small β (a loss that keeps pulling until the implicit reward saturates)
    drove most versions past `max_kl` on the learning suite (bench/learning.py: at 0.1 about 30
    of 35 versions refused on one task, at 0.3 almost none, with larger lifts on every task)."""

    desirable_weight: float | None = Field(None, gt=0)
    """λ_D; unset follows the paper's rule from the live label ratio."""

    undesirable_weight: float | None = Field(None, gt=0)
    """λ_U; unset follows the paper's rule from the live label ratio."""

    source_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SOURCE_WEIGHTS))
    """How much a label of each source counts: it multiplies λ_D or λ_U of that example (and the
    label's own weight, which a rule sets: labelers.rules). Keys are a
    kind (`human`, `rule`, `judge`, `implicit`, `annotator`) or one source (`rule:no-refunds`,
    `implicit:copy`, which wins over its kind); a source named by neither weighs 1. As JSON in `KTO_SOURCE_WEIGHTS`,
    e.g. `{"rule": 0.5}`; what is given replaces the defaults key by key."""

    steps_per_update: int = Field(8, ge=1)
    """Optimizer steps in one update (steps)."""

    micro_batch: int = Field(16, ge=2)
    """Examples per step; at least 2 so the KL reference point z0 has a mismatched pair (examples)."""

    replay_fraction: float = Field(0.5, ge=0, lt=1)
    """Share of each micro-batch drawn from older examples once fresh ones run out (fraction)."""

    max_user_share: float = Field(0.1, gt=0, le=1)
    """Most of one update one rating user's examples may make up (fraction; 1 disables).

    Counted in distinct examples, fresh and replayed, an update counting as at least
    `steps_per_update` x `micro_batch` of them, so a lone rater still trains that share of the
    slots per update. A user's fresh examples beyond it are deferred, not dropped and not
    down-weighted: they wait, oldest first, for later updates, where other users' ratings dilute
    them (deferred examples alone trigger an update only on the `max_wait_s` timer). Deferring
    bounds how far, and how fast, one user's flood can move the model, and costs no compute;
    down-weighting would train the whole flood at once, and Adam all but undoes a loss scale.
    With fewer than 1/share raters busy at once every one of them is capped (to that share of
    the slots): raise it for small deployments."""

    learning_rate: float = Field(1e-3, gt=0)
    """AdamW learning rate of the LoRA weights."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""

    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""

    lora_rank: int = Field(8, ge=1)
    """LoRA rank r."""

    lora_alpha: float = Field(16.0, gt=0)
    """LoRA α (scale α/r)."""

    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Modules LoRA adapts: a list of names (q_proj, …) or `all-linear`."""

    # ---- memory (learner.base_weights; what each mode needs: docs/models.md) ----
    base_dtype: Literal["float32", "bfloat16"] = "float32"
    """How the frozen base model's weights are held: float32 (exact; on CUDA the forward runs
    under bf16 autocast either way) or bfloat16 (half the memory). The adapter trains in float32."""

    quantize: Literal["none", "8bit", "4bit"] = "none"
    """QLoRA: hold the base's linear layers in 8 bits or 4 (NF4, double-quantized) with
    bitsandbytes, the rest in bfloat16; needs an NVIDIA GPU and `uv sync --extra qlora`. The
    adapter trains in float32 and is served on the unquantized base."""

    gradient_checkpointing: bool = False
    """Keep only each layer's input during the forward pass and recompute the rest in the
    backward: activation memory of one layer instead of all, for about a third more compute."""

    seed: int = 0
    """Seed for initialisation and batch sampling."""

    # ---- the gate ----
    held_out_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of examples (by a hash of response_id) never trained on, used by the gate (fraction)."""

    held_out_max: int = Field(128, ge=1)
    """Most recent held-out examples the gate evaluates (examples)."""

    max_kl: float = Field(3.0, gt=0)
    """Gate: mean per-token KL(policy ‖ base) on held-out contexts must stay below this (nats/token).

    3 nats/token lets a rule that reshapes the first tokens through (the demo model, taught its
    corpus by heart, reached 2.3 learning one) and stops an adapter that rewrites every token."""

    accuracy_tolerance: float = Field(0.05, ge=0, le=1)
    """Gate: held-out implicit-reward accuracy may fall at most this far below the parent's (fraction)."""

    activation: Literal["auto", "manual"] = "auto"
    """`auto`: a version that passes the gate goes live (through a canary unless `canary_share`
    is 0 or 1) and the canary controller decides canaries; `manual`: an operator activates
    versions and decides canaries (the controller only reports their evidence)."""

    # ---- the canary (learner.canary) ----
    canary_share: float = Field(0.5, ge=0, le=1)
    """Share of users a new lineage first serves, by a stable hash of user and canary, while
    everyone else stays on the active version; 0 or 1 activates new versions directly (fraction).

    Half: a comparison of two rates is most powerful with equal arms, and the rollback test
    (judged on a version's own ratings) bounds what a bad one costs. At 0.2 the README's
    `simulate --ratings 600` first promoted at rating ~590 and ended +0.17; at 0.5 the canary's
    users learned from rating ~200 on and it ended +0.8 (see the README, "Watch it learn")."""

    canary_alpha: float = Field(0.05, gt=0, lt=1)
    """Error rate of the canary's anytime-valid test, over the whole canary however often it looks:
    the chance of rolling back a version as good as the active one, and of promoting one worse
    by more than `canary_margin` (probability)."""

    canary_margin: float = Field(0.05, ge=0, lt=1)
    """A candidate is promoted once its desirable rate is shown to be at most this far below the
    active version's (absolute difference of rates). Smaller needs more ratings: an equal
    candidate needs about 5000 per side at 0.05, 1200 at 0.1, 270 at 0.2."""

    canary_min_ratings: int = Field(100, ge=1)
    """Ratings each side needs before a promotion; a rollback needs only the evidence (ratings)."""

    canary_tuned_for: int = Field(200, ge=1)
    """Ratings per side at which the test's boundary is tightest (it shapes ρ of the normal
    mixture; any value keeps the error rate) (ratings)."""

    # ---- joining ----
    group_id: str = "kto-learner"
    """Consumer group on the bus."""

    pending_ttl_s: float = Field(600.0, gt=0)
    """A rating whose response has not arrived after this long goes to dead letters (seconds)."""

    poll_timeout_s: float = Field(0.5, gt=0)
    """How long one poll of the bus waits for events (seconds)."""

    # ---- retention (learner.retention): the learner bounds the embedded bus and its buffer ----
    retention_every_s: float = Field(300.0, gt=0)
    """How often bus and buffer retention run (seconds; Kafka's brokers check every 5 minutes too)."""

    bus_retention_s: float | None = Field(7 * 24 * 3600.0, gt=0)
    """Embedded bus: records appended longer ago than this are deleted, except those a consumer
    group has not committed past (seconds; unset: none by age). Kafka: the topics' `retention.ms`."""

    bus_retention_bytes: int | None = Field(2**30, gt=0)
    """Embedded bus: the oldest records of a partition are deleted while its keys and values take
    more than this, except those a consumer group has not committed past (bytes per partition, as
    Kafka's `retention.bytes`; unset: no limit by size). Kafka: the topics' `retention.bytes`."""

    buffer_max_examples: int | None = Field(100_000, ge=2)
    """Most examples the replay buffer keeps: the newest `buffer_recent_share` of them, plus an even
    sample of the older ones (examples; unset: no limit). A running canary's are kept beyond it."""

    buffer_max_age_s: float | None = Field(None, gt=0)
    """Examples whose answer is older than this are dropped (seconds; unset, the default: none by
    age, since the count bounds the disk and old feedback still teaches). Set it for a data policy."""

    buffer_recent_share: float = Field(0.5, gt=0, le=1)
    """Share of `buffer_max_examples` kept as the newest examples; the rest is a sample of the past (fraction)."""

    # ---- metrics ----
    host: str = "127.0.0.1"
    """Address the metrics endpoint listens on (`--host`). The same KTO_HOST as the server's: in a
    container both must listen on 0.0.0.0 to be scraped."""

    metrics_port: int | None = Field(None, ge=0, le=65535)
    """TCP port of the learner's `/metrics` and `/healthz` (`kto-loop learn --port`); unset serves
    none, 0 picks a free one. Not KTO_PORT: under `kto-loop up` the server beside it owns that."""

    @field_validator("bus_retention_s", "bus_retention_bytes", "buffer_max_examples", "buffer_max_age_s", mode="before")
    @classmethod
    def _empty_is_no_limit(cls, value):
        # `KTO_BUS_RETENTION_S=`, `none` or -1 (Kafka's way of writing it) mean no limit.
        return None if value in ("", "none", "None", "-1", -1) else value

    @field_validator("source_weights")
    @classmethod
    def _known_sources(cls, value: dict[str, float]) -> dict[str, float]:
        for key, weight in value.items():
            if key not in SOURCE_KINDS and not re.match(LABELER_PATTERN, key):
                raise ValueError(
                    f"source_weights: {key!r} is neither a kind {SOURCE_KINDS} nor a source like rule:<name>"
                    " or implicit:<signal>"
                )
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"source_weights: {key!r} must weigh a finite number >= 0, not {weight}")
        return {**DEFAULT_SOURCE_WEIGHTS, **value}

    def source_weight(self, source: str) -> float:
        """The weight of a label from `source` (see `source_weights`)."""
        weights = self.source_weights
        return weights.get(source, weights.get(source_kind(source), 1.0))

    @model_validator(mode="after")
    def _weights_together(self):
        if (self.desirable_weight is None) != (self.undesirable_weight is None):
            raise ValueError("set both desirable_weight and undesirable_weight, or neither (the paper's rule)")
        return self
