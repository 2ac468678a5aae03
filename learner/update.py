"""One incremental update: K optimizer steps of the KTO loss on micro-batches.

Each micro-batch mixes fresh labels (not trained on yet) with replayed older ones. Reference
log-probs come from the buffer (computed once, when the example entered it); only the policy's
forward passes run here: one with gradient on (prompt, completion), one without on the fixed
mismatched pair (prompt, partner's completion) for the KL reference point z0.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from learner.buffer import Example, ExampleRef
from learner.loss import kto_loss
from learner.policy import Policy

logger = logging.getLogger(__name__)


@dataclass
class UpdateStats:
    steps: int = 0
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)
    z0: list[float] = field(default_factory=list)
    reward_desirable: list[float] = field(default_factory=list)
    reward_undesirable: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        return {
            "steps": self.steps,
            "examples": self.examples,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "loss": mean(self.loss),
            "z0": mean(self.z0),
            "reward_desirable": mean(self.reward_desirable),
            "reward_undesirable": mean(self.reward_undesirable),
        }


def user_limit(counts: list[int], *, share: float, nominal: int) -> int:
    """Most examples one user may have in an update whose users offer ``counts`` examples each:
    the largest q with q <= share * max(nominal, sum(min(n, q))), at least 1.

    An update counts as at least ``nominal`` examples (its planned steps x micro-batch slots), so
    a lone rater still trains ``share * nominal`` per update; with many raters the limit grows
    with everyone else's examples. (share * max(...) - q is concave and 0 at q = 0, so the q that
    fit form an interval from 0: counting up finds its end.)"""
    q = 0
    while q < max(counts, default=0) and q + 1 <= share * max(nominal, sum(min(n, q + 1) for n in counts)):
        q += 1
    return max(q, 1)


def cap_users(
    fresh: list[Example], replay_pool: Sequence[Example | ExampleRef], *, share: float, nominal: int, rng: random.Random
) -> tuple[list[Example], list[Example | ExampleRef]]:
    """Fresh examples and replay pool cut so that no rating user has more than ``user_limit`` of
    them: each user's oldest fresh examples first (by seq, so deferred ones drain in order), then
    replay up to the same limit. The fresh examples cut are the caller's to defer."""
    limit = user_limit(list(Counter(e.user for e in fresh).values()), share=share, nominal=nominal)
    kept: list[Example] = []
    per_user: Counter[str | None] = Counter()
    for e in sorted(fresh, key=lambda e: e.seq):
        if per_user[e.user] < limit:
            kept.append(e)
            per_user[e.user] += 1
    by_user: dict[str | None, list[Example | ExampleRef]] = defaultdict(list)
    for item in replay_pool:
        by_user[item.user].append(item)
    pool: list[Example | ExampleRef] = []
    for user, examples in by_user.items():
        room = max(0, limit - per_user[user])
        pool += examples if len(examples) <= room else rng.sample(examples, room)
    return kept, pool


def plan_batches(
    fresh: list[Example],
    replay_pool: Sequence[Example | ExampleRef],
    *,
    steps: int,
    size: int,
    replay_fraction: float,
    rng: random.Random,
    max_user_share: float = 1.0,
) -> list[list[Example | ExampleRef]]:
    """At least `steps` micro-batches, more if needed so every fresh example is trained once;
    the rest of each batch is replayed. The replay pool may hold light ``ExampleRef``s (planning
    needs only ids, users and labels): the caller loads the ones picked.

    With ``max_user_share`` < 1 the examples are first cut by ``cap_users``: the fresh examples
    it leaves out are not in any batch (the caller defers them to a later update)."""
    if max_user_share < 1:
        fresh, replay_pool = cap_users(fresh, replay_pool, share=max_user_share, nominal=steps * size, rng=rng)
    batches: list[list[Example | ExampleRef]] = []
    order = list(fresh)
    rng.shuffle(order)
    cursor = 0
    step = 0
    while step < steps or cursor < len(order):
        step += 1
        n_replay = min(len(replay_pool), int(size * replay_fraction)) if replay_pool else 0
        take = min(size - n_replay, len(order))  # distinct fresh examples in one batch
        batch: list[Example | ExampleRef] = []
        seen: set[str] = set()
        while len(batch) < take:
            candidate = order[cursor % len(order)]
            cursor += 1
            if cursor % len(order) == 0:
                rng.shuffle(order)
            if candidate.response_id not in seen:
                batch.append(candidate)
                seen.add(candidate.response_id)
        pool = [e for e in replay_pool if e.response_id not in seen]
        batch += rng.sample(pool, min(len(pool), size - len(batch)))
        if len(batch) >= 2:  # z0 needs a mismatched pair
            batches.append(batch)
    return batches


def run_update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    batches: list[list[Example]],
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    max_grad_norm: float,
    source_weight: Callable[[str], float] = lambda source: 1.0,
) -> UpdateStats:
    stats = UpdateStats()
    started = time.perf_counter()
    params = list(policy.trainable().values())
    for batch in batches:
        device = policy.device
        pairs = [(e.prompt_ids, e.completion_ids) for e in batch]
        kl_pairs = [e.kl_pair() for e in batch]
        ref = torch.tensor([e.ref_logp for e in batch], device=device)
        kl_ref = torch.tensor([e.kl_ref_logp for e in batch], device=device)
        desirable = torch.tensor([e.desirable for e in batch], device=device)
        weights = torch.tensor([source_weight(e.source) * e.weight for e in batch], device=device)

        with torch.no_grad():  # z0 is detached in the loss: no graph needed (and first, so the
            kl_logps = policy.logps(kl_pairs)  # graph below never shares the heap with these logits)
        policy_logps = policy.logps(pairs)
        loss, losses, z0 = kto_loss(
            policy_logps,
            ref,
            kl_logps,
            kl_ref,
            desirable,
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
            example_weights=weights,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()

        rewards = (beta * (policy_logps.detach() - ref)).float()
        stats.steps += 1
        stats.examples += len(batch)
        stats.tokens += sum(len(p) + len(c) for p, c in pairs)
        stats.loss.append(float(loss.detach()))
        stats.z0.append(float(z0))
        if desirable.any():
            stats.reward_desirable.append(float(rewards[desirable].mean()))
        if (~desirable).any():
            stats.reward_undesirable.append(float(rewards[~desirable].mean()))
        del loss, losses, policy_logps, kl_logps  # free this step's graph before the next forward
    stats.seconds = time.perf_counter() - started
    return stats
