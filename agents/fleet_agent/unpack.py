"""Decrypt a stored package into memory only: one ``memfd`` per payload file.

MNN has no model encryption and pymnn loads only from a path, so the plaintext goes into
anonymous memory files (``memfd_create``) and MNN is handed ``/proc/self/fd/N``. Nothing
is written to a disk. Each memfd is sealed after the digests check out (no writes, no
resizing), so code that later reads it sees exactly the verified bytes. The fds are
close-on-exec; pass them explicitly (``pass_fds``) to a child that must read them.

An MNN-LLM folder needs its files side by side (``config.json`` names ``llm.mnn``), which
fd paths cannot give: ``as_dir=True`` writes them into a private 0700 directory on a
tmpfs (RAM, ``/dev/shm``), refused if that is not a tmpfs, removed on exit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fleet.core import errors
from fleet.core.package import Limits, Manifest, decrypt_package
from fleet.core.package.verify import Signers

__all__ = ["OpenedPayload", "open_in_memory", "tmpfs_dir"]

_SEALS = (getattr(fcntl, "F_SEAL_SEAL", 1) | getattr(fcntl, "F_SEAL_SHRINK", 2)
          | getattr(fcntl, "F_SEAL_GROW", 4) | getattr(fcntl, "F_SEAL_WRITE", 8))


@dataclass
class OpenedPayload:
    """The decrypted payload: ``paths`` maps each payload file to a path MNN can open."""

    manifest: Manifest
    paths: dict[str, str]
    fds: dict[str, int] = field(default_factory=dict)
    directory: str | None = None

    @property
    def entry(self) -> str:
        """Path of the main model file."""
        return self.paths[self.manifest.entry]

    @property
    def golden(self) -> str | None:
        return self.paths[self.manifest.golden] if self.manifest.golden else None


def _is_tmpfs(path: Path) -> bool:
    best, fstype = "", ""
    real = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                mnt = parts[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    return fstype in ("tmpfs", "ramfs")


def tmpfs_dir(base: str = "/dev/shm") -> Path:
    """A fresh private directory on a RAM file system, or StoreError."""
    p = Path(base)
    if not p.is_dir() or not _is_tmpfs(p):
        raise errors.StoreError(f"{base} is not a tmpfs; refusing to write plaintext there",
                                path=base)
    return Path(tempfile.mkdtemp(prefix="fleet-", dir=base))


def _write_all(fd: int, view: memoryview, path: str) -> None:
    while view:
        try:
            n = os.write(fd, view)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise errors.StoreError(f"out of memory decrypting {path}", path=path) from exc
            raise
        view = view[n:]


@contextlib.contextmanager
def open_in_memory(package: str | os.PathLike[str], trusted_signer: Signers,
                   device_key: ec.EllipticCurvePrivateKey, *, as_dir: bool = False,
                   limits: Limits | None = None, envelope: bytes | None = None
                   ) -> Iterator[OpenedPayload]:
    """Verify and decrypt ``package``; yield its files as memory paths; close on exit.
    ``envelope``: the device's key envelope (format-2 packages; kept by the store)."""
    if not as_dir and not hasattr(os, "memfd_create"):
        raise errors.StoreError("memfd_create is not available on this OS; use as_dir")
    fds: dict[str, int] = {}
    directory = tmpfs_dir() if as_dir else None

    def write(path: str, view: memoryview) -> None:
        fd = fds.get(path)
        if fd is None:
            if directory is not None:
                target = directory / path
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o600)
            else:
                fd = os.memfd_create(path.replace("/", "_")[:200],
                                     os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            fds[path] = fd
        _write_all(fd, view, path)

    try:
        m = decrypt_package(package, trusted_signer, device_key, write=write, limits=limits,
                            envelope=envelope)
        paths: dict[str, str] = {}
        for f in m.files:
            if f.path not in fds:  # an empty file got no write
                write(f.path, memoryview(b""))
            fd = fds[f.path]
            if directory is None:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
                os.lseek(fd, 0, os.SEEK_SET)
                paths[f.path] = f"/proc/self/fd/{fd}"
            else:
                paths[f.path] = str(directory / f.path)
        if directory is not None:
            for fd in fds.values():
                os.close(fd)
            fds.clear()
        yield OpenedPayload(m, paths, dict(fds), str(directory) if directory else None)
    finally:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
