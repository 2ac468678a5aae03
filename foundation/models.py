"""Model loading, shared by serve and the learner.

`load_model` goes through the real `from_pretrained` path for any local directory or hub id.
With no model named, `ensure_demo_model` builds a small random Llama plus a byte-level BPE
tokenizer trained on text shipped with the project, so everything works offline. Tests build
their tiny models with `build_tiny_model`, the same code.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported where a model is loaded, not on import
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def _quiet_progress_bars() -> None:
    # transformers draws tqdm bars on every load and save; they only clutter server logs.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


DEMO_MODEL_ID = "kto-loop-demo"

# A plain-text chat format; the tokenizer carries it so `apply_chat_template` works unchanged.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class TokenizerSpec:
    """The special tokens and chat template a built tokenizer is saved with (the demo's by default;
    testkit.model_families gives each model family's)."""

    specials: tuple[str, ...] = tuple(SPECIAL_TOKENS)
    bos: str | None = "<|bos|>"
    eos: str | None = "<|eos|>"
    pad: str | None = "<|pad|>"
    chat_template: str | None = CHAT_TEMPLATE


class ModelRefused(ValueError):
    """A model this project cannot serve or train as configured; the message says what to change."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    device: torch.device
    dtype: torch.dtype


def default_device() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when a GPU is present, CPU fp32 otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def demo_corpus() -> str:
    """The text shipped to teach the demo model (and to cut benchmark texts from)."""
    return resources.files("foundation").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def build_tokenizer(
    path: Path,
    *,
    vocab_size: int = 512,
    corpus: str | None = None,
    alphabet: str | None = None,
    spec: TokenizerSpec = TokenizerSpec(),
):
    """Train a byte-level BPE tokenizer on `corpus` and save it with `spec`'s tokens and chat template.

    With `alphabet`, build a character-level tokenizer instead (one token per character, the
    special tokens, and `<|unk|>`): learning tests use it for a vocabulary of a few dozen tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(spec.specials)
    if alphabet is not None:
        specials.append("<|unk|>")
        vocab = {token: i for i, token in enumerate(specials + sorted(set(alphabet)))}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(specials)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        text = corpus if corpus is not None else demo_corpus()
        tok.train_from_iterator(text.splitlines(), trainer=trainer)
    named = {spec.bos, spec.eos, spec.pad, "<|unk|>"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token="<|unk|>" if alphabet is not None else None,
        additional_special_tokens=[t for t in spec.specials if t not in named],
    )
    fast.chat_template = spec.chat_template
    fast.save_pretrained(path)
    return fast


def build_tiny_model(
    path: Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    corpus: str | None = None,
    alphabet: str | None = None,
    init_std: float = 0.02,
) -> Path:
    """Write a random Llama (config + safetensors) and its tokenizer to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_progress_bars()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, vocab_size=vocab_size, corpus=corpus, alphabet=alphabet)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # transformers' 0.02 keeps a tiny model's logits within about ±1, too flat for a LoRA to
        # move its answers much; learning tests raise it.
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def ensure_demo_model(data_dir: Path) -> Path:
    """Build the offline demo model under `data_dir` on first use; reuse it afterwards."""
    target = Path(data_dir) / "demo-model"
    if (target / "config.json").exists():
        return target
    logger.warning(
        "no --model given: building the offline DEMO model in %s "
        "(a tiny Llama taught the shipped text, about a minute on 2 cores: expect babble)",
        target,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=target.parent))
    try:
        build_tiny_model(tmp, vocab_size=512, hidden_size=128, num_layers=4, num_heads=4)
        _teach_the_corpus(tmp)
        try:
            os.replace(tmp, target)  # atomic: a half-built model is never picked up
        except OSError:
            if not (target / "config.json").exists():
                raise  # not another process winning the race: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _teach_the_corpus(path: Path, steps: int = 100) -> None:
    """A short training (about a minute on 2 cores) so the demo babbles the shipped text instead of random bytes.

    Each line of the corpus is a user turn answered by the next line, in the chat template.
    """
    lines = [line for line in demo_corpus().splitlines() if line.strip()]
    chats = [
        [{"role": "user", "content": line}, {"role": "assistant", "content": lines[(i + 1) % len(lines)]}]
        for i, line in enumerate(lines)
    ]
    loss = teach_chats(path, chats, steps=steps, lr=3e-3)
    logger.info("demo model trained on the shipped corpus (final loss %.2f)", loss)


def teach_chats(path: Path, chats: list[list[dict[str, str]]], *, steps: int, lr: float) -> float:
    """Train the model at `path` in place on whole `chats` (one full batch, AdamW, on CPU) and
    save it; the final loss. For the demo model and the tests' tiny models, not real training."""
    loaded = load_model(path, device=torch.device("cpu"), dtype=torch.float32)
    tokenizer, model = loaded.tokenizer, loaded.model
    rows = [[*render_prompt(tokenizer, chat, add_generation_prompt=False), tokenizer.eos_token_id] for chat in chats]
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)
    return float(loss.item())


def set_torch_threads(threads: int | None) -> None:
    """Apply the `torch_threads` setting (process-wide); None leaves torch's default."""
    if threads is not None:
        torch.set_num_threads(threads)


def load_model(
    model: str | Path, *, model_id: str | None = None, device=None, dtype=None, quantization=None
) -> LoadedModel:
    """Load a causal LM and its tokenizer with `from_pretrained`; eval mode, no grad.

    Refused (ModelRefused) at once, rather than failing on the first request: a model that is not
    a causal LM, one with no layer a LoRA adapter can take, and one with no end-of-answer token.
    A tokenizer with no pad token pads with its EOS, as `generate` does. `quantization`: a
    transformers quantization config (learner.base_weights), loaded straight onto `device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_progress_bars()
    if device is None or dtype is None:
        device, dtype = default_device()
    tokenizer = AutoTokenizer.from_pretrained(model)
    try:
        if quantization is None:
            lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        else:  # a quantized model cannot be moved after loading
            lm = AutoModelForCausalLM.from_pretrained(
                model, dtype=dtype, quantization_config=quantization, device_map={"": device}
            )
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise ModelRefused(
            f"{model} is not a causal language model (transformers' AutoModelForCausalLM cannot load it): "
            "kto-loop serves and trains decoder-only chat models; pass one with --model"
        ) from exc
    lm.eval()
    loaded = LoadedModel(lm, tokenizer, model_id or str(model), torch.device(device), dtype)
    _check_loadable(loaded, model)
    logger.info("loaded %s on %s (%s)", model, device, dtype)
    return loaded


def load_shape(model: str | Path, *, model_id: str | None = None) -> LoadedModel:
    """The tokenizer and the model built on the meta device from its config: its layers, context
    and end-of-answer ids without its weights, for an engine that loads them itself (vLLM).
    Refused as `load_model` refuses."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model)
    config = AutoConfig.from_pretrained(model)
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise ModelRefused(f"{model} is not a causal language model: {exc}") from exc
    try:
        lm.generation_config = GenerationConfig.from_pretrained(model)
    except OSError:
        pass  # none shipped: the config's ids stand
    loaded = LoadedModel(lm, tokenizer, model_id or str(model), torch.device("meta"), lm.dtype)
    _check_loadable(loaded, model)
    return loaded


def _check_loadable(loaded: LoadedModel, model: str | Path) -> None:
    if not lora_target_names(loaded.model):
        raise ModelRefused(
            f"{model} ({type(loaded.model).__name__}) has no linear layer a LoRA adapter can take; "
            "kto-loop trains LoRA adapters on Linear (or GPT-2 style Conv1D) layers"
        )
    ends = eos_token_ids(loaded)
    if not ends:
        raise ModelRefused(
            f"{model} names no end-of-answer token: neither the tokenizer's eos_token nor eos_token_id in "
            "config.json or generation_config.json is set, so no answer could end. Set eos_token in "
            "tokenizer_config.json (the token the chat template ends a turn with)"
        )
    if loaded.tokenizer.pad_token_id is None:
        pad = loaded.tokenizer.eos_token_id if loaded.tokenizer.eos_token_id is not None else min(ends)
        loaded.tokenizer.pad_token = loaded.tokenizer.convert_ids_to_tokens(pad)
        logger.info("%s has no pad token: padding with %r (masked out everywhere)", model, loaded.tokenizer.pad_token)


def lora_target_names(model: torch.nn.Module) -> list[str]:
    """Short names (q_proj, c_attn, …) of the layers a LoRA adapter may target: every Linear, and
    transformers' Conv1D (GPT-2's linear layers, stored transposed), except the output head."""
    from transformers.pytorch_utils import Conv1D

    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear | Conv1D) and not name.endswith("lm_head")
        }
    )


def context_length(loaded: LoadedModel) -> int | None:
    """The longest sequence (prompt + answer) the model's positions cover; None when it names none."""
    length = getattr(loaded.model.config, "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


def prompt_limit(loaded: LoadedModel, max_prompt_tokens: int, *, explicit: bool) -> int:
    """The longest prompt to accept: `max_prompt_tokens`, lowered to the model's context when that
    is shorter and the limit was left at its default; an explicit limit longer than the context is
    refused. Each request is checked against the context too, prompt and max_tokens together."""
    length = context_length(loaded)
    if length is None or max_prompt_tokens <= length:
        return max_prompt_tokens
    if explicit:
        raise ModelRefused(
            f"KTO_MAX_PROMPT_TOKENS is {max_prompt_tokens}, but {loaded.model_id} holds {length} tokens of "
            f"context (prompt and answer together): set KTO_MAX_PROMPT_TOKENS to at most {length}, less to "
            "leave room for the answer"
        )
    logger.info("%s holds %d tokens of context: prompts are limited to that", loaded.model_id, length)
    return length


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    """Every id that ends an answer: the tokenizer's EOS, and the eos_token_id of config.json and
    generation_config.json, each maybe a list (Llama 3's <|eot_id|>, Gemma's <end_of_turn>, …)."""
    ids = {loaded.tokenizer.eos_token_id}
    generation = getattr(loaded.model, "generation_config", None)
    for config_eos in (getattr(loaded.model.config, "eos_token_id", None), getattr(generation, "eos_token_id", None)):
        if isinstance(config_eos, int):
            ids.add(config_eos)
        elif config_eos:
            ids.update(config_eos)
    return {i for i in ids if i is not None}


def render_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the chat prompt, ending where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    # Base models without a template: a plain transcript.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"]
