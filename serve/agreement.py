"""How far annotators agree: Krippendorff's α (nominal) on the answers two or more annotated.

α = 1 − observed / expected disagreement: 1 is perfect agreement, 0 what chance gives, below 0
systematic disagreement. It handles any number of annotators per answer and missing labels,
unlike Cohen's κ (two fixed raters). Computed by the maintained ``krippendorff`` package.

Per annotator: α over the answers that annotator labeled together with someone else, all their
labels included; it falls where one annotator disagrees with the rest. α is undefined (None)
when there is no overlap yet, or every label was the same (no disagreement is expected, so none
can be measured); ``observed`` (the share of agreeing pairs) is there either way.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from serve.annotation_queue import Annotation


@dataclass(frozen=True)
class Agreement:
    alpha: float | None
    items: int
    """Answers with two or more annotations."""
    observed: float | None
    """Share of annotator pairs on one answer that agree."""

    def to_json(self) -> dict:
        return {"krippendorff_alpha": self.alpha, "items": self.items, "observed_agreement": self.observed}


def agreement(annotations: Iterable[Annotation]) -> tuple[Agreement, dict[str, Agreement]]:
    """Overall, and per annotator (only annotators who share an answer with someone)."""
    by_item: dict[str, dict[str, int]] = defaultdict(dict)
    for a in annotations:
        by_item[a.response_id][a.annotator] = 1 if a.label == "desirable" else 0
    shared = {rid: labels for rid, labels in by_item.items() if len(labels) >= 2}
    overall = _measure(list(shared.values()))
    annotators = sorted({who for labels in shared.values() for who in labels})
    per = {who: _measure([labels for labels in shared.values() if who in labels]) for who in annotators}
    return overall, per


def _measure(items: list[dict[str, int]]) -> Agreement:
    if not items:
        return Agreement(None, 0, None)
    pairs = [a == b for labels in items for a, b in itertools.combinations(labels.values(), 2)]
    observed = sum(pairs) / len(pairs)
    values = {v for labels in items for v in labels.values()}
    if len(values) < 2:
        return Agreement(None, len(items), observed)
    import krippendorff

    coders = sorted({who for labels in items for who in labels})
    data = np.full((len(coders), len(items)), np.nan)
    for j, labels in enumerate(items):
        for who, value in labels.items():
            data[coders.index(who), j] = value
    alpha = float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal", value_domain=[0, 1]))
    return Agreement(alpha, len(items), observed)
