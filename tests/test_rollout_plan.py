"""Pure planning: what to do per device, and how targets are cut into waves."""

from __future__ import annotations

import pytest

from fleet.cli._exit import exit_code_for
from fleet.core import errors
from fleet.rollout.plan import ActionKind, decide, parse_waves, split_waves


def test_decide() -> None:
    assert decide(None, name="m", version=1, digest="a").kind == "deploy"
    assert decide({"version": 1, "digest": "a"}, name="m", version=1, digest="a").kind == "skip"
    assert decide({"version": 1, "digest": "a"}, name="m", version=2, digest="b").kind == \
        "deploy"
    assert decide({"version": 3, "digest": "c"}, name="m", version=2, digest="b").kind == \
        "refuse"
    assert decide({"version": 2, "digest": "x"}, name="m", version=2, digest="b").kind == \
        "refuse"


def test_split_waves() -> None:
    names = [f"d{i:02d}" for i in range(10)]
    assert split_waves(names, "1,25%,100%") == [names[:1], names[1:3], names[3:]]
    assert split_waves(names, "3") == [names[:3], names[3:]]  # the rest always follows
    assert split_waves(names, "50%,100%") == [names[:5], names[5:]]
    assert split_waves(names[:2], "5") == [names[:2]]
    assert split_waves(names[:2], "1,10%,100%") == [names[:1], names[1:2]]  # 10% adds none
    assert split_waves(names, " 2 , 12.5% ") == [names[:2], names[2:]]  # 12.5% of 10: 2
    for bad in ("", "0", "x%", "-1", "50%,25%", "50%,50%,100%", "3,2", "100%,5", "101%",
                "0%", "1,,2", "abc"):
        with pytest.raises(errors.UsageError):
            parse_waves(bad)
        with pytest.raises(errors.UsageError):
            split_waves(names, bad)


def test_plan_refusal_is_a_rollout_error_not_a_package_attack() -> None:
    action = decide({"version": 3, "digest": "c"}, name="m", version=2, digest="b")
    assert action.kind is ActionKind.REFUSE
    err = action.refusal("d1", "m")
    assert isinstance(err, errors.PlanError) and isinstance(err, errors.RolloutError)
    assert not isinstance(err, errors.PackageError)  # RollbackError is the attack
    assert exit_code_for(err) == 17 and err.code == "plan_refused"
    assert err.details == {"device": "d1", "model": "m"}
    # the code travels as data and comes back as the same class
    assert type(errors.error_from_code(err.code, err.message)) is errors.PlanError
