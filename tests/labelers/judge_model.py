"""A tiny judge for the tests: a character-level model taught, in a few seconds, to reply to the
labeler's judge prompt by its question: "is it fine" → "yes", "is it bad" → "no", "is it odd" →
"hmm" (which the labeler cannot parse, so it abstains)."""

from __future__ import annotations

import random
from pathlib import Path

from foundation.models import build_tiny_model, teach_chats
from ingest.events import ResponseEvent, SamplingParams
from labelers.judge import judge_messages

REPLIES = {"is it fine": "yes", "is it bad": "no", "is it odd": "hmm"}
ALPHABET = "abcdefghijklmnopqrstuvwxyz .:?\n0123456789-"


def answer(i: int, text: str, user: str = "u1") -> ResponseEvent:
    return ResponseEvent(
        response_id=f"resp-{i}",
        user=user,
        base_model="tiny",
        adapter_version=None,
        messages=[{"role": "user", "content": "hello"}],
        prompt_token_ids=[1],
        completion=text,
        completion_token_ids=[2],
        finish_reason="stop",
        sampling=SamplingParams(max_tokens=8, temperature=1.0, top_p=1.0),
    )


def build_judge_model(path: Path, steps: int = 150) -> Path:
    build_tiny_model(path, alphabet=ALPHABET, hidden_size=64, num_layers=2, num_heads=2, seed=3, init_std=0.1)
    rng = random.Random(0)
    chats = []
    for i in range(48):
        question = list(REPLIES)[i % len(REPLIES)]
        text = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 20)))
        chats.append([*judge_messages(question, answer(i, text)), {"role": "assistant", "content": REPLIES[question]}])
    teach_chats(path, chats, steps=steps, lr=1e-2)
    return path
