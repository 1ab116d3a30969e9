"""Output comparison: shapes, NaN/Inf by position, the numeric gates (issue 12, fault 4).

Rules: docs/audit-rules.md, "Comparison".
"""

from __future__ import annotations

import numpy as np

from fleet.core.compare import compare_outputs, compare_samples


def test_masked_minus_inf_logits_match_at_the_same_positions() -> None:
    logits = np.linspace(-2, 2, 12, dtype=np.float32).reshape(1, 12)
    logits[0, ::3] = -np.inf  # an attention mask
    got = logits + np.float32(1e-4)  # -inf + x stays -inf; the rest is close
    res = compare_outputs({"y": got}, {"y": logits})
    assert res.passed, res.reasons
    oc = res.outputs[0]
    assert oc.inf and oc.nonfinite_matched == 4 and oc.nonfinite_mismatched == 0
    assert oc.cosine is not None and oc.cosine > 0.9999  # over the finite positions
    assert oc.max_abs is not None and oc.max_abs < 1e-3


def test_nan_by_design_matches_nan_at_the_same_positions() -> None:
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        ref = np.sqrt(x)  # NaN for x < 0, like ONNX Runtime and MNN both give
    res = compare_outputs({"y": ref.copy()}, {"y": ref})
    assert res.passed, res.reasons
    assert res.outputs[0].nan and res.outputs[0].nonfinite_matched == 8


def test_plus_inf_does_not_match_minus_inf() -> None:
    ref = np.array([1.0, np.inf, 2.0], np.float32)
    got = np.array([1.0, -np.inf, 2.0], np.float32)
    res = compare_outputs({"y": got}, {"y": ref})
    assert not res.passed
    assert "first at flat index 1: got -Inf, reference +Inf" in res.reasons[0]


def test_nan_where_the_reference_is_finite_fails_with_its_position() -> None:
    ref = np.linspace(-1, 1, 10, dtype=np.float32)
    got = ref.copy()
    got[7] = np.nan
    res = compare_outputs({"y": got}, {"y": ref})
    assert not res.passed
    reason = res.reasons[0]
    assert reason.startswith("y: 1 element(s) disagree on NaN/Inf")
    assert "index 7: got NaN, reference 0.555556" in reason


def test_finite_where_the_reference_has_nan_fails_too() -> None:
    ref = np.array([np.nan, 1.0, 2.0], np.float32)
    got = np.array([0.0, 1.0, 2.0], np.float32)
    res = compare_outputs({"y": got}, {"y": ref})
    assert not res.passed and "got 0, reference NaN" in res.reasons[0]


def test_nan_at_another_position_fails_even_with_the_same_count() -> None:
    ref = np.array([np.nan, 1.0, 2.0, 3.0], np.float32)
    got = np.array([0.0, np.nan, 2.0, 3.0], np.float32)
    res = compare_outputs({"y": got}, {"y": ref})
    assert not res.passed and res.outputs[0].nonfinite_mismatched == 2


def test_shapes_must_match_not_only_element_counts() -> None:
    res = compare_outputs({"y": np.zeros((0, 8), np.float32)},
                          {"y": np.zeros((1, 0), np.float32)})
    assert not res.passed and "shape [0, 8] != reference [1, 0]" in res.reasons[0]
    same_count = compare_outputs({"y": np.ones((2, 3), np.float32)},
                                 {"y": np.ones((3, 2), np.float32)})
    assert not same_count.passed
    ints = compare_outputs({"y": np.ones((2, 3), np.int32)}, {"y": np.ones(6, np.int64)})
    assert not ints.passed


def test_all_zero_rule_and_gates_still_apply_on_the_finite_positions() -> None:
    ref = np.array([-np.inf, 0.5, -0.25, 1.0], np.float32)
    zero = np.array([-np.inf, 0.0, 0.0, 0.0], np.float32)
    res = compare_outputs({"y": zero}, {"y": ref})
    assert not res.passed and res.outputs[0].all_zero
    wrong = np.array([-np.inf, 1.0, 0.25, -1.0], np.float32)
    assert not compare_outputs({"y": wrong}, {"y": ref}).passed
    everything_masked = np.full(4, -np.inf, np.float32)
    assert compare_outputs({"y": everything_masked}, {"y": everything_masked}).passed


def test_samples_keep_the_worst_output_and_every_reason() -> None:
    ref = np.array([np.nan, 1.0, 2.0], np.float32)
    good, bad = ref.copy(), ref.copy()
    bad[2] = np.inf
    res = compare_samples([{"y": good}, {"y": bad}], [{"y": ref}, {"y": ref}])
    assert not res.passed
    assert res.reasons[0].startswith("sample 1: y:")
    assert not res.outputs[0].passed
