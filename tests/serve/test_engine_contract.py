"""The engine contract (serve.generation), against every engine available here: the built-in one
always, vLLM where it is installed and an NVIDIA GPU is present. Rows are pinned to their version,
streamed text adds up, stop strings and lengths hold, unused versions are unloaded.

What only the built-in engine promises is marked so: batched rows generate exactly what each
would alone (vLLM's batched kernels are not batch-invariant)."""

from __future__ import annotations

import threading

import pytest

from serve.engine import Engine
from serve.generation import Delta, Failed, Finished, GenerationEngine, GenerationRequest
from serve.vllm_engine import VllmEngine, vllm_available

ENGINES = ["builtin", *(["vllm"] if vllm_available() else [])]


def run_all(engine: GenerationEngine, requests: list[GenerationRequest], timeout: float = 60) -> list[list]:
    """Submit every request at once; return each one's outputs."""
    outputs: list[list] = [[] for _ in requests]
    done = [threading.Event() for _ in requests]

    def sink(i):
        def emit(out):
            outputs[i].append(out)
            if not isinstance(out, Delta):
                done[i].set()

        return emit

    for i, request in enumerate(requests):
        engine.submit(request, sink(i))
    for event in done:
        assert event.wait(timeout), "a request never finished"
    return outputs


def final(outputs: list) -> Finished:
    assert isinstance(outputs[-1], Finished), outputs[-1]
    return outputs[-1]


@pytest.fixture(params=ENGINES)
def engine(request, tiny_model, tiny_model_dir):
    from foundation.models import load_shape

    if request.param == "builtin":
        engine: GenerationEngine = Engine(tiny_model, max_batch=8)
    else:
        engine = VllmEngine(str(tiny_model_dir), load_shape(tiny_model_dir), max_batch=8, max_lora_rank=16)
    engine.start()
    yield engine
    engine.stop()


def builtin_only(engine: GenerationEngine) -> None:
    if not isinstance(engine, Engine):
        pytest.skip("a promise of the built-in engine only")


def prompt(tiny_model, text: str) -> list[int]:
    from foundation.models import render_prompt

    return render_prompt(tiny_model.tokenizer, [{"role": "user", "content": text}])


TEXTS = ["Hello there", "What is the capital of France?", "Yes", "Tell me about cats and dogs, please."]


def test_batched_greedy_equals_solo(engine, tiny_model):
    builtin_only(engine)
    requests = [GenerationRequest(prompt(tiny_model, t), max_tokens=10, temperature=0) for t in TEXTS]
    solo = [final(run_all(engine, [r])[0]).token_ids for r in requests]
    together = [final(o).token_ids for o in run_all(engine, requests)]
    assert together == solo
    assert all(len(t) >= 1 for t in solo)


def test_rows_pinned_to_different_adapters(engine, tiny_model, make_adapter):
    builtin_only(engine)  # solo equals mixed: batch invariance (vLLM: test_each_row_gets_its_version)
    engine.load_adapter("v1", make_adapter(1)).result()
    engine.load_adapter("v2", make_adapter(2)).result()
    versions = [None, "v1", "v2", "v1"]
    requests = [
        GenerationRequest(prompt(tiny_model, t), max_tokens=8, temperature=0, adapter=v)
        for t, v in zip(TEXTS, versions)
    ]
    solo = [final(run_all(engine, [r])[0]).token_ids for r in requests]
    mixed = [final(o).token_ids for o in run_all(engine, requests)]
    assert mixed == solo
    # the adapters really change the answer, or this test would prove nothing
    same_prompt = [
        GenerationRequest(prompt(tiny_model, TEXTS[0]), max_tokens=8, temperature=0, adapter=v)
        for v in (None, "v1", "v2")
    ]
    answers = [final(run_all(engine, [r])[0]).token_ids for r in same_prompt]
    assert len({tuple(a) for a in answers}) == 3


def test_stream_text_adds_up_and_lengths_respected(engine, tiny_model):
    request = GenerationRequest(prompt(tiny_model, "Hello"), max_tokens=7, temperature=1.0, seed=3)
    outputs = run_all(engine, [request])[0]
    done = final(outputs)
    streamed = "".join(o.text for o in outputs if isinstance(o, Delta))
    assert streamed == done.text
    assert len(done.token_ids) <= 7
    assert done.finish_reason in {"stop", "length"}


def test_seed_makes_sampling_repeatable(engine, tiny_model):
    make = lambda seed: GenerationRequest(prompt(tiny_model, "Hi"), max_tokens=12, temperature=1.0, seed=seed)
    a, b, c = (final(run_all(engine, [make(s)])[0]).token_ids for s in (7, 7, 8))
    assert a == b
    assert a != c


def test_stop_string_ends_the_answer(engine, tiny_model):
    free = final(
        run_all(engine, [GenerationRequest(prompt(tiny_model, "Hi"), max_tokens=20, temperature=1.0, seed=1)])[0]
    )
    assert len(free.text) > 3
    stop = free.text[2:4]
    cut = final(
        run_all(
            engine, [GenerationRequest(prompt(tiny_model, "Hi"), max_tokens=20, temperature=1.0, seed=1, stop=[stop])]
        )[0]
    )
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]


def test_unknown_adapter_is_refused(engine, tiny_model):
    with pytest.raises(KeyError):
        engine.submit(GenerationRequest(prompt(tiny_model, "Hi"), max_tokens=2, adapter="nope"), lambda o: None)


def test_unused_versions_are_unloaded_but_held_ones_stay(engine, tiny_model, make_adapter):
    for i in range(1, 4):
        engine.load_adapter(f"v{i}", make_adapter(i)).result()
    engine.retain({"v3"}).result()
    assert engine.loaded_versions == {"v3"}


def test_a_failing_step_fails_its_requests_not_the_engine(engine, tiny_model):
    bad = GenerationRequest([10**6], max_tokens=3, temperature=0)  # token id outside the vocabulary
    out = run_all(engine, [bad])[0]
    assert isinstance(out[-1], Failed)
    good = run_all(engine, [GenerationRequest(prompt(tiny_model, "Hi"), max_tokens=3, temperature=0)])[0]
    assert isinstance(good[-1], Finished)


def test_each_row_gets_its_version(engine, tiny_model, make_adapter):
    engine.load_adapter("v1", make_adapter(1)).result()
    engine.load_adapter("v2", make_adapter(2)).result()
    assert engine.load_adapter("v1", make_adapter(1)).result() == 0.0  # loaded once, under its name
    same_prompt = [
        GenerationRequest(prompt(tiny_model, TEXTS[0]), max_tokens=8, temperature=0, adapter=v)
        for v in (None, "v1", "v2")
    ]
    together = [final(o).token_ids for o in run_all(engine, same_prompt)]
    assert len({tuple(a) for a in together}) == 3  # three versions, three answers in one batch


def test_log_ratios_under_a_loaded_version_and_none_for_another(engine, tiny_model, make_adapter):
    engine.load_adapter("v1", make_adapter(1)).result()
    pairs = [(prompt(tiny_model, t), [20, 21, 22]) for t in TEXTS[:2]]
    ratios = engine.log_ratios("v1", pairs).result()
    assert len(ratios) == 2 and all(abs(r) > 1e-4 for r in ratios)
    assert engine.log_ratios("not-loaded", pairs).result() is None
