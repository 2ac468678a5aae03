"""The learning benchmark's offline baseline: TRL's KTOTrainer, trained after the fact on the very
labels a run's users sent (the same demo model, LoRA rank and α on the same modules, β, learning
rate and the paper's weights for the label ratio), against the version the loop had active at the
end; both scored the same way, by sampling answers in this process and judging them by the task's
rules.

Offline KTO sees every label at once and trains TRL's default 3 epochs over them; the loop saw
each label once it arrived, in updates of a few steps, behind its gate and canary. The ratio of
their lifts over the base model says how much of offline KTO's gain the online loop delivers
from the same labels.

Runs in its own process (`python -m bench.offline_kto SPEC.json OUT.json`), so that TRL's
training does not share the benchmark's interpreter with the simulated users of other runs.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench.learning")

EPOCHS = 3
"""TRL's default `num_train_epochs`."""
SCORED_ANSWERS = 600
"""Answers sampled to score each model (per model)."""


def run_offline(
    model_dir: Path,
    turns: list,
    rules: list[str],
    *,
    max_tokens: int,
    seed: int,
    active_adapter: Path | None,
    workdir: Path,
) -> dict[str, Any]:
    """Train offline on the rated `turns` and score it, the base model and the loop's active
    adapter, in a subprocess; its JSON result."""
    spec = {
        "model": str(model_dir),
        "rules": rules,
        "max_tokens": max_tokens,
        "seed": seed,
        "active_adapter": str(active_adapter) if active_adapter else None,
        "examples": [
            {"prompt": t.prompt, "answer": t.answer, "label": t.desirable} for t in turns if t.desirable is not None
        ],
    }
    spec_path, out_path = workdir / "offline-spec.json", workdir / "offline-result.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bench.offline_kto", str(spec_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        logger.error("offline KTO failed:\n%s", done.stderr[-3000:])
        return {"error": done.stderr[-500:]}
    return {**json.loads(out_path.read_text()), "seconds": time.perf_counter() - started}


def train(model_dir: str, examples: list[dict], out_dir: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """TRL's KTOTrainer with the learner's LoRA, β, learning rate and weights rule; the adapter."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import KTOConfig, KTOTrainer

    from foundation.models import load_model
    from learner.loss import paper_weights
    from learner.settings import LearnerSettings

    defaults = LearnerSettings(_env_file=None)
    loaded = load_model(model_dir, device="cpu", dtype=torch.float32)
    n_d = sum(e["label"] for e in examples)
    w_d, w_u = paper_weights(n_d, len(examples) - n_d)
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": e["prompt"]}] for e in examples],
            "completion": [[{"role": "assistant", "content": e["answer"]}] for e in examples],
            "label": [bool(e["label"]) for e in examples],
        }
    )
    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in loaded.model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
        }
    )
    config = KTOConfig(
        output_dir=str(out_dir / "trl"),
        per_device_train_batch_size=defaults.micro_batch,
        num_train_epochs=EPOCHS,
        learning_rate=defaults.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=defaults.max_grad_norm,
        beta=defaults.beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=10**9,
        save_strategy="no",
        disable_dropout=True,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=seed,
        optim="adamw_torch",
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=defaults.lora_rank,
        lora_alpha=defaults.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides by r
        lora_dropout=0.0,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    trainer = KTOTrainer(
        model=loaded.model,
        args=config,
        train_dataset=dataset,
        processing_class=loaded.tokenizer,
        peft_config=peft_config,
    )
    output = trainer.train()
    adapter = out_dir / "offline-adapter"
    trained = trainer.model
    assert isinstance(trained, PeftModel)  # peft_config= had the trainer wrap the model
    trained.save_pretrained(str(adapter))
    return adapter, {
        "examples": len(examples),
        "desirable": n_d,
        "steps": output.global_step,
        "loss": output.training_loss,
        "weights": [w_d, w_u],
        "epochs": EPOCHS,
        "beta": defaults.beta,
        "lr": defaults.learning_rate,
        "lora_rank": defaults.lora_rank,
    }


def score(
    model_dir: str, adapter: str | None, rules: list[str], *, answers: int, max_tokens: int, seed: int, batch: int = 64
) -> dict[str, Any]:
    """Sample `answers` answers (temperature 1, the simulated users' prompts in turn) from the
    model with `adapter` (None: the base), as the server samples; the share the rules like."""
    import torch

    from foundation.models import eos_token_ids, load_model, render_prompt
    from kto_loop.simulate import PROMPTS, Raters, parse_rule

    raters = Raters(tuple(parse_rule(r) for r in rules))
    loaded = load_model(model_dir, device="cpu", dtype=torch.float32)
    # A PreTrainedModel or a PeftModel: transformers types generate() on neither.
    model: Any = loaded.model
    tokenizer = loaded.tokenizer
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    torch.manual_seed(seed)
    liked, texts = 0, []
    for start in range(0, answers, batch):
        prompts = [
            render_prompt(tokenizer, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
            for i in range(start, min(answers, start + batch))
        ]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_tokens,
                eos_token_id=sorted(eos_token_ids(loaded)),
                pad_token_id=tokenizer.pad_token_id,
            )
        for text in tokenizer.batch_decode(out[:, width:].tolist(), skip_special_tokens=True):
            texts.append(text)
            liked += raters.likes(text)
    return {"answers": len(texts), "liked": liked, "rate": liked / len(texts), "sample": texts[:5]}


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(argv[0]).read_text())
    import torch

    torch.set_num_threads(1)  # other runs share the machine
    common = {"answers": SCORED_ANSWERS, "max_tokens": spec["max_tokens"], "seed": spec["seed"]}
    with tempfile.TemporaryDirectory(prefix="kto-offline-") as tmp:
        started = time.perf_counter()
        adapter, training = train(spec["model"], spec["examples"], Path(tmp), spec["seed"])
        training["seconds"] = time.perf_counter() - started
        result = {
            "training": training,
            "base": score(spec["model"], None, spec["rules"], **common),
            "offline": score(spec["model"], str(adapter), spec["rules"], **common),
            "loop_active": score(spec["model"], spec["active_adapter"], spec["rules"], **common)
            if spec["active_adapter"]
            else None,
        }
    Path(argv[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
