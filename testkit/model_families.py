"""Tiny models of the families users bring, built here: random weights from each family's real
transformers config class (shrunk to a few thousand parameters), a BPE tokenizer trained here with
the family's special tokens, its chat template, and its end-of-turn ids in generation_config.json.

What is real is what the loop depends on: the model class (attention, caches, layer names LoRA
targets), the template text (system-message rules, role alternation, the tokens around a turn),
and the several ids that end an answer. What is not: the vocabulary and the weights.

The templates are each family's published template for plain chat (tool-calling branches left
out); the ids in generation_config.json are those the family's instruct models ship.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from foundation.models import TokenizerSpec, build_tokenizer

# Small enough to build, serve and train in seconds on a CPU; heads of 16 so every family's
# rotary embedding has an even head size.
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, CONTEXT = 32, 2, 2, 1, 16, 2048

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
_GEMMA_TURNS = (
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}" + _GEMMA_TURNS + "{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}" + _GEMMA_TURNS + "{{ '<start_of_turn>' + role + '\n' + "
    "(first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """One model family as a user brings it."""

    name: str
    tokenizer: TokenizerSpec
    config: Callable[[Any], Any]  # tokenizer -> the family's transformers config, tiny
    model_class: str  # the transformers class `from_pretrained` resolves to
    end_of_turn: tuple[str, ...]  # every token that ends an answer (generation_config.json)
    takes_system: bool  # the template accepts a system message (else it raises: a 400 here)
    lora_modules: tuple[str, ...]  # the layers a LoRA adapter targets by default


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _common(tok) -> dict[str, Any]:
    return dict(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN * 2,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _config(class_name: str, **extra: Any) -> Callable[[Any], Any]:
    def make(tok):
        import transformers

        return getattr(transformers, class_name)(**{**_common(tok), **extra})

    return make


def _gpt2_config(tok):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tok),
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=1024,  # GPT-2's own: shorter than the server's default prompt limit
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


_ATTENTION_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _gemma_tokens(template: str) -> TokenizerSpec:
    """Gemma 2 and 3 share their special tokens; their templates differ on system messages."""
    specials = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
    return TokenizerSpec(specials=specials, bos="<bos>", eos="<eos>", pad="<pad>", chat_template=template)


_GEMMA_SIZES = dict(head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=512)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama3",
            TokenizerSpec(
                specials=(
                    "<|begin_of_text|>",
                    "<|end_of_text|>",
                    "<|start_header_id|>",
                    "<|end_header_id|>",
                    "<|eom_id|>",
                    "<|eot_id|>",
                ),
                bos="<|begin_of_text|>",
                eos="<|eot_id|>",
                pad=None,  # Llama 3 ships none
                chat_template=LLAMA3_TEMPLATE,
            ),
            _config("LlamaConfig", head_dim=HEAD_DIM),
            "LlamaForCausalLM",
            ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
            True,
            _ATTENTION_MLP,
        ),
        Family(
            "qwen2.5",
            TokenizerSpec(
                specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                bos=None,
                eos="<|im_end|>",
                pad="<|endoftext|>",
                chat_template=QWEN25_TEMPLATE,
            ),
            _config("Qwen2Config"),
            "Qwen2ForCausalLM",
            ("<|im_end|>", "<|endoftext|>"),
            True,
            _ATTENTION_MLP,
        ),
        Family(
            "qwen3",
            TokenizerSpec(
                specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
                bos=None,
                eos="<|im_end|>",
                pad="<|endoftext|>",
                chat_template=QWEN3_TEMPLATE,
            ),
            _config("Qwen3Config", head_dim=HEAD_DIM),
            "Qwen3ForCausalLM",
            ("<|im_end|>", "<|endoftext|>"),
            True,
            _ATTENTION_MLP,
        ),
        Family(
            "mistral",
            TokenizerSpec(
                specials=("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", pad=None, chat_template=MISTRAL_TEMPLATE
            ),
            _config("MistralConfig", head_dim=HEAD_DIM, sliding_window=None),
            "MistralForCausalLM",
            ("</s>",),
            False,
            _ATTENTION_MLP,
        ),
        Family(
            "gemma2",
            _gemma_tokens(GEMMA2_TEMPLATE),
            _config("Gemma2Config", **_GEMMA_SIZES),
            "Gemma2ForCausalLM",
            ("<eos>", "<end_of_turn>"),
            False,
            _ATTENTION_MLP,
        ),
        Family(
            "gemma3",
            _gemma_tokens(GEMMA3_TEMPLATE),
            _config("Gemma3TextConfig", **_GEMMA_SIZES),
            "Gemma3ForCausalLM",
            ("<eos>", "<end_of_turn>"),
            True,  # merged into the first user turn
            _ATTENTION_MLP,
        ),
        Family(
            "phi3",
            TokenizerSpec(
                specials=("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                bos="<s>",
                eos="<|endoftext|>",
                pad="<|endoftext|>",
                chat_template=PHI3_TEMPLATE,
            ),
            _config("Phi3Config"),
            "Phi3ForCausalLM",
            ("<|endoftext|>", "<|assistant|>", "<|end|>"),
            True,
            ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        ),
        Family(
            "gpt2",  # a base model: no chat template, so the server renders a plain transcript
            TokenizerSpec(
                specials=("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>", pad=None, chat_template=None
            ),
            _gpt2_config,
            "GPT2LMHeadModel",
            ("<|endoftext|>",),
            True,
            ("c_attn", "c_proj", "c_fc"),
        ),
    ]
}


def build_family_model(family: Family, path: Path, *, seed: int = 0, vocab_size: int = 384) -> Path:
    """Write `family`'s tiny model (config, random safetensors, generation_config, tokenizer) to `path`."""
    import transformers
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, vocab_size=vocab_size, spec=family.tokenizer)
    config = family.config(tok)
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=_ids(tok, *family.end_of_turn), pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(path)
    return path
