"""Learner benchmark, part 1: one side of the throughput comparison (ours / TRL's KTOTrainer) in its
own subprocess, started by `bench.learner.compare_sides` as

    python -m bench.learner_sides --side ours|trl|both --model PATH --batch B --steps N ... --out FILE

See bench/learner.py's docstring for what is measured and how.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from bench import report

LORA_RANK = 8
LORA_ALPHA = 16
LEARNING_RATE = 1e-3
BETA = 0.1
SEED = 0


def make_texts(tokenizer, n: int, prompt_tokens: int, completion_tokens: int) -> list[tuple[str, str]]:
    """`n` (prompt, completion) texts cut from the shipped corpus at different offsets.

    Cut on token boundaries of the corpus and decoded, so each tokenises back to about the
    requested lengths (the completion one token short: TRL appends EOS, and so does
    `tokenize_like_trl`)."""
    from foundation.models import demo_corpus

    corpus = demo_corpus()
    ids = tokenizer(corpus)["input_ids"]
    need = prompt_tokens + completion_tokens
    while len(ids) < 2 * need:
        ids = ids + ids
    texts = []
    for i in range(n):
        start = (i * 37) % (len(ids) - need)
        prompt = tokenizer.decode(ids[start : start + prompt_tokens])
        completion = tokenizer.decode(ids[start + prompt_tokens : start + need - 1])
        texts.append((prompt, completion))
    return texts


def tokenize_like_trl(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """TRL 1.16's `KTOTrainer._prepare_dataset` for a plain-text example: EOS appended to the
    completion, the prompt and prompt+completion tokenised apart, the completion starting where
    they diverge. Both sides then train on exactly the same token ids (checked in the TRL worker)."""
    if not completion.endswith(tokenizer.eos_token):
        completion = completion + tokenizer.eos_token
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion)["input_ids"]
    n = 0
    while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
        n += 1
    return prompt_ids[:n], full[n:]


def rss_mib() -> float:
    """This process's resident set size now (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Memory:
    """Peak memory above a baseline taken at construction (after imports and the model load)."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = rss_mib()

    def result(self) -> dict[str, Any]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            return {
                "kind": "cuda max_memory_allocated",
                "baseline_mib": self.base,
                "peak_mib": peak,
                "peak_delta_mib": peak - self.base,
            }
        peak = maxrss_mib()
        return {
            "kind": "peak RSS (getrusage maxrss)",
            "baseline_mib": self.base,
            "peak_mib": peak,
            "peak_delta_mib": peak - self.base,
        }


def worker(argv: list[str]) -> None:
    """One subprocess. `--side both`: the timed runs, ours and TRL alternating (which goes first
    alternates too), so that both see the same machine. `--side ours|trl`: one run of that side
    alone, for its peak memory (and nothing else in the process to blur it)."""
    parser = argparse.ArgumentParser(prog="python -m bench.learner_sides")
    parser.add_argument("--side", choices=["ours", "trl", "both"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, required=True)
    parser.add_argument("--completion-tokens", type=int, required=True)
    parser.add_argument("--breakdown-steps", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)

    import torch
    import transformers
    from peft import LoraConfig  # noqa: F401  (imported before the memory baseline)

    transformers.logging.set_verbosity_error()
    sides = ["ours", "trl"] if args.side == "both" else [args.side]
    if "trl" in sides:
        import datasets
        import trl  # noqa: F401

        datasets.disable_progress_bars()

    from foundation.models import default_device, load_model, lora_target_names

    device, _ = default_device()
    n = args.batch * args.steps
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    info: dict[str, dict[str, Any]] = {side: {} for side in sides}
    for repeat in range(args.repeats):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            loaded = load_model(args.model, device=device, dtype=torch.float32)
            texts = make_texts(loaded.tokenizer, n, args.prompt_tokens, args.completion_tokens)
            tokens = [tokenize_like_trl(loaded.tokenizer, p, c) for p, c in texts]
            targets = lora_target_names(loaded.model)  # before either side wraps the model in LoRA layers
            memory = Memory(device.type) if args.side != "both" else None
            meter = report.CpuMeter()
            one = (run_ours if side == "ours" else run_trl)(loaded, texts, tokens, args)
            one["cpu"] = meter.stop()  # other_cores > 0: something else ran on the machine meanwhile
            if memory is not None:
                info[side]["memory"] = memory.result()
            info[side].update(
                {
                    "parameters": sum(p.numel() for p in loaded.model.parameters() if not p.requires_grad),
                    "trainable": one.pop("trainable"),
                    "lora_targets": targets,
                    "mean_tokens": {
                        "prompt": statistics.fmean(len(p) for p, _ in tokens),
                        "completion": statistics.fmean(len(c) for _, c in tokens),
                    },
                }
            )
            runs[side].append(one)
            del loaded, one
            gc.collect()
    if "ours" in sides and args.breakdown_steps:
        loaded = load_model(args.model, device=device, dtype=torch.float32)
        k = args.batch * args.breakdown_steps
        texts = make_texts(loaded.tokenizer, k, args.prompt_tokens, args.completion_tokens)
        tokens = [tokenize_like_trl(loaded.tokenizer, p, c) for p, c in texts]
        info["ours"]["breakdown"] = breakdown_ours(loaded, tokens, args)

    result = {}
    for side in sides:
        got, seconds = runs[side], statistics.median(r["seconds"] for r in runs[side])
        tok = info[side]["mean_tokens"]
        per_example = tok["prompt"] + tok["completion"]
        result[side] = {
            **info[side],
            "side": side,
            "device": device.type,
            "torch_threads": torch.get_num_threads(),
            "runs": got,
            "seconds": seconds,
            "best_seconds": min(r["seconds"] for r in got),
            "examples_per_s": n / seconds,
            "tokens_per_s": n * per_example / seconds,
            "steady_step_s": statistics.median(r["steady_step_s"] for r in got),
        }
        if side == "ours":
            with_ref = statistics.median(r["seconds"] + r["reference_s"] for r in got)
            result[side]["with_reference"] = {
                "seconds": with_ref,
                "examples_per_s": n / with_ref,
                "tokens_per_s": n * per_example / with_ref,
                "reference_s": statistics.median(r["reference_s"] for r in got),
            }
    args.out.write_text(json.dumps(report._clean(result)))


def _examples(tokens: list[tuple[list[int], list[int]]], batch: int):
    """Buffer examples in TRL's order, labels alternating, each KL partner the previous example
    of its micro-batch (the first takes the last): TRL's rotation of completions by +1."""
    from learner.buffer import Example

    examples = []
    for i, (prompt, completion) in enumerate(tokens):
        start = i - i % batch
        partner = start + batch - 1 if i == start else i - 1
        partner = min(partner, len(tokens) - 1)
        examples.append(
            Example(
                response_id=f"r{i}",
                user=None,
                prompt_ids=prompt,
                completion_ids=completion,
                desirable=i % 2 == 0,
                feedback_event_id=f"f{i}",
                labeled_at=0.0,
                adapter_version=None,
                seq=i + 1,
                ref_logp=None,
                kl_partner=f"r{partner}",
                kl_ref_logp=None,
                times_trained=0,
                kl_partner_completion_ids=tokens[partner][1],
            )
        )
    return examples


def _policy(loaded):
    from learner.policy import Policy
    from learner.settings import LearnerSettings

    settings = LearnerSettings(
        lora_rank=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_target_modules="all-linear",
        learning_rate=LEARNING_RATE,
        beta=BETA,
        seed=SEED,
        micro_batch=2,
    )
    return Policy(loaded, settings)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _reference(policy, examples, chunk: int = 32) -> float:
    """`learner.loop._fill_references`, minus the buffer: both reference passes, in chunks of 32."""
    started = time.perf_counter()
    for i in range(0, len(examples), chunk):
        todo = examples[i : i + chunk]
        ref = policy.reference_logps([(e.prompt_ids, e.completion_ids) for e in todo])
        kl_ref = policy.reference_logps([(e.prompt_ids, e.kl_partner_completion_ids) for e in todo])
        for e, r, k in zip(todo, ref.tolist(), kl_ref.tolist()):
            e.ref_logp, e.kl_ref_logp = r, k
    _sync(policy.device)
    return time.perf_counter() - started


def run_ours(loaded, texts, tokens, args) -> dict[str, Any]:
    import torch

    from learner.update import run_update

    policy = _policy(loaded)
    examples = _examples(tokens, args.batch)
    reference_s = _reference(policy, examples)
    batches = [examples[i : i + args.batch] for i in range(0, len(examples), args.batch)]
    optimizer = torch.optim.AdamW(policy.trainable().values(), lr=LEARNING_RATE, weight_decay=0.0)
    step_ends, step_rss = [], [maxrss_mib()]

    def after_step(*_):  # a timestamp after each optimizer step, for the steady-state figure
        _sync(policy.device)
        step_ends.append(time.perf_counter())
        step_rss.append(maxrss_mib())

    optimizer.register_step_post_hook(after_step)
    _sync(policy.device)
    started = time.perf_counter()
    stats = run_update(
        policy, optimizer, batches, beta=BETA, desirable_weight=1.0, undesirable_weight=1.0, max_grad_norm=1.0
    )
    _sync(policy.device)
    seconds = time.perf_counter() - started
    steps = [b - a for a, b in zip(step_ends, step_ends[1:])]
    return {
        "seconds": seconds,
        "reference_s": reference_s,
        "steps": stats.steps,
        "examples": stats.examples,
        "loss": stats.summary()["loss"],
        "steady_step_s": statistics.median(steps) if steps else seconds,
        "first_step_s": step_ends[0] - started if step_ends else None,
        "step_maxrss_mib": step_rss,
        "trainable": sum(p.numel() for p in policy.trainable().values()),
    }


def breakdown_ours(loaded, tokens, args) -> dict[str, float]:
    """One more run of ours with timers around its phases (seconds per step, steps after the first)."""
    import torch

    from learner import update

    policy = _policy(loaded)
    examples = _examples(tokens, args.batch)
    _reference(policy, examples)
    batches = [examples[i : i + args.batch] for i in range(0, len(examples), args.batch)]
    optimizer = torch.optim.AdamW(policy.trainable().values(), lr=LEARNING_RATE, weight_decay=0.0)
    spent: dict[str, float] = {}
    calls = {"logps": 0}
    counting = {"on": False}

    def timed(name, fn):
        def wrapper(*a, **kw):
            _sync(policy.device)
            t = time.perf_counter()
            out = fn(*a, **kw)
            _sync(policy.device)
            if counting["on"]:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
            return out

        return wrapper

    original_logps = policy.logps

    def logps(pairs):
        calls["logps"] += 1
        name = "forward with grad (policy)" if calls["logps"] % 2 else "forward no grad (KL pair)"
        return timed(name, original_logps)(pairs)

    policy.logps = logps
    optimizer.step = timed("optimizer step (AdamW)", optimizer.step)  # type: ignore[method-assign]  # profiled in place
    clip = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = timed("grad clip", clip)
    try:
        kwargs: dict[str, Any] = dict(beta=BETA, desirable_weight=1.0, undesirable_weight=1.0, max_grad_norm=1.0)
        update.run_update(policy, optimizer, batches[:1], **kwargs)  # warm-up step, not counted
        counting["on"] = True
        started = time.perf_counter()
        update.run_update(policy, optimizer, batches[1:], **kwargs)
        total = time.perf_counter() - started
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    n = max(1, len(batches) - 1)
    out = {k: v / n for k, v in spent.items()}
    out["backward + loss + bookkeeping"] = total / n - sum(out.values())
    out["total"] = total / n
    return out


def run_trl(loaded, texts, tokens, args) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import KTOConfig, KTOTrainer

    from foundation.models import lora_target_names

    cuda = loaded.device.type == "cuda"
    n = len(texts)
    dataset = Dataset.from_dict(
        {"prompt": [p for p, _ in texts], "completion": [c for _, c in texts], "label": [i % 2 == 0 for i in range(n)]}
    )
    with tempfile.TemporaryDirectory(prefix="kto-bench-trl-") as out_dir:
        config = KTOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=BETA,
            bf16=cuda,
            use_cpu=not cuda,
            report_to=[],
            logging_steps=10**9,
            save_strategy="no",
            max_length=args.prompt_tokens + args.completion_tokens + 64,
            precompute_ref_log_probs=False,
            disable_dropout=True,
            dataloader_num_workers=0,
            gradient_checkpointing=False,
            disable_tqdm=True,
            seed=SEED,
            optim="adamw_torch",
        )
        peft_config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=lora_target_names(loaded.model),
            task_type="CAUSAL_LM",
        )
        step_ends: list[float] = []
        step_rss = [maxrss_mib()]

        class StepTimer(TrainerCallback):
            def on_step_end(self, *_a, **_kw):
                if cuda:
                    torch.cuda.synchronize()
                step_ends.append(time.perf_counter())
                step_rss.append(maxrss_mib())

        trainer = KTOTrainer(
            model=loaded.model,
            args=config,
            train_dataset=dataset,
            processing_class=loaded.tokenizer,
            peft_config=peft_config,
            callbacks=[StepTimer()],
        )
        prepared = trainer.train_dataset
        assert isinstance(prepared, Dataset)  # what train_dataset= was, prepared
        same_ids = list(prepared["prompt_ids"]) == [p for p, _ in tokens] and list(prepared["completion_ids"]) == [
            c for _, c in tokens
        ]
        started = time.perf_counter()
        output = trainer.train()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        steps = [b - a for a, b in zip(step_ends, step_ends[1:])]
        assert trainer.model is not None
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "seconds": seconds,
        "steps": output.global_step,
        "examples": output.global_step * args.batch,
        "loss": output.training_loss,
        "steady_step_s": statistics.median(steps) if steps else seconds,
        "first_step_s": step_ends[0] - started if step_ends else None,
        "same_token_ids_as_ours": same_ids,
        "step_maxrss_mib": step_rss,
        "trainable": trainable,
    }


if __name__ == "__main__":
    worker(sys.argv[1:])
