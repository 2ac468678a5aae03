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


def build_tokenizer(path: Path, *, vocab_size: int = 512, corpus: str | None = None, alphabet: str | None = None):
    """Train a byte-level BPE tokenizer on `corpus` and save it with a chat template.

    With `alphabet`, build a character-level tokenizer instead (one token per character, the
    special tokens, and `<|unk|>`): learning tests use it for a vocabulary of a few dozen tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS)
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
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>" if alphabet is not None else None,
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
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


def load_model(model: str | Path, *, model_id: str | None = None, device=None, dtype=None) -> LoadedModel:
    """Load a causal LM and its tokenizer with `from_pretrained`; eval mode, no grad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_progress_bars()
    if device is None or dtype is None:
        device, dtype = default_device()
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
    lm.eval()
    logger.info("loaded %s on %s (%s)", model, device, dtype)
    return LoadedModel(lm, tokenizer, model_id or str(model), torch.device(device), dtype)


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    """Every id that ends an answer: the tokenizer's EOS and the config's (which may be a list)."""
    ids = {loaded.tokenizer.eos_token_id}
    config_eos = getattr(loaded.model.config, "eos_token_id", None)
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
