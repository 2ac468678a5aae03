"""The vLLM engine's pure parts, on CPU without vLLM: how a request maps to vLLM's sampling
parameters, how its outputs become the engine interface's, and the adapters' integer ids.
(The engine itself runs the contract tests where vLLM and a GPU are: test_engine_contract.py.)"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from serve.generation import Delta, Failed, Finished, GenerationRequest
from serve.vllm_engine import Assembler, LoraIds, answer_logprob, sampling_kwargs


def test_a_request_maps_to_vllm_sampling_as_the_builtin_engine_samples():
    request = GenerationRequest([1, 2, 3], max_tokens=7, temperature=0.5, top_p=0.9, seed=11, stop=["\n\n"])
    kwargs = sampling_kwargs(request, {9, 4})
    assert kwargs == {
        "n": 1,
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 11,
        "stop": ["\n\n"],
        "stop_token_ids": [4, 9],  # every end-of-answer id the model names
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
    }
    kwargs["stop"].append("x")
    assert request.stop == ["\n\n"]  # the request is not shared with vLLM


def test_outputs_add_up_to_one_finished_with_every_token_id():
    assembler = Assembler(prompt_tokens=3)
    outputs = [
        *assembler.push("Hel", [10, 11], None),
        *assembler.push("", [12], None),  # a token that decodes to nothing yet
        *assembler.push("lo", [13, 2], "stop"),  # the end-of-answer id 2 ends it, kept in the ids
    ]
    assert outputs == [Delta("Hel"), Delta("lo"), Finished("stop", "Hello", [10, 11, 12, 13, 2], 3)]


@pytest.mark.parametrize(("vllm", "ours"), [("length", "length"), ("abort", "cancelled")])
def test_finish_reasons_map_to_the_engine_interface(vllm, ours):
    [done] = Assembler(prompt_tokens=1).push("", [5], vllm)
    assert isinstance(done, Finished) and done.finish_reason == ours


def test_an_unknown_finish_reason_fails_the_request():
    [delta, failed] = Assembler(prompt_tokens=1).push("a", [5], "error")
    assert delta == Delta("a") and isinstance(failed, Failed) and "'error'" in failed.error


def test_adapter_ids_are_stable_per_version_and_never_reused():
    ids = LoraIds()
    assert (ids.assign("v1"), ids.assign("v2"), ids.assign("v1")) == (1, 2, 1)
    assert ids.forget("v1") == 1
    assert ids.assign("v3") == 3 and ids.assign("v1") == 4  # a version loaded again gets a new id
    with pytest.raises(KeyError):
        ids.get("gone")


@dataclass
class Logprob:  # the shape of vllm.sequence.Logprob
    logprob: float


def test_the_answer_log_prob_sums_the_answer_positions_only():
    ids = [1, 7, 8, 9]  # prompt [1, 7], answer [8, 9]
    prompt_logprobs = [None, {7: Logprob(-0.5)}, {8: Logprob(-1.0), 3: Logprob(-2.0)}, {9: Logprob(-0.25)}]
    assert answer_logprob(prompt_logprobs, ids, prompt_len=2) == -1.25
    with pytest.raises(ValueError, match="needs a prompt"):
        answer_logprob(prompt_logprobs, ids, prompt_len=0)


def test_auto_picks_vllm_only_where_it_runs(tiny_model_dir):
    from serve.engine import Engine
    from serve.generation import open_engine
    from serve.vllm_engine import VllmEngine, vllm_available

    _, engine = open_engine("auto", str(tiny_model_dir), model_id="tiny", max_batch=2, max_lora_rank=8)
    assert isinstance(engine, VllmEngine if vllm_available() else Engine)


def test_asking_for_vllm_where_it_cannot_run_is_refused_with_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from kto_loop.cli import main
    from serve.vllm_engine import vllm_available

    if vllm_available():
        pytest.skip("vLLM and a GPU are here: nothing to refuse")
    monkeypatch.setenv("KTO_ENGINE", "vllm")
    assert main(["serve", "--data-dir", str(tmp_path), "--model", str(tiny_model_dir), "--port", "0"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kto-loop: KTO_ENGINE=vllm needs vLLM and an NVIDIA GPU") and "KTO_ENGINE=builtin" in line


# ---- the engine's own logic, on a stand-in for vLLM (tests/serve/vllm_stand_in.py) ----------


@pytest.fixture
def stand_in_engine(monkeypatch, tiny_model_dir):
    from foundation.models import load_shape
    from serve.vllm_engine import VllmEngine
    from tests.serve import vllm_stand_in

    vllm_stand_in.install(monkeypatch)
    engine = VllmEngine(str(tiny_model_dir), load_shape(tiny_model_dir), max_batch=4, max_lora_rank=16)
    engine.start()
    yield engine, vllm_stand_in.STARTED[-1]
    engine.stop()


class Sink:
    def __init__(self) -> None:
        import threading

        self.outputs: list = []
        self.done = threading.Event()

    def __call__(self, out) -> None:
        self.outputs.append(out)
        if not isinstance(out, Delta):
            self.done.set()

    def final(self):
        assert self.done.wait(10), "the request never finished"
        return self.outputs[-1]


def test_a_request_streams_and_finishes_with_every_token_id(stand_in_engine):
    engine, llm = stand_in_engine
    sink = Sink()
    engine.submit(GenerationRequest([1, 4], max_tokens=8, temperature=0), sink)
    assert sink.final() == Finished("stop", "t5t6t2", [5, 6, 2], 2)
    assert [o.text for o in sink.outputs[:-1]] == ["t5", "t6", "t2"]
    [params] = llm.params
    assert params.kwargs["output_kind"] == "delta" and params.kwargs["stop_token_ids"] == sorted(engine._end_ids)
    assert llm.args["enable_lora"] and llm.args["max_lora_rank"] == 16 and llm.args["max_num_seqs"] == 4


def test_a_version_in_use_is_removed_only_after_its_last_request(stand_in_engine, tmp_path):
    from tests.serve.vllm_stand_in import HOLD, release

    engine, llm = stand_in_engine
    assert engine.load_adapter("v1", tmp_path / "v1").result(10) >= 0
    assert engine.load_adapter("v1", tmp_path / "v1").result(10) == 0.0  # once per version
    [added] = llm.added
    assert (added.lora_name, added.lora_int_id, added.lora_path) == ("v1", 1, str(tmp_path / "v1"))
    sink = Sink()
    engine.submit(GenerationRequest([1, HOLD], max_tokens=8, adapter="v1"), sink)
    engine.retain(set()).result(10)
    assert engine.loaded_versions == {"v1"} and llm.removed == []  # held by the running request
    release(llm, engine._loop)
    assert isinstance(sink.final(), Finished)
    from testkit.waiting import wait_for

    wait_for(lambda: llm.removed == [1], what="v1 removed once its request finished", timeout_s=10)
    assert engine.loaded_versions == frozenset()
    with pytest.raises(KeyError):
        engine.submit(GenerationRequest([1], max_tokens=2, adapter="v1"), Sink())
    engine.load_adapter("v1", tmp_path / "v1").result(10)
    assert llm.added[-1].lora_int_id == 2  # a new id: vLLM caches adapters by id


def test_a_cancelled_request_is_aborted_in_vllm(stand_in_engine):
    from tests.serve.vllm_stand_in import HOLD, release

    engine, llm = stand_in_engine
    sink = Sink()
    handle = engine.submit(GenerationRequest([1, HOLD], max_tokens=8), sink)
    handle.cancel()
    release(llm, engine._loop)
    done = sink.final()
    assert isinstance(done, Finished) and done.finish_reason == "cancelled" and len(llm.aborted) == 1


def test_a_failing_request_fails_alone_and_lets_its_version_go(stand_in_engine, tmp_path):
    from testkit.waiting import wait_for
    from tests.serve.vllm_stand_in import FAIL

    engine, llm = stand_in_engine
    engine.load_adapter("v1", tmp_path / "v1").result(10)
    failed = Sink()
    engine.submit(GenerationRequest([1, FAIL], max_tokens=8, adapter="v1"), failed)
    assert isinstance(failed.final(), Failed) and "the stand-in failed" in failed.final().error
    engine.retain(set()).result(10)
    wait_for(lambda: llm.removed == [1], what="the failed request's pin released", timeout_s=10)
    good = Sink()
    engine.submit(GenerationRequest([1, 4], max_tokens=8), good)
    assert isinstance(good.final(), Finished) and engine.alive


def test_log_ratios_compare_the_answer_with_and_without_the_adapter(stand_in_engine, tmp_path):
    engine, _ = stand_in_engine
    engine.load_adapter("v1", tmp_path / "v1").result(10)
    assert engine.log_ratios("v1", [([1, 2, 3], [4, 5]), ([1], [4, 5, 6])]).result(10) == [2.0, 3.0]
    assert engine.log_ratios("v2", [([1], [4])]).result(10) is None
