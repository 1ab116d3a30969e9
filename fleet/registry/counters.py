"""Monotonic counters in the registry: the signing sequence of packages and orders.

Why not the clock: a device refuses a rollback order whose sequence is not above every
sequence it has seen, so one package signed while the controller's clock was a year ahead
would block every later order for a year (``cases/clock-ahead-blocks-rollback``). A
counter only goes up, whatever the clock does.

The first use seeds the counter once above everything issued before it: the highest
``sequence`` in the registry's packages, and the clock in milliseconds (earlier releases
used it, and devices may have seen such numbers from rollback orders, which the registry
did not keep). After that the clock is never read. One ``UPDATE ... RETURNING`` per
number, so concurrent controllers on one registry never hand out the same one.
"""

from __future__ import annotations

import time

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from fleet.registry.api import Registry
from fleet.registry.models import Artifact, Counter

__all__ = ["SEQUENCE", "next_value", "peek"]

SEQUENCE = "sequence"


def _seed(reg: Registry) -> int:
    highest = 0
    with reg.session() as s:
        for manifest in s.exec(select(Artifact.manifest)).all():
            seq = (manifest or {}).get("sequence")
            if isinstance(seq, int) and seq > highest:
                highest = seq
    return max(highest, time.time_ns() // 1_000_000)


def next_value(reg: Registry, name: str = SEQUENCE) -> int:
    """The next value of counter ``name`` (strictly above every value handed out)."""
    for _ in range(3):
        with reg.session() as s:
            got = s.exec(update(Counter).where(col(Counter.name) == name)
                         .values(value=col(Counter.value) + 1)
                         .returning(col(Counter.value))).first()
            if got is not None:
                return int(got[0])
        seed = _seed(reg) + 1
        try:
            with reg.session() as s:
                s.add(Counter(name=name, value=seed))
            return seed
        except IntegrityError:
            continue  # another controller created it first: take the next one
    raise RuntimeError(f"counter {name} could not be advanced")


def peek(reg: Registry, name: str = SEQUENCE) -> int | None:
    """The last value handed out, or None before the first."""
    with reg.session() as s:
        row = s.get(Counter, name)
        return int(row.value) if row is not None else None
