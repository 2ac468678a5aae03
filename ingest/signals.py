"""Implicit signals: what a user does with an answer that says what they think of it.

Few people press a thumb; many regenerate, copy, or rewrite their question. Each such act is a
binary verdict on one answer, which is all KTO needs. A signal names its label here, shared by
the server (which writes the label into the feedback event) and the learner (which weighs it:
``KTO_SOURCE_WEIGHTS`` keys ``implicit:<signal>``, defaults below).

The weights are below a thumb's 1 because each act is a noisier verdict than a thumb:
- ``regenerate``: the user asked for another answer instead of this one. Mostly a rejection,
  but people also regenerate out of curiosity (0.5).
- ``copy``: the user took the answer away to use it. Mostly approval, but people also copy an
  answer to quote what is wrong with it (0.5).
- ``edit``: the user rewrote their own message and sent it again, so the answer to the old one
  missed. Often the question was at fault, not the answer (0.3).

Left out on purpose: stopping a stream (the server records only complete answers, so there is
no answer to label) and carrying on the conversation (as often a follow-up to a bad answer as to
a good one).

An explicit thumb from the same user on the same answer wins over any implicit signal, whatever
their order (``learner.join``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Label = Literal["desirable", "undesirable"]


@dataclass(frozen=True)
class Signal:
    name: str
    label: Label
    weight: float
    """The learner's default weight of its labels (a thumb weighs 1)."""


SIGNALS: dict[str, Signal] = {
    s.name: s
    for s in (
        Signal("regenerate", "undesirable", 0.5),
        Signal("copy", "desirable", 0.5),
        Signal("edit", "undesirable", 0.3),
    )
}


def signal_of(name: str) -> Signal:
    """The signal called ``name``; ValueError naming it (and the known ones) if there is none."""
    try:
        return SIGNALS[name]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}: one of {', '.join(sorted(SIGNALS))}") from None
