"""A tiny judge for the tests: a character-level model taught, in a few seconds, to reply to the
labeler's judge prompt by its question: "is it fine" → "yes", "is it bad" → "no", "is it odd" →
"hmm" (which the labeler cannot parse, so it abstains)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from foundation.models import build_tiny_model, load_model, render_prompt
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
    loaded = load_model(path, device=torch.device("cpu"), dtype=torch.float32)
    tokenizer, model = loaded.tokenizer, loaded.model
    rng = random.Random(0)
    rows = []
    for i in range(48):
        question = list(REPLIES)[i % len(REPLIES)]
        text = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 20)))
        chat = [*judge_messages(question, answer(i, text)), {"role": "assistant", "content": REPLIES[question]}]
        rows.append([*render_prompt(tokenizer, chat, add_generation_prompt=False), tokenizer.eos_token_id])
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)
    return path
