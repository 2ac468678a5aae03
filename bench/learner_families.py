"""Learner benchmark, part 1b: the throughput comparison on a tiny model of each family users bring.

For every family of `testkit.model_families` (Llama 3, Qwen 2.5, Qwen 3, Mistral, Gemma 2,
Gemma 3, Phi-3, GPT-2) its tiny random model (the family's real transformers class, its own
tokenizer; hidden 32, 2 layers) is built and `bench.learner.compare_sides` times ours against TRL's
KTOTrainer on it, as for the Llama models of part 1 but with `family_steps` x B examples,
`family_repeats` runs per side and no peak-memory workers. Both sides put LoRA on the layers
`foundation.models.lora_target_names` finds (every Linear and GPT-2's Conv1D but the LM head).
A family whose comparison fails is reported with its error, never dropped. Skipped with --model.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import report
from bench.learner import ModelSpec, Plan, compare_sides
from bench.learner_sides import SEED

logger = logging.getLogger(__name__)


def measure_families(plan: Plan, tmp: Path) -> list[dict[str, Any]]:
    from testkit.model_families import FAMILIES, HEADS, HIDDEN, LAYERS, build_family_model

    per_family = replace(plan, repeats=plan.family_repeats, breakdown_steps=0)
    rows = []
    for name, family in FAMILIES.items():
        row: dict[str, Any] = {"family": name, "model_class": family.model_class}
        try:
            path = build_family_model(family, tmp / f"family-{name}", seed=SEED)
            spec = ModelSpec(f"{name} (h{HIDDEN}, {LAYERS} layers)", HIDDEN, LAYERS, HEADS, plan.family_steps)
            row |= compare_sides(spec, path, per_family, tmp, memory=False)
        except Exception as exc:  # one family's failure is a result: reported in the table
            logger.warning("family %s failed: %s", name, exc)
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def make_targets(families: list[dict[str, Any]]) -> list[report.Target]:
    """Part 1's goal (ours ≥ 1.5x TRL examples/s) per family; a failed family is a MISS."""
    return [
        report.Target(
            f"ours / TRL examples/s, {f['family']}", f.get("ratio_examples_per_s", float("nan")), ">=", 1.5, "x"
        )
        for f in families
    ]


def table(families: list[dict[str, Any]], plan: Plan) -> str:
    if not families:
        return ""
    rows, notes = [], []
    for f in families:
        if "error" in f:
            rows.append([f["family"], f["model_class"], "error (below)", *[""] * 7])
            notes.append(f"   {f['family']}: {f['error'][-1500:]}")
            continue
        o, r = f["ours"], f["trl"]
        rows.append(
            [
                f["family"],
                f["model_class"],
                ",".join(o["lora_targets"]),
                o["trainable"] if o["trainable"] == r["trainable"] else f"{o['trainable']} vs TRL {r['trainable']}",
                o["examples_per_s"],
                r["examples_per_s"],
                f["ratio_examples_per_s"],
                f["ratio_steady_step"],
                f["same_token_ids"],
                abs(f["loss"]["ours"] - f["loss"]["trl"]),
            ]
        )
        notes.append(
            f"   {f['family']}: runs (s) ours {[round(x['seconds'], 2) for x in o['runs']]}, TRL "
            f"{[round(x['seconds'], 2) for x in r['runs']]}; cores busy with other work: ours "
            f"{[report.fmt(x['cpu']['other_cores']) for x in o['runs']]}, TRL "
            f"{[report.fmt(x['cpu']['other_cores']) for x in r['runs']]}"
        )
    title = (
        f"1b. Learner throughput per model family (tiny random models, {plan.family_steps} steps x {plan.batch} "
        f"examples, median of {plan.family_repeats} run(s) per side, sides alternating; LoRA on every layer "
        "lora_target_names finds, the same on both sides)"
    )
    columns = [
        "family",
        "model class",
        "LoRA targets",
        "trainable",
        "examples/s ours",
        "examples/s TRL",
        "x TRL",
        "steady step x TRL",
        "same token ids",
        "|loss ours - TRL|",
    ]
    return report.table(title, columns, rows) + "\n" + "\n".join(notes) + "\n"
