"""The KTO loss: hand-computed values, equality with TRL's KTOTrainer, log-probs, paper weights."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import learner.loss as loss_module
from learner.loss import implicit_rewards, kto_loss, paper_weights, sequence_logps


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- hand-made tensors


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# r = policy − ref = [1, −1, 0]; z0 = mean(kl_policy − kl_ref) = 0.5.
HAND: dict[str, Any] = dict(
    policy_logps=t(-1.0, -2.0, -3.0),
    ref_logps=t(-2.0, -1.0, -3.0),
    kl_policy_logps=t(-1.0, -1.0, -1.0),
    kl_ref_logps=t(-1.5, -1.5, -1.5),
    desirable=torch.tensor([True, False, True]),
)


def test_hand_computed_loss_and_kl():
    beta = 2.0
    expected = [1 - sigmoid(2 * (1 - 0.5)), 1 - sigmoid(2 * (0.5 - -1)), 1 - sigmoid(2 * (0 - 0.5))]
    loss, losses, kl = kto_loss(**HAND, beta=beta)
    assert kl.item() == pytest.approx(0.5)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)


def test_hand_computed_weights_scale_each_class_and_divide_by_batch_size():
    beta, dw, uw = 2.0, 2.0, 0.5
    expected = [dw * (1 - sigmoid(1.0)), uw * (1 - sigmoid(3.0)), dw * (1 - sigmoid(-1.0))]
    loss, losses, _ = kto_loss(**HAND, beta=beta, desirable_weight=dw, undesirable_weight=uw)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    # divided by B = 3, not by the sum of the weights (TRL's convention)
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)


def test_hand_computed_gradient():
    beta = 2.0
    policy = HAND["policy_logps"].clone().requires_grad_()
    kto_loss(**{**HAND, "policy_logps": policy}, beta=beta).loss.backward()

    def dsig(x: float) -> float:
        return sigmoid(x) * (1 - sigmoid(x))

    # d/dr of 1−σ(β(r−z0)) is −β σ'; of 1−σ(β(z0−r)) is +β σ'; the mean divides by 3
    expected = [-beta * dsig(1.0) / 3, beta * dsig(3.0) / 3, -beta * dsig(-1.0) / 3]
    assert policy.grad is not None
    assert policy.grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_kl_is_clamped_at_zero_and_carries_no_gradient():
    kl_policy = t(-3.0, -3.0, -3.0).requires_grad_()
    _, losses, kl = kto_loss(**{**HAND, "kl_policy_logps": kl_policy}, beta=1.0)
    assert kl.item() == 0.0 and not kl.requires_grad
    assert losses.tolist() == pytest.approx([1 - sigmoid(1.0), 1 - sigmoid(1.0), 1 - sigmoid(0.0)], abs=1e-6)


@pytest.mark.parametrize("label", [True, False])
@pytest.mark.parametrize("size", [1, 3])
def test_one_class_batches_and_batch_of_one_are_finite(label, size):
    policy = torch.linspace(-5, -1, size).requires_grad_()
    loss, losses, kl = kto_loss(
        policy,
        torch.full((size,), -3.0),
        torch.full((size,), -2.0),
        torch.full((size,), -2.5),
        torch.full((size,), label),
        undesirable_weight=1.33,
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(losses).all() and torch.isfinite(kl)
    assert policy.grad is not None
    assert torch.isfinite(policy.grad).all() and (policy.grad != 0).all()


def test_nan_input_surfaces_in_the_loss():
    # TRL's nanmean would drop the example; we want the gate to see it
    loss = kto_loss(**{**HAND, "policy_logps": t(float("nan"), -2.0, -3.0)}).loss
    assert torch.isnan(loss)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(**{**HAND, "desirable": torch.tensor([True, False])})
    with pytest.raises(ValueError, match="B ≥ 1"):
        kto_loss(t(), t(), t(), t(), torch.tensor([], dtype=torch.bool))


def test_implicit_rewards_are_beta_times_logratio_detached():
    policy = HAND["policy_logps"].clone().requires_grad_()
    rewards = implicit_rewards(policy, HAND["ref_logps"], beta=0.5)
    assert rewards.tolist() == pytest.approx([0.5, -0.5, 0.0]) and not rewards.requires_grad


# ---------------------------------------------------------------- TRL's KTOTrainer on the same tensors
#
# TRL 1.16 has no standalone KTO loss function: the loss lives inside `KTOTrainer._compute_loss`,
# which runs the model itself (fused LM head) and reads `outputs.log_probs`. So we build a real
# KTOTrainer on a tiny local model with `precompute_ref_log_probs=True` (reference log-probs then
# come from the batch, as in our buffer) and call its own `_compute_loss` with a stand-in model
# whose per-token log-probs are exactly our sequence log-probs. Everything after the forward —
# chosen/rejected split, KL gather and clamp, weighting, averaging — is TRL's code.

TRL_ROWS = {
    "prompt": ["hello there", "what is up", "tell me", "a b c"],
    "completion": [" fine thanks", " nothing much", " no", " d e"],
    "label": [True, False, True, False],
}


@pytest.fixture(scope="module")
def trl_trainer(tiny_model_dir, tmp_path_factory):
    """trl_trainer(beta, desirable_weight, undesirable_weight) -> a KTOTrainer, cached per config."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    made = {}

    def make(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
        key = (beta, desirable_weight, undesirable_weight)
        if key not in made:
            args = KTOConfig(
                output_dir=str(tmp_path_factory.mktemp("kto")),
                bf16=False,
                use_cpu=True,
                report_to=[],
                beta=beta,
                desirable_weight=desirable_weight,
                undesirable_weight=undesirable_weight,
                per_device_train_batch_size=4,
                precompute_ref_log_probs=True,
                disable_tqdm=True,
            )
            made[key] = KTOTrainer(
                model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                args=args,
                train_dataset=Dataset.from_dict(TRL_ROWS),
                processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
            )
        return made[key]

    return make


class LogpModel:
    """Stands in for the model TRL calls: its per-token log-probs sum to the given sequence log-probs.

    Sequences are 2 tokens (prompt, completion), so `log_probs` is [B, 1] and TRL's `.sum(-1)`
    returns our values bit for bit. `KL_input_ids` are all 1, `input_ids` all 0, to tell calls apart.
    """

    def __init__(self, policy_logps, kl_policy_logps):
        self.policy_logps, self.kl_policy_logps = policy_logps, kl_policy_logps

    def __call__(self, *, input_ids, labels, **kwargs):
        logps = self.kl_policy_logps if bool(input_ids[0, 0] == 1) else self.policy_logps
        zeros = torch.zeros(len(logps), 1)
        return SimpleNamespace(log_probs=logps[:, None], entropy=zeros, mean_logits=zeros)


def trl_loss(trainer, policy, ref, kl_policy, kl_ref, desirable):
    """TRL's loss and z0 on our tensors; `policy` is a leaf whose .grad TRL's backward fills."""
    size = len(policy)
    ids = torch.zeros(size, 2, dtype=torch.long)
    completion_mask = torch.tensor([[0, 1]] * size)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": completion_mask,
        "KL_input_ids": ids + 1,
        "KL_attention_mask": torch.ones_like(ids),
        "KL_completion_mask": completion_mask,
        "label": desirable,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    for metrics in trainer._metrics.values():
        metrics.clear()
    loss = trainer._compute_loss(LogpModel(policy, kl_policy), batch, return_outputs=False)
    loss.backward()
    (kl,) = [m["kl"][-1] for m in trainer._metrics.values() if m["kl"]]
    return loss, kl


def make_case(size, labels, seed, kl_shift):
    gen = torch.Generator().manual_seed(seed)
    policy = -20 + 5 * torch.randn(size, generator=gen)
    ref = policy + 3 * torch.randn(size, generator=gen)
    kl_policy = -25 + 5 * torch.randn(size, generator=gen)
    # kl_shift > 0 makes every mismatched log-ratio positive (z0 > 0); < 0 makes z0 clamp to 0
    kl_ref = kl_policy - kl_shift * (0.5 + torch.rand(size, generator=gen))
    return policy, ref, kl_policy, kl_ref, torch.tensor(labels)


MIXED = [True, False, False, True, True, False]
TRL_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "mixed": (dict(size=6, labels=MIXED, seed=0, kl_shift=1.0), dict()),
    "mixed-beta-0.5": (dict(size=6, labels=MIXED, seed=1, kl_shift=1.0), dict(beta=0.5)),
    "z0-clamped": (dict(size=6, labels=MIXED, seed=2, kl_shift=-1.0), dict()),
    "all-desirable": (dict(size=4, labels=[True] * 4, seed=3, kl_shift=1.0), dict()),
    "all-undesirable": (dict(size=4, labels=[False] * 4, seed=4, kl_shift=1.0), dict()),
    "undesirable-weight-1.33": (dict(size=6, labels=MIXED, seed=5, kl_shift=1.0), dict(undesirable_weight=1.33)),
    "desirable-weight-1.33": (dict(size=6, labels=MIXED, seed=6, kl_shift=1.0), dict(desirable_weight=1.33)),
    "batch-2": (dict(size=2, labels=[False, True], seed=7, kl_shift=1.0), dict()),
}


@pytest.mark.parametrize("case", TRL_CASES)
def test_matches_trl_kto_trainer(case, trl_trainer):
    inputs, config = TRL_CASES[case]
    policy, ref, kl_policy, kl_ref, desirable = make_case(**inputs)
    trainer = trl_trainer(**config)

    trl_policy = policy.clone().requires_grad_()
    expected_loss, expected_kl = trl_loss(trainer, trl_policy, ref, kl_policy, kl_ref, desirable)

    ours_policy = policy.clone().requires_grad_()
    loss, _losses, kl = kto_loss(ours_policy, ref, kl_policy, kl_ref, desirable, **config)
    loss.backward()

    assert (kl.item() == 0.0) == (case == "z0-clamped")  # the case tests what it says
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-6)
    assert kl.item() == pytest.approx(expected_kl, abs=1e-6)
    torch.testing.assert_close(ours_policy.grad, trl_policy.grad, atol=1e-6, rtol=0)


def test_matches_trl_end_to_end_through_a_real_model(trl_trainer):
    """Real forward passes: our `sequence_logps` reads TRL's collated batch the way TRL does."""
    trainer = trl_trainer(beta=0.5)
    model = trainer.model
    model.eval()  # no dropout either way; fixes TRL's metric mode
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])

    def our_logps(prefix=""):
        ids = batch[f"{prefix}input_ids"]
        logits = model(input_ids=ids, attention_mask=batch[f"{prefix}attention_mask"]).logits
        return sequence_logps(logits, ids, batch[f"{prefix}completion_mask"])

    # before any update the policy is the reference TRL precomputed with its fused LM head
    with torch.no_grad():
        torch.testing.assert_close(our_logps(), batch["ref_logps"], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(our_logps("KL_"), batch["ref_KL_logps"], atol=1e-5, rtol=1e-6)
        gen = torch.Generator().manual_seed(0)
        for param in model.parameters():  # move the policy away from the reference
            param.add_(0.05 * torch.randn(param.shape, generator=gen))

    model.zero_grad()
    expected = trainer.compute_loss(model, batch)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    (expected_kl,) = [m["kl"][-1] for m in trainer._metrics.values() if m["kl"]]

    model.zero_grad()
    with torch.no_grad():
        kl_policy = our_logps("KL_")
    loss, _, kl = kto_loss(our_logps(), batch["ref_logps"], kl_policy, batch["ref_KL_logps"], batch["label"], beta=0.5)
    loss.backward()

    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert kl.item() == pytest.approx(expected_kl, abs=1e-5)
    for ours, theirs in zip((p.grad for p in model.parameters()), expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- sequence_logps


def random_batch(dtype=torch.float32, seed=0):
    """Logits [3, 8, 11]; row 0 left-padded, row 1 right-padded, row 2 has no completion."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(3, 8, 11, generator=gen)).to(dtype)
    labels = torch.randint(0, 11, (3, 8), generator=gen)
    loss_mask = torch.tensor(
        [
            [0, 0, 0, 0, 1, 1, 1, 1],  # pad, pad, prompt, prompt, completion × 4
            [0, 0, 1, 1, 1, 0, 0, 0],  # prompt × 2, completion × 3, pad × 3
            [0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    labels = labels.masked_fill(loss_mask == 0, -100)  # masked labels must never be read
    return logits, labels, loss_mask


def brute_force_logps(logits, labels, loss_mask):
    out = torch.zeros(logits.size(0), dtype=torch.float64)
    for b in range(logits.size(0)):
        for i in range(1, logits.size(1)):
            if loss_mask[b, i]:
                out[b] = out[b] + torch.log_softmax(logits[b, i - 1].double(), -1)[labels[b, i]]
    return out


@pytest.mark.parametrize("chunk_elements", [1 << 26, 22])  # 22: two positions per chunk
def test_sequence_logps_matches_brute_force(chunk_elements, monkeypatch):
    monkeypatch.setattr(loss_module, "_CHUNK_ELEMENTS", chunk_elements)
    logits, labels, loss_mask = random_batch()
    logits.requires_grad_()
    got = sequence_logps(logits, labels, loss_mask)
    got.sum().backward()
    grad = logits.grad.clone()

    logits.grad = None
    expected = brute_force_logps(logits, labels, loss_mask)
    expected.sum().backward()
    assert got.dtype == torch.float32 and got[2].item() == 0.0
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, logits.grad, atol=1e-6, rtol=0)


def test_sequence_logps_bf16_logits_give_float32():
    logits, labels, loss_mask = random_batch(dtype=torch.bfloat16)
    got = sequence_logps(logits, labels, loss_mask)
    assert got.dtype == torch.float32
    # float32 arithmetic on the bf16 values, not bf16 arithmetic
    torch.testing.assert_close(got.double(), brute_force_logps(logits.float(), labels, loss_mask), atol=1e-5, rtol=0)


def test_sequence_logps_rejects_unscorable_masks():
    logits, labels, loss_mask = random_batch()
    first = loss_mask.clone()
    first[0, 0] = 1
    with pytest.raises(ValueError, match="first token"):
        sequence_logps(logits, labels.clamp(min=0), first)
    with pytest.raises(ValueError, match="negative"):
        sequence_logps(logits, labels.masked_fill(loss_mask == 1, -100), loss_mask)


# ---------------------------------------------------------------- paper_weights


COUNTS = [(1, 9), (9, 1), (1, 1), (4, 3), (3, 4), (5, 4), (7, 5), (1, 100), (100, 1), (13, 7)]


@pytest.mark.parametrize("n_d, n_u", COUNTS)
def test_paper_weights_put_the_ratio_in_the_band(n_d, n_u):
    w_d, w_u = paper_weights(n_d, n_u)
    ratio = w_d * n_d / (w_u * n_u)
    assert 1.0 - 1e-12 <= ratio <= 4 / 3 + 1e-12
    assert 1.0 in (w_d, w_u) and min(w_d, w_u) == 1.0  # only the minority is raised
    if 1.0 <= n_d / n_u <= 4 / 3:
        assert (w_d, w_u) == (1.0, 1.0)  # already in the band: the defaults


def test_paper_weights_move_to_the_nearest_edge():
    assert paper_weights(1, 9) == pytest.approx((9.0, 1.0))  # ratio exactly 1
    assert paper_weights(9, 1) == pytest.approx((1.0, 6.75))  # ratio exactly 4/3
    assert paper_weights(3, 4) == pytest.approx((4 / 3, 1.0))
    assert paper_weights(2, 1, lo=1.0, hi=1.0) == pytest.approx((1.0, 2.0))


@pytest.mark.parametrize("n_d, n_u", [(0, 0), (0, 5), (5, 0)])
def test_paper_weights_with_a_missing_class_are_the_defaults(n_d, n_u):
    assert paper_weights(n_d, n_u) == (1.0, 1.0)


def test_paper_weights_reject_bad_arguments():
    with pytest.raises(ValueError):
        paper_weights(-1, 3)
    with pytest.raises(ValueError):
        paper_weights(1, 3, lo=2.0, hi=1.0)


def test_example_weights_scale_each_examples_loss() -> None:
    policy, ref, kl_policy, kl_ref, desirable = make_case(size=6, labels=MIXED, seed=3, kl_shift=1.0)
    plain = kto_loss(policy, ref, kl_policy, kl_ref, desirable, desirable_weight=1.2)
    weights = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 1.0])
    weighted = kto_loss(policy, ref, kl_policy, kl_ref, desirable, desirable_weight=1.2, example_weights=weights)
    assert torch.allclose(weighted.losses, plain.losses * weights)
    assert torch.allclose(weighted.loss, (plain.losses * weights).mean())  # still a mean over B
    assert weighted.kl == plain.kl  # z0 is the batch's, whatever the weights
    with pytest.raises(ValueError, match="example_weights"):
        kto_loss(policy, ref, kl_policy, kl_ref, desirable, example_weights=torch.ones(5))
