"""The agent's device root and the paths inside it (ARCHITECTURE.md "Device store").

Files: every directory of the root is created 0700 whatever the caller's umask, and a
root that another user owns, or whose directories are symbolic links or group/other
writable, is refused (:class:`~fleet.core.errors.UnsafeRootError`, via
:meth:`AgentContext.ensure`): a planted ``slots/<name> -> /elsewhere`` would otherwise make
an activation write outside the root. Temp files in the root are opened with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (:func:`fleet.core.fsutil.atomic_write`), so a planted
link at a predictable name is never written through.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fleet.core import errors

__all__ = ["DIR_MODE", "AgentContext", "check_dir", "make_private_dir"]

#: mode of every directory the agent creates in its root
DIR_MODE = 0o700
#: subfolders whose entries are folders too (one level is checked below them)
_NESTED = ("slots", "cache", "lora", "run")  # slots: two levels (slots/<name>/v<N>)


def _refuse(path: Path, why: str) -> errors.FleetError:
    return errors.UnsafeRootError(f"refusing the device root: {path} {why}",
                                  path=str(path), reason=why)


def check_dir(path: Path, *, uid: int | None = None) -> None:
    """Refuse ``path`` unless it is a real directory (not a link) owned by ``uid`` (this
    process's by default) and not writable by group or others."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is not a directory")
    if st.st_uid != (os.getuid() if uid is None else uid):
        raise _refuse(path, f"is owned by uid {st.st_uid}, not by this agent's")
    if st.st_mode & 0o022:
        raise _refuse(path, f"is group/other-writable (mode {stat.S_IMODE(st.st_mode):o})")


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) 0700 whatever the umask, then check it."""
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            pass
        else:
            os.chmod(d, DIR_MODE)  # the umask may have taken bits we meant to keep
    check_dir(path)


@dataclass(frozen=True)
class AgentContext:
    root: Path

    @classmethod
    def from_env(cls, root: str | None) -> AgentContext:
        value = root or os.environ.get("FLEET_AGENT_ROOT")
        if not value:
            value = str(Path.home() / ".fleet-agent")
        return cls(Path(value).expanduser())

    @property
    def identity_dir(self) -> Path:
        return self.root / "identity"

    @property
    def device_key(self) -> Path:
        return self.identity_dir / "device_key.pem"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def slots(self) -> Path:
        return self.root / "slots"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def trust_file(self) -> Path:
        """The controller's Ed25519 public key, pinned at enrollment."""
        return self.identity_dir / "controller.pub"

    def ensure(self) -> None:
        """Create the root's folders (0700) and refuse an unsafe root (see the module
        docstring): the root, its folders and the folders one level below ``slots/``,
        ``cache/``, ``lora/`` and ``run/`` must be real directories of this user, not
        group/other-writable. Raises :class:`~fleet.core.errors.UnsafeRootError`."""
        check_dir(self.root)
        for d in (self.root, self.store, self.slots, self.incoming, self.cache,
                  self.reports, self.identity_dir):
            make_private_dir(d)
        self.check()

    def check(self) -> None:
        """Refuse an unsafe root without creating anything (cheap: a few ``lstat``)."""
        check_dir(self.root)
        for name in ("store", "slots", "incoming", "cache", "reports", "identity", *_NESTED):
            d = self.root / name
            check_dir(d)
            if name in _NESTED:
                _check_below(d, 2 if name == "slots" else 1)


def _check_below(d: Path, depth: int) -> None:
    """:func:`check_dir` on every folder (and folder link) up to ``depth`` levels below."""
    if depth <= 0 or not os.path.isdir(d) or os.path.islink(d):
        return
    with os.scandir(d) as entries:
        for entry in entries:
            if entry.is_symlink() or entry.is_dir(follow_symlinks=False):
                check_dir(Path(entry.path))
                _check_below(Path(entry.path), depth - 1)
