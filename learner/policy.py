"""The policy being trained: the base model with one LoRA adapter, "policy".

The reference policy is the same model with the adapter disabled (no second copy of the
weights). Log-probs are sums over completion tokens only, computed on the token ids exactly as
they were served. On CUDA the forward passes run under bf16 autocast with fp32 master weights;
on CPU everything is fp32 — the same code either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from foundation.models import LoadedModel, ModelRefused, lora_target_names
from learner.loss import sequence_logps
from learner.settings import LearnerSettings

logger = logging.getLogger(__name__)

ADAPTER = "policy"


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded (prompt + completion) ids, attention mask, and a mask of completion tokens."""
    length = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), length), dtype=torch.long)
    completion = torch.zeros((len(pairs), length), dtype=torch.bool)
    for i, (prompt, answer) in enumerate(pairs):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer, dtype=torch.long)
        attention[i, :n] = 1
        completion[i, len(prompt) : n] = True
    return ids.to(device), attention.to(device), completion.to(device)


def _enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}  # no inputs that require grad needed, unlike the reentrant kind
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' newer name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # the vllm extra resolves an older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _checkpoint_in_eval(model: torch.nn.Module) -> None:
    """transformers checkpoints a decoder layer only in training mode; set that flag on the
    layers alone (not recursively), so that their dropout stays off."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ModelRefused(
            f"{type(model).__name__} has no layer transformers can checkpoint: unset KTO_GRADIENT_CHECKPOINTING"
        )
    for layer in layers:
        layer.training = True


class Policy:
    def __init__(self, loaded: LoadedModel, settings: LearnerSettings):
        from peft import LoraConfig, get_peft_model

        self.loaded = loaded
        self.device = loaded.device
        self.pad_id = loaded.tokenizer.pad_token_id
        torch.manual_seed(settings.seed)
        targets = settings.lora_target_modules
        available = lora_target_names(loaded.model)
        if targets == "all-linear":
            # Short names (q_proj, …), not PEFT's expansion into full paths: that is what serve checks.
            targets = available
        elif missing := sorted(set(targets) - set(available)):
            raise ModelRefused(
                f"KTO_LORA_TARGET_MODULES names {missing}, which {loaded.model_id} does not have; "
                f"its layers a LoRA adapter can take: {available} (or leave it at all-linear)"
            )
        config = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides by r
            lora_dropout=0.0,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        if settings.gradient_checkpointing:
            _enable_checkpointing(loaded.model)
        self.model = get_peft_model(loaded.model, config, adapter_name=ADAPTER)
        self.model.eval()  # dropout off, as TRL's disable_dropout does; gradients still flow
        if settings.gradient_checkpointing:
            _checkpoint_in_eval(self.model)
        lora_config = self.model.peft_config[ADAPTER]
        assert isinstance(lora_config, LoraConfig)  # as given to get_peft_model above
        self.config = lora_config
        self._initial = {k: v.detach().clone() for k, v in self.trainable().items()}

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- log-probs ----------------------------------------------------------------------------

    def logps(self, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Summed completion log-probs under the policy (with grad when grad is enabled)."""
        ids, attention, completion = collate(pairs, self.pad_id, self.device)
        with self.autocast():
            logits = self.model(input_ids=ids, attention_mask=attention).logits
        return sequence_logps(logits, ids, completion)

    @torch.no_grad()
    def reference_logps(self, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Summed completion log-probs under the base model (the adapter disabled)."""
        with self.model.disable_adapter():
            return self.logps(pairs)

    @torch.no_grad()
    def token_kl(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
        """Σ over completion positions of KL(policy ‖ base) of the next-token distributions, and the count."""
        ids, attention, completion = collate(pairs, self.pad_id, self.device)
        with self.autocast():
            policy = self.model(input_ids=ids, attention_mask=attention).logits.float()
            with self.model.disable_adapter():
                base = self.model(input_ids=ids, attention_mask=attention).logits.float()
        # logits at t predict token t+1: the positions that predict completion tokens
        where = completion[:, 1:]
        p_log = torch.log_softmax(policy[:, :-1][where], dim=-1)
        b_log = torch.log_softmax(base[:, :-1][where], dim=-1)
        kl = (p_log.exp() * (p_log - b_log)).sum()
        return float(kl), int(where.sum())

    # ---- weights ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to a fresh adapter (equal to the base model: LoRA B starts at zero)."""
        with torch.no_grad():
            for name, p in self.trainable().items():
                p.copy_(self._initial[name])

    def load(self, adapter_dir: Path) -> bool:
        """Warm-start from a published version; False (and a reset) when its shape differs."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        if config.get("r") != self.config.r or set(config.get("target_modules") or []) != set(
            self.config.target_modules or []
        ):
            logger.warning(
                "version at %s has another LoRA shape (r=%s); starting from a fresh adapter",
                adapter_dir,
                config.get("r"),
            )
            self.reset()
            return False
        state = load_file(str(adapter_dir / "adapter_model.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.model, state, adapter_name=ADAPTER)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            logger.warning("unexpected keys loading %s: %s", adapter_dir, unexpected[:3])
        return True

    def finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.trainable().values())

    def save(self, path: Path, base_model_id: str) -> None:
        """A PEFT adapter directory whose config names the served base model."""
        self.model.save_pretrained(str(path), selected_adapters=[ADAPTER], save_embedding_layers=False)
        saved = path / ADAPTER if (path / ADAPTER).is_dir() else path
        config_path = saved / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model_id
        config_path.write_text(json.dumps(config, indent=2))
        if saved != path:  # PEFT nests non-default adapters in a sub-directory
            for item in saved.iterdir():
                item.rename(path / item.name)
            saved.rmdir()
