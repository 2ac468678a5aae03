"""Would vLLM load this adapter? The checks vLLM applies to a PEFT LoRA adapter when it loads one
(`vllm/lora/peft_helper.py` and `vllm/lora/models.py`, vLLM 0.6 to 0.11), run on our files.

Every version the learner publishes is a plain PEFT adapter (adapter_config.json plus
adapter_model.safetensors): `PeftModel.from_pretrained(base, path)` loads it as it is, and these
checks say whether `vllm serve --enable-lora --lora-modules name=path` would too:

1. adapter_config.json names `r`, `lora_alpha` and `target_modules` (PEFTHelper's required fields);
2. `modules_to_save` is empty: vLLM serves no fully trained extra modules;
3. `use_dora` is false: vLLM has no DoRA;
4. `bias` is "none": vLLM has no adapter biases;
5. `r`, and every rank in `rank_pattern`, is at most vLLM's `--max-lora-rank` (16 unless raised);
6. every tensor is a LoRA factor, `base_model.model.<module path>.lora_A.weight` or `.lora_B.weight`
   (vLLM's parse_fine_tuned_lora_name refuses any other name);
7. every tensor's module is one the config targets, and never the output head or the embeddings,
   which vLLM loads only as extra-vocabulary weights.

The one check left to vLLM itself is that its implementation of the architecture takes LoRA on
those modules (its `supported_lora_modules`); the learner targets the model's linear layers only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from registry.store import CONFIG_FILE, WEIGHTS_FILE

VLLM_DEFAULT_MAX_LORA_RANK = 16
_PREFIX = "base_model.model."
_FACTORS = (".lora_A.weight", ".lora_B.weight")
_NEVER_TARGETED = ("lm_head", "embed_tokens", "wte", "embed_in")


def vllm_reasons(path: Path, *, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> list[str]:
    """Why vLLM would refuse the adapter directory at `path`; [] when it would load it."""
    from safetensors import safe_open

    path = Path(path)
    try:
        config: Any = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{CONFIG_FILE} cannot be read: {exc}"]
    if not isinstance(config, dict):
        return [f"{CONFIG_FILE} is not a JSON object"]
    reasons = [f"{CONFIG_FILE} has no {key}" for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if config.get("modules_to_save"):
        reasons.append(f"modules_to_save is {config['modules_to_save']}: vLLM serves no fully trained modules")
    if config.get("use_dora"):
        reasons.append("use_dora is true: vLLM has no DoRA")
    if config.get("bias", "none") != "none":
        reasons.append(f"bias is {config['bias']!r}: vLLM takes only 'none'")
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        reasons.append(f"rank {max(ranks)} is above vLLM's --max-lora-rank {max_lora_rank}: raise it there")
    targets = config.get("target_modules")
    if not (path / WEIGHTS_FILE).is_file():
        return [*reasons, f"{WEIGHTS_FILE} is missing"]
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as weights:
        names = list(weights.keys())
    for name in names:
        if not (name.startswith(_PREFIX) and name.endswith(_FACTORS)):
            reasons.append(f"tensor {name} is not a LoRA factor (base_model.model.<module>.lora_A/B.weight)")
            continue
        module = name[len(_PREFIX) :].rsplit(".", 2)[0].rsplit(".", 1)[-1]
        if module in _NEVER_TARGETED:
            reasons.append(f"tensor {name} adapts {module}, which vLLM takes only as extra vocabulary")
        elif isinstance(targets, list) and module not in targets:
            reasons.append(f"tensor {name} adapts {module}, not among target_modules {targets}")
    return reasons
