"""A model the loop cannot serve or train as configured is refused at start-up, with a message
that says what to change; a tokenizer without a pad token pads with its EOS."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from foundation.models import ModelRefused, TokenizerSpec, build_tokenizer, load_model, prompt_limit
from kto_loop.cli import main
from testkit.model_families import FAMILIES, build_family_model
from tests.serve.conftest import LOCAL


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A base model whose context (1024) is shorter than the server's default prompt limit (2048)."""
    return build_family_model(FAMILIES["gpt2"], tmp_path_factory.mktemp("gpt2") / "model")


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_tokenizer(tmp_path)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(ModelRefused, match="not a causal language model"):
        load_model(tmp_path)


def test_a_model_without_an_end_of_answer_token_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = TokenizerSpec(specials=("<|pad|>", "<|bos|>"), eos=None)
    tokenizer = build_tokenizer(tmp_path, spec=spec)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        eos_token_id=None,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ModelRefused, match=r"no end-of-answer token.*Set eos_token in tokenizer_config\.json"):
        load_model(tmp_path)


def test_a_tokenizer_without_a_pad_token_pads_with_its_eos(tmp_path):
    loaded = load_model(build_family_model(FAMILIES["llama3"], tmp_path))
    assert loaded.tokenizer.pad_token == "<|eot_id|>" == loaded.tokenizer.eos_token


def test_the_prompt_limit_is_lowered_to_the_context_unless_it_was_set(gpt2_dir):
    loaded = load_model(gpt2_dir)
    assert prompt_limit(loaded, 2048, explicit=False) == 1024
    assert prompt_limit(loaded, 512, explicit=True) == 512
    with pytest.raises(ModelRefused, match="KTO_MAX_PROMPT_TOKENS to at most 1024"):
        prompt_limit(loaded, 2048, explicit=True)


def test_serve_refuses_a_prompt_limit_beyond_the_context_with_one_line(gpt2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KTO_MAX_PROMPT_TOKENS", "2048")
    assert main(["serve", "--data-dir", str(tmp_path), "--model", str(gpt2_dir), "--port", "0"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()  # before the server starts: no traceback
    assert line.startswith("kto-loop: KTO_MAX_PROMPT_TOKENS is 2048") and line.endswith("a restart cannot fix this")
    assert "set KTO_MAX_PROMPT_TOKENS to at most 1024" in line


def test_a_request_longer_than_the_context_is_a_400(gpt2_dir, tmp_path):
    from serve.app import create_app
    from serve.settings import ServeSettings

    settings = ServeSettings(data_dir=tmp_path, model=str(gpt2_dir), max_tokens_limit=2048)
    with TestClient(create_app(settings), client=LOCAL) as client:
        request = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1020}
        reply = client.post("/v1/chat/completions", json=request)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert "1024" in error["message"]


def test_the_learner_refuses_target_modules_the_model_lacks(gpt2_dir, tmp_path, capsys):
    env = ["learn", "--data-dir", str(tmp_path), "--model", str(gpt2_dir)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KTO_LORA_TARGET_MODULES", '["q_proj", "v_proj"]')
        assert main(env) == 2
    err = capsys.readouterr().err
    assert "KTO_LORA_TARGET_MODULES names ['q_proj', 'v_proj']" in err and "['c_attn', 'c_fc', 'c_proj']" in err
