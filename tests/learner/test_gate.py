"""The gate's decision and its reason codes (the labels of kto_learner_gate_failures_total)."""

from __future__ import annotations

from learner.gate import MIN_HELD_OUT, Evaluation, decide


def test_each_failed_check_gives_a_reason_and_its_code():
    parent = Evaluation(accuracy=0.8, kl_per_token=None, n=MIN_HELD_OUT)
    worse = Evaluation(accuracy=0.5, kl_per_token=5.0, n=MIN_HELD_OUT)
    result = decide(worse, parent, finite=False, max_kl=3.0, tolerance=0.05)
    assert not result.passed
    assert result.codes == ["nonfinite", "kl", "accuracy"] and len(result.reasons) == 3


def test_a_good_candidate_passes_with_no_codes():
    parent = Evaluation(accuracy=0.6, kl_per_token=None, n=MIN_HELD_OUT)
    better = Evaluation(accuracy=0.7, kl_per_token=0.5, n=MIN_HELD_OUT)
    result = decide(better, parent, finite=True, max_kl=3.0, tolerance=0.05)
    assert result.passed and result.codes == [] and result.reasons == []


def test_too_few_held_out_labels_skip_the_accuracy_check_without_a_code():
    parent = Evaluation(accuracy=0.9, kl_per_token=None, n=5)
    candidate = Evaluation(accuracy=0.1, kl_per_token=0.1, n=5)
    result = decide(candidate, parent, finite=True, max_kl=3.0, tolerance=0.05)
    assert result.passed and result.codes == [] and result.notes
