"""How packages reach farm workers: a directory that the controller and every worker
share (``artifacts.location``; by default the controller home's ``artifacts/``, which is
what a worker on the controller's machine, or a home on a shared mount, sees).

The controller names a package by its path relative to the location (:func:`publish`,
which copies a package built elsewhere into the location under its sha256, with its key
envelope bundle, atomically); a worker opens it there (:func:`fetch`), and the push that
follows checks its sha256 end to end as every push does. HTTP with Range for hosts that cannot
share a directory is not built (pull mode's server will serve packages that way).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from fleet.artifacts.envelopes import copy_package
from fleet.core import errors

__all__ = ["fetch", "publish"]


def publish(location: Path, package: Path, sha256: str) -> str:
    """The key (relative POSIX path) under which workers find ``package`` in
    ``location``; copies it there first (atomically, named by its sha256) when it lives
    elsewhere. Raises NotFoundError for a missing package, OSError when the location
    cannot be written."""
    if not package.is_file():
        raise errors.NotFoundError(f"package {package} is gone", path=str(package))
    loc = location.resolve()
    src = package.resolve()
    if loc in src.parents:
        return src.relative_to(loc).as_posix()
    key = f"farm/{sha256}{src.suffix}"
    dest = loc / key
    if dest.is_file() and dest.stat().st_size == src.stat().st_size:
        return key
    dest.parent.mkdir(parents=True, exist_ok=True)
    copy_package(src, dest)  # with its key envelopes (format 2), atomically
    return key


def fetch(location: Path, key: str) -> Path:
    """The local path of a published package; NotFoundError when this host does not see
    it (the location is not shared with the controller, or the package was pruned)."""
    rel = PurePosixPath(key)
    if rel.is_absolute() or ".." in rel.parts:
        raise errors.UsageError(f"bad artifact key {key!r}", key=key)
    path = location / Path(*rel.parts)
    if not path.is_file():
        raise errors.NotFoundError(
            f"package {key} is not in the artifact location {location} on this host (is "
            "artifacts.location shared with the controller?)", key=key,
            location=str(location))
    return path
