"""The operator's rules: what each kind labels, scope and sampling, and files refused by line and field."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ingest.events import ResponseEvent, SamplingParams
from labelers.rules import Rule, RuleSet, RulesFileError, load_rules


def rule(**fields: Any) -> Rule:
    return Rule.model_validate({"name": "r", "label": "undesirable", **fields})


def response(response_id: str = "resp-1", user: str | None = "u1", version: str | None = "v0001") -> ResponseEvent:
    return ResponseEvent(
        response_id=response_id,
        user=user,
        base_model="tiny",
        adapter_version=version,
        messages=[],
        prompt_token_ids=[1],
        completion="",
        completion_token_ids=[2],
        finish_reason="stop",
        sampling=SamplingParams(max_tokens=8, temperature=1.0, top_p=1.0),
    )


def test_contains_matches_whole_words_without_case_unless_asked() -> None:
    refunds = rule(kind="contains", phrases=["refund", "money back"])
    assert refunds.matches("No REFUND today") and refunds.matches("get your money  back?") is False
    assert refunds.matches("your money back.") and not refunds.matches("refunded") and not refunds.matches("")
    assert rule(kind="contains", phrases=["refund"], whole_words=False).matches("refunded")
    assert not rule(kind="contains", phrases=["refund"], case_sensitive=True).matches("Refund")
    assert rule(kind="contains", phrases=["a.b"]).matches("x a.b y") and not rule(
        kind="contains", phrases=["a.b"]
    ).matches("axb")


def test_regex_and_length_rules() -> None:
    assert rule(kind="regex", pattern=r"\d{3}-\d{4}").matches("call 555-1234")
    assert not rule(kind="regex", pattern=r"^\d+$").matches("12a")
    assert rule(kind="max_chars", chars=5).matches("123456") and not rule(kind="max_chars", chars=5).matches("12345")
    assert rule(kind="min_chars", chars=3).matches("12") and not rule(kind="min_chars", chars=3).matches("123")


def test_a_match_takes_label_and_a_miss_otherwise_or_nothing() -> None:
    plain = rule(kind="contains", phrases=["x"])
    assert (plain.label_of("x"), plain.label_of("y")) == ("undesirable", None)
    both = rule(kind="contains", phrases=["x"], otherwise="desirable")
    assert (both.label_of("x"), both.label_of("y")) == ("undesirable", "desirable")
    assert plain.source == "rule:r" and rule(kind="judge", question="Polite?").source == "judge:r"


def test_a_pathological_pattern_runs_in_linear_time() -> None:
    # (a+)+$ backtracks exponentially in Python's re on "aaa…!"; RE2 answers at once.
    evil = rule(kind="regex", pattern=r"(a+)+$")
    started = time.perf_counter()
    assert not evil.matches("a" * 100_000 + "!")
    assert time.perf_counter() - started < 5.0  # Python's re would not finish in years


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"kind": "contains"}, "needs phrases"),
        ({"kind": "contains", "phrases": [" "]}, "phrases must not be empty"),
        ({"kind": "regex", "pattern": r"(a)\1"}, "RE2"),
        ({"kind": "regex", "pattern": "(unclosed"}, "RE2"),
        ({"kind": "max_chars"}, "needs chars"),
        ({"kind": "judge"}, "needs question"),
        ({"kind": "contains", "phrases": ["x"], "sample_rate": 0}, "sample_rate"),
        ({"kind": "contains", "phrases": ["x"], "lable": "desirable"}, "lable"),
        ({"kind": "shouting", "phrases": ["x"]}, "kind"),
        ({"kind": "contains", "phrases": ["x"], "name": "no spaces"}, "name"),
    ],
)
def test_an_invalid_rule_is_refused_naming_what_is_wrong(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        rule(**fields)


def test_scope_and_sampling_are_fixed_per_answer() -> None:
    scoped = rule(kind="contains", phrases=["x"], scope={"users": ["u1"], "versions": ["base", "v0002"]})
    assert scoped.applies_to(response(user="u1", version=None))
    assert not scoped.applies_to(response(user="u1", version="v0001"))
    assert not scoped.applies_to(response(user="u2", version=None))
    half = rule(kind="contains", phrases=["x"], sample_rate=0.5)
    picked = [half.applies_to(response(f"r{i}")) for i in range(2000)]
    assert 850 < sum(picked) < 1150  # about half …
    assert picked == [half.applies_to(response(f"r{i}")) for i in range(2000)]  # … and the same each time


def test_rule_names_are_unique_in_a_set() -> None:
    with pytest.raises(ValidationError, match="unique: a"):
        RuleSet.model_validate({"rules": [{"name": "a", "kind": "min_chars", "chars": 1, "label": "desirable"}] * 2})


def test_rules_files_in_toml_and_yaml(tmp_path: Path) -> None:
    toml = tmp_path / "rules.toml"
    toml.write_text(
        '[[rules]]\nname = "no-refunds"\nkind = "contains"\nphrases = ["refund"]\nlabel = "undesirable"\n'
        'otherwise = "desirable"\n\n[[rules]]\nname = "short"\nkind = "max_chars"\nchars = 400\nlabel = "undesirable"\n'
    )
    yml = tmp_path / "rules.yaml"
    yml.write_text(
        "rules:\n  - name: no-refunds\n    kind: contains\n    phrases: [refund]\n    label: undesirable\n"
        "    otherwise: desirable\n  - {name: short, kind: max_chars, chars: 400, label: undesirable}\n"
    )
    assert load_rules(toml) == load_rules(yml)
    assert [r.name for r in load_rules(toml).rules] == ["no-refunds", "short"]
    empty = tmp_path / "none.yaml"
    empty.write_text("")
    assert load_rules(empty).rules == []


def test_a_bad_rules_file_is_refused_naming_the_line_and_the_field(tmp_path: Path) -> None:
    yml = tmp_path / "rules.yaml"
    yml.write_text(
        "rules:\n  - {name: ok, kind: min_chars, chars: 1, label: desirable}\n"
        "  - name: broken\n    kind: contains\n    label: undesirable\n"
    )
    with pytest.raises(RulesFileError, match=r"rules.yaml: line 3: rules\.1: .*needs phrases"):
        load_rules(yml)
    toml = tmp_path / "rules.toml"
    toml.write_text(
        '[[rules]]\nname = "a"\nkind = "min_chars"\nchars = 1\nlabel = "desirable"\n\n[[rules]]\nname = "b"\n'
        'kind = "min_chars"\nchars = -3\nlabel = "desirable"\n'
    )
    with pytest.raises(RulesFileError, match=r"rules.toml: line 7: rules\.1\.chars: "):
        load_rules(toml)
    broken = tmp_path / "broken.toml"
    broken.write_text("[[rules]\nname = 1\n")
    with pytest.raises(RulesFileError, match=r"broken.toml: not valid TOML: .*line 1"):
        load_rules(broken)
    with pytest.raises(RulesFileError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")
