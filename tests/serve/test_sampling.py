"""Next-token sampling: nucleus per row, batched draws that keep rows apart, seeds independent of the batch."""

from __future__ import annotations

import pytest
import torch

from serve.sampling import nucleus, sample_next


def test_nucleus_keeps_the_smallest_prefix_reaching_each_rows_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    kept = nucleus(probs, torch.tensor([0.6, 1.0, 0.1]))
    assert kept[0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    assert torch.equal(kept[1], probs[1])  # top_p 1: nothing cut, not even by rounding
    assert kept[2].nonzero().flatten().tolist() == [3]  # the most likely token always stays


def test_batched_rows_draw_from_their_own_distributions():
    logits = torch.full((3, 8), -30.0)
    logits[0, 3] = logits[1, 5] = 10.0
    logits[2, 1] = logits[2, 6] = 10.0
    for _ in range(20):
        tokens = sample_next(logits, [(1.0, 1.0, None), (0.7, 0.9, None), (1.0, 1.0, None)])
        assert tokens[:2] == [3, 5]
        assert tokens[2] in (1, 6)


def test_greedy_and_sampled_rows_mix():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, -50.0, -50.0]])
    assert sample_next(logits, [(0.0, 1.0, None), (1.0, 0.5, None)]) == [1, 0]


def test_a_seeded_row_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 64)

    def seeded(rows: torch.Tensor, companions: list) -> list[int]:
        generator = torch.Generator().manual_seed(7)
        return [sample_next(rows, [(1.0, 0.9, generator), *companions])[0] for _ in range(10)]

    alone = seeded(logits[:1], [])
    assert seeded(logits, [(1.0, 1.0, None), (0.5, 0.8, None), (0.0, 1.0, None)]) == alone


@pytest.mark.parametrize(
    ("temperature", "top_p", "expected"),
    [
        (1.0, 1.0, [0.5, 0.25, 0.15, 0.1]),
        (0.5, 1.0, [0.25 / 0.355, 0.0625 / 0.355, 0.0225 / 0.355, 0.01 / 0.355]),  # p² renormalised
        (1.0, 0.7, [2 / 3, 1 / 3, 0.0, 0.0]),  # the nucleus {0.5, 0.25}, renormalised
    ],
)
@pytest.mark.parametrize("seeded", [False, True])
def test_draws_follow_the_tempered_truncated_distribution(temperature, top_p, expected, seeded):
    torch.manual_seed(1)
    rows = 100
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]])).repeat(rows, 1)
    generators = [torch.Generator().manual_seed(i) if seeded else None for i in range(rows)]
    counts = torch.zeros(4)
    for _ in range(80):  # 8,000 draws: a frequency's standard error is at most 0.006
        for token in sample_next(logits, [(temperature, top_p, g) for g in generators]):
            counts[token] += 1
    assert (counts / counts.sum()).tolist() == pytest.approx(expected, abs=0.025)
