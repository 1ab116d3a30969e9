"""Compare a candidate's outputs with the reference outputs.

Why these measures (FIELD-NOTES 3 and 5): a backend that runs is not a backend that works
(Metal once returned all zeros), and a weight-quantized variant can break a model while
still producing plausible numbers. So each output is checked for shape, for NaN and Inf
where the reference has none, and for all-zero, then for direction (cosine similarity) and
for the largest error relative to the output's range (max abs error / max |reference|,
MNN's own test measure). The max relative error is reported but not gated: it explodes on
elements that are near zero in the reference.

NaN and Inf by design (FIELD-NOTES "Facts found since"): masked attention logits are
-inf and some models give NaN on purpose (sqrt/log of negative inputs). So NaN, +Inf and
-Inf are compared *by position*: a NaN where the reference has a NaN matches, +Inf matches
+Inf and -Inf matches -Inf at the same index; any other pairing (a NaN or Inf where the
reference is finite, a finite value where it is not, +Inf against -Inf) fails the output.
The numeric measures are then computed over the positions finite in both.

Thresholds (documented in ``docs/audit-rules.md``, "Comparison", FA003):
- shapes equal (not only element counts: ``[0, 8]`` is not ``[1, 0]``)
- cosine similarity >= 0.995
- max abs error <= 0.05 x max |reference|  (MNN's converter check uses 0.01 for a float
  conversion; a device candidate may be fp16 or weight-quantized, so the gate is looser)
- integer outputs: at least 99 % of elements equal
- an all-zero output fails unless the reference is all zero too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["Comparison", "OutputComparison", "Thresholds", "compare_outputs",
           "compare_samples"]


@dataclass(frozen=True)
class Thresholds:
    cosine_min: float = 0.995
    max_abs_vs_range: float = 0.05
    int_equal_min: float = 0.99

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    cosine: float | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    ref_max_abs: float | None = None
    nan: bool = False  # the output holds a NaN somewhere (matched or not)
    inf: bool = False  # the output holds a +Inf or -Inf somewhere (matched or not)
    nonfinite_matched: int = 0  # NaN/Inf elements at the reference's NaN/Inf positions
    nonfinite_mismatched: int = 0  # positions where NaN/+Inf/-Inf/finite disagree
    all_zero: bool = False
    passed: bool = False
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Comparison:
    passed: bool
    outputs: list[OutputComparison] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def worst_cosine(self) -> float | None:
        values = [o.cosine for o in self.outputs if o.cosine is not None]
        return min(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons,
                "worst_cosine": self.worst_cosine,
                "outputs": [o.to_dict() for o in self.outputs]}


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _kind(x: np.ndarray) -> np.ndarray:
    """Per element: 0 finite, 1 NaN, 2 +Inf, 3 -Inf (int8, same shape as ``x``)."""
    kind = np.zeros(x.shape, np.int8)
    kind[np.isnan(x)] = 1
    kind[np.isposinf(x)] = 2
    kind[np.isneginf(x)] = 3
    return kind


_KIND_NAMES = ("finite", "NaN", "+Inf", "-Inf")


def _nonfinite_mismatch(a: np.ndarray, b: np.ndarray) -> tuple[int, int, str]:
    """Compare NaN/+Inf/-Inf by position: (matched, mismatched, reason of the first).

    ``a`` (candidate) and ``b`` (reference) are flat float64 arrays of equal length.
    """
    ka, kb = _kind(a), _kind(b)
    bad = np.flatnonzero(ka != kb)
    matched = int(np.count_nonzero((ka == kb) & (kb != 0)))
    if not bad.size:
        return matched, 0, ""
    i = int(bad[0])
    got_kind, ref_kind = _KIND_NAMES[ka[i]], _KIND_NAMES[kb[i]]
    got_txt = got_kind if ka[i] else f"{a[i]:.6g}"
    ref_txt = ref_kind if kb[i] else f"{b[i]:.6g}"
    return matched, int(bad.size), (
        f"{int(bad.size)} element(s) disagree on NaN/Inf with the reference (first at flat "
        f"index {i}: got {got_txt}, reference {ref_txt})")


def _compare_one(name: str, got: np.ndarray, ref: np.ndarray, th: Thresholds
                 ) -> OutputComparison:
    oc = OutputComparison(name=name, shape=list(got.shape))
    if tuple(got.shape) != tuple(ref.shape):
        oc.reason = f"shape {list(got.shape)} != reference {list(ref.shape)}"
        return oc
    if np.issubdtype(ref.dtype, np.integer) and np.issubdtype(got.dtype, np.integer):
        equal = float(np.mean(got.reshape(-1) == ref.reshape(-1))) if ref.size else 1.0
        oc.cosine = equal  # fraction equal stands in for similarity on integer outputs
        oc.max_abs = float(np.max(np.abs(got.astype(np.int64) - ref.astype(np.int64)))
                           ) if ref.size else 0.0
        oc.passed = equal >= th.int_equal_min
        oc.reason = "" if oc.passed else f"only {equal:.1%} of integer elements equal"
        return oc
    a_all = got.astype(np.float64).reshape(-1)
    b_all = ref.astype(np.float64).reshape(-1)
    oc.nan = bool(np.isnan(a_all).any())
    oc.inf = bool(np.isinf(a_all).any())
    oc.nonfinite_matched, oc.nonfinite_mismatched, why = _nonfinite_mismatch(a_all, b_all)
    if oc.nonfinite_mismatched:
        oc.reason = why
        return oc
    finite = np.isfinite(b_all)  # == finite in both, the kinds agree everywhere
    a, b = a_all[finite], b_all[finite]
    ref_zero = not np.any(b)
    oc.all_zero = bool(a.size and not np.any(a))
    oc.ref_max_abs = float(np.max(np.abs(b))) if b.size else 0.0
    if oc.all_zero and not ref_zero:
        oc.reason = "output is all zeros (reference is not)"
        return oc
    diff = np.abs(a - b)
    oc.max_abs = float(diff.max()) if diff.size else 0.0
    denom = np.maximum(np.abs(b), 1e-12)
    oc.max_rel = _finite(float((diff / denom).max())) if diff.size else 0.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    oc.cosine = 1.0 if na == 0.0 and nb == 0.0 else (
        float(np.dot(a, b) / (na * nb)) if na and nb else 0.0)
    if not np.isfinite(oc.cosine):  # norms overflow on values near the float64 limit
        oc.cosine = float(np.dot(a / na, b / nb)) if na and nb else 0.0
    limit = th.max_abs_vs_range * oc.ref_max_abs
    problems = []
    if oc.cosine < th.cosine_min:
        problems.append(f"cosine {oc.cosine:.5f} < {th.cosine_min}")
    if oc.max_abs > limit + 1e-7:
        problems.append(f"max abs error {oc.max_abs:.4g} > {th.max_abs_vs_range} x "
                        f"max|ref| ({limit:.4g})")
    oc.passed = not problems
    oc.reason = "; ".join(problems)
    return oc


def compare_outputs(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
                    thresholds: Thresholds | None = None) -> Comparison:
    """Every reference output must be present in ``got`` and pass."""
    th = thresholds or Thresholds()
    result = Comparison(passed=True)
    for name in sorted(ref):
        if name not in got:
            result.passed = False
            result.reasons.append(f"output {name!r} missing")
            continue
        oc = _compare_one(name, np.asarray(got[name]), np.asarray(ref[name]), th)
        result.outputs.append(oc)
        if not oc.passed:
            result.passed = False
            result.reasons.append(f"{name}: {oc.reason}")
    return result


def compare_samples(got: Sequence[Mapping[str, np.ndarray]],
                    ref: Sequence[Mapping[str, np.ndarray]],
                    thresholds: Thresholds | None = None) -> Comparison:
    """Compare several samples; the result keeps the worst output of each name."""
    merged = Comparison(passed=True)
    worst: dict[str, OutputComparison] = {}
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        one = compare_outputs(g, r, thresholds)
        if not one.passed:
            merged.passed = False
            merged.reasons.extend(f"sample {i}: {reason}" for reason in one.reasons)
        for oc in one.outputs:
            prev = worst.get(oc.name)
            if prev is None or (prev.passed and not oc.passed) or (
                    prev.passed == oc.passed and (oc.cosine or 0.0) < (prev.cosine or 0.0)):
                worst[oc.name] = oc
    merged.outputs = [worst[k] for k in sorted(worst)]
    return merged
