"""An operator's rules: what each one labels, and how a rule set is read from a file or the API.

A rule looks at one served answer and labels it, or abstains:

- `contains`: any of `phrases` appears (case-insensitive unless `case_sensitive`; as whole words
  unless `whole_words` is false);
- `regex`: `pattern` matches, run by RE2, whose time is linear in the answer whatever the
  pattern (patterns RE2 cannot run in linear time, such as backreferences, are refused);
- `max_chars` / `min_chars`: the answer is longer / shorter than `chars` characters;
- `judge`: a judge model answers `question` yes (labelers.judge; the labeler's KTO_JUDGE_URL).

On a match the answer is labeled `label`; otherwise `otherwise` (when set), else nothing. A rule
applies only to answers in its `scope` (users, versions: "base" names the base model) and to a
`sample_rate` share of them, picked by a hash of the response id, so that a re-delivered answer
is sampled the same way. Labels are written as source `rule:<name>` (`judge:<name>` for a judge
rule) with the rule's `weight`; in training a label counts its weight times its source's weight
in the learner's KTO_SOURCE_WEIGHTS (`{"rule:no-refunds": 2}`).
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import re2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ingest.events import ResponseEvent

Label = Literal["desirable", "undesirable"]
RULE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_PATTERN_CHARS = 2000


class Scope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users: list[str] | None = None
    """Only answers served to these users; None: every user."""
    versions: list[str] | None = None
    """Only answers of these adapter versions ("base": the base model); None: every version."""


_NEEDS = {"contains": "phrases", "regex": "pattern", "max_chars": "chars", "min_chars": "chars", "judge": "question"}
"""The field each kind of rule cannot do without."""


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=RULE_NAME)
    kind: Literal["contains", "regex", "max_chars", "min_chars", "judge"]
    label: Label
    """The label of an answer the rule matches."""
    otherwise: Label | None = None
    """The label of an answer it does not match; None: no label."""
    weight: float = Field(1.0, gt=0, le=100)
    """How much each of its labels counts in training (times the learner's KTO_SOURCE_WEIGHTS)."""
    sample_rate: float = Field(1.0, gt=0, le=1)
    scope: Scope = Field(default_factory=Scope)
    phrases: list[str] | None = None
    case_sensitive: bool = False
    whole_words: bool = True
    pattern: str | None = Field(None, max_length=MAX_PATTERN_CHARS)
    chars: int | None = Field(None, ge=0)
    question: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> Rule:
        needs = {
            "contains": "phrases",
            "regex": "pattern",
            "max_chars": "chars",
            "min_chars": "chars",
            "judge": "question",
        }
        field = needs[self.kind]
        if getattr(self, field) in (None, [], ""):
            raise ValueError(f"a {self.kind} rule needs {field}")
        if self.phrases is not None and not all(p.strip() for p in self.phrases):
            raise ValueError("phrases must not be empty")
        if self.pattern is not None:
            try:
                re2.compile(self.pattern)
            except re2.error as e:
                raise ValueError(f"pattern is not one RE2 can run in linear time: {e}") from e
        return self

    @property
    def source(self) -> str:
        return f"{'judge' if self.kind == 'judge' else 'rule'}:{self.name}"

    def applies_to(self, response: ResponseEvent) -> bool:
        """In scope and sampled (the same way for every delivery of the answer)."""
        scope = self.scope
        if scope.users is not None and response.user not in scope.users:
            return False
        if scope.versions is not None and (response.adapter_version or "base") not in scope.versions:
            return False
        if self.sample_rate >= 1:
            return True
        digest = hashlib.sha256(f"{self.name}\0{response.response_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.sample_rate

    def matches(self, text: str) -> bool:
        """Whether the answer matches; a judge rule is asked of a model instead (labelers.judge)."""
        if self.kind == "contains":
            return self._phrases().search(text) is not None
        if self.kind == "regex":
            return self._regex().search(text) is not None
        if self.kind == "max_chars":
            return len(text) > (self.chars or 0)
        if self.kind == "min_chars":
            return len(text) < (self.chars or 0)
        raise ValueError(f"rule {self.name} is a judge rule: labelers.judge asks it")

    def label_of(self, text: str) -> Label | None:
        return self.label if self.matches(text) else self.otherwise

    def _phrases(self) -> Any:
        if "_compiled" not in self.__dict__:
            words = "|".join(re2.escape(p) for p in self.phrases or [])
            pattern = rf"\b(?:{words})\b" if self.whole_words else f"(?:{words})"
            options = re2.Options()
            options.case_sensitive = self.case_sensitive
            self.__dict__["_compiled"] = re2.compile(pattern, options)
        return self.__dict__["_compiled"]

    def _regex(self) -> Any:
        if "_compiled" not in self.__dict__:
            self.__dict__["_compiled"] = re2.compile(self.pattern or "")
        return self.__dict__["_compiled"]


class RuleSet(BaseModel):
    """The whole set, as `PUT /v1/rules` takes it and a rules file holds it."""

    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> RuleSet:
        names = [rule.name for rule in self.rules]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"rule names must be unique: {', '.join(twice)} appear more than once")
        return self


class RulesFileError(ValueError):
    """A rules file that cannot be used; the message names the file, the line and the field."""


def load_rules(path: Path) -> RuleSet:
    """Read a TOML (`[[rules]]` tables) or YAML (`rules:` list) rules file; RulesFileError if bad."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RulesFileError(f"{path}: cannot read: {e}") from e
    toml = path.suffix.lower() == ".toml"
    try:
        data = tomllib.loads(text) if toml else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise RulesFileError(f"{path}: not valid {'TOML' if toml else 'YAML'}: {e}") from e
    try:
        return RuleSet.model_validate(data if data is not None else {})
    except ValidationError as e:
        lines = _rule_lines(text, toml)
        problems = []
        for error in e.errors():
            loc = error["loc"]
            at = ""
            if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int) and loc[1] < len(lines):
                at = f"line {lines[loc[1]]}: "
            field = ".".join(str(part) for part in loc) or "the file"
            problems.append(f"{at}{field}: {error['msg']}")
        raise RulesFileError(f"{path}: " + "; ".join(problems)) from e


def _rule_lines(text: str, toml: bool) -> list[int]:
    """The line (1-based) where each rule starts, in order."""
    if toml:
        return [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"\s*\[\[\s*rules\s*\]\]", line)]
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    for key, value in getattr(root, "value", []) if isinstance(root, yaml.MappingNode) else []:
        if key.value == "rules" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []
