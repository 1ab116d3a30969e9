"""Atomic version allocation: one payload digest per ``name@version``, ever.

A version is claimed by inserting its :class:`ArtifactVersion` row (UNIQUE(name, version))
in the same transaction that read the versions already taken. On SQLite every transaction
is ``BEGIN IMMEDIATE``, so two controllers queue; on PostgreSQL a claim takes an advisory
lock on the name first (:func:`fleet.registry.db.serialize`), so they queue there too.
Should two claims still race (another backend), the loser's insert hits the UNIQUE
constraint, rolls back and reads again (a few attempts, jittered backoff). Rules:

- the same digest under a name is the same version (a re-run sends nothing);
- a new digest gets one more than the highest version of the name;
- an explicit version is taken if free, reused if it holds the same digest, and refused
  with :class:`DuplicateError` (exit 6, "exists with another digest") otherwise.

A claimed version whose package was never built stays claimed for its digest: a later run
of that payload reuses it, any other payload gets the next one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet.core import errors
from fleet.registry.api import Registry
from fleet.registry.db import serialize
from fleet.registry.models import Artifact, ArtifactVersion

__all__ = ["VersionClaim", "claim_version", "record_package"]

T = TypeVar("T")

#: attempts at a claim that lost a race on the UNIQUE constraint
ATTEMPTS = 5


@dataclass(frozen=True)
class VersionClaim:
    """``name@version`` stands for the payload ``digest``; ``reused``: it already did."""

    name: str
    version: int
    kind: str
    digest: str
    reused: bool


def _claim_in(s: Session, name: str, kind: str, digest: str, version: int | None
              ) -> VersionClaim:
    """The claim, inside the caller's transaction (it inserts the row when new)."""
    serialize(s, f"version:{name}")  # PostgreSQL: claims of one name queue, as on SQLite
    rows = list(s.exec(select(ArtifactVersion).where(ArtifactVersion.name == name)).all())
    if version is not None:
        if version < 1:
            raise errors.UsageError(f"version {version} of {name}: versions start at 1",
                                    name=name, version=version)
        found = next((r for r in rows if r.version == version), None)
        if found is not None:
            _check_same(found, kind, digest)
            return VersionClaim(name, version, found.kind, digest, reused=True)
        chosen = version
    else:
        same = [r for r in rows if r.digest == digest]
        if same:
            best = max(same, key=lambda r: r.version)
            _check_same(best, kind, digest)
            return VersionClaim(name, best.version, best.kind, digest, reused=True)
        chosen = max((r.version for r in rows), default=0) + 1
    s.add(ArtifactVersion(name=name, version=chosen, kind=kind, digest=digest))
    s.flush()  # the UNIQUE constraint speaks here, inside the transaction
    return VersionClaim(name, chosen, kind, digest, reused=False)


def _check_same(row: ArtifactVersion, kind: str, digest: str) -> None:
    if row.digest != digest:
        raise errors.DuplicateError(
            f"{row.name}@{row.version} exists with another digest ({row.digest[:12]}, this "
            f"build is {digest[:12]}): give another --version, or leave --version out to "
            "get the next one", name=row.name, version=row.version, digest=row.digest,
            new_digest=digest)
    if row.kind != kind:
        raise errors.DuplicateError(
            f"{row.name}@{row.version} exists as a {row.kind}, not a {kind}: choose another "
            "name", name=row.name, version=row.version, kind=row.kind)


def _retrying(fn: Callable[[], T], name: str) -> T:
    for attempt in range(ATTEMPTS):
        try:
            return fn()
        except IntegrityError as exc:
            if attempt == ATTEMPTS - 1:
                raise errors.RegistryBusyError(
                    f"could not allocate a version of {name}: {ATTEMPTS} concurrent claims "
                    "won the race; try again", name=name) from exc
            time.sleep(min(0.05 * 2 ** attempt, 1.0) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def claim_version(reg: Registry, *, name: str, kind: str, digest: str,
                  version: int | None = None) -> VersionClaim:
    """Allocate (or find) the version of payload ``digest`` under ``name`` (rules in the
    module docstring). Raises DuplicateError (the version holds another digest or kind),
    UsageError (version < 1), and the registry errors of storage faults."""
    def once() -> VersionClaim:
        with reg.session() as s:
            return _claim_in(s, name, kind, digest, version)

    return _retrying(once, name)


def record_package(reg: Registry, *, name: str, kind: str, version: int, digest: str,
                   package_sha256: str, size: int, path: str, manifest: dict[str, Any]
                   ) -> tuple[Artifact, VersionClaim]:
    """Record one package file of ``name@version`` and check (or claim) that version for
    its digest, in one transaction: a package is never recorded under a version that holds
    another payload. Returns the artifact row (the existing one for a known package file)
    and the claim. Raises DuplicateError as :func:`claim_version`."""
    def once() -> tuple[Artifact, VersionClaim]:
        with reg.session() as s:
            claim = _claim_in(s, name, kind, digest, version)
            found = s.exec(select(Artifact)
                           .where(col(Artifact.package_sha256) == package_sha256)).first()
            if found is not None:
                return found, claim
            art = Artifact(name=name, kind=kind, version=version, digest=digest,
                           package_sha256=package_sha256, size=size, path=path,
                           manifest=manifest)
            s.add(art)
            s.flush()
            return art, claim

    return _retrying(once, name)
