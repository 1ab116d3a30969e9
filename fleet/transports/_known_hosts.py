"""The fleet-managed ``known_hosts`` file, and the fleet's ssh client key.

Strict host-key checking is the whole point: a device's host key is either pinned here
(by the operator accepting a fingerprint, or by the lab that made the key) or the
connection is refused. The file uses OpenSSH's format (``[host]:port keytype base64``),
so ``ssh -o UserKnownHostsFile=...`` reads the same file. Writers take an ``flock`` and
replace the file atomically: a fan-out may pin many boards at once.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet.core import errors
from fleet.core.filelock import exclusive

__all__ = [
    "KnownHosts",
    "ensure_ssh_key",
    "fingerprint",
    "host_pattern",
    "load_private_key",
    "public_key_line",
]


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint (unpadded base64 of the key blob's digest)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_pattern(host: str, port: int) -> str:
    """The known_hosts name OpenSSH uses: bare host on port 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def public_key_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


class KnownHosts:
    """Read and update one known_hosts file; never consults ``~/.ssh``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _load(self) -> paramiko.HostKeys:
        keys = paramiko.HostKeys()
        if self.path.exists():
            try:
                keys.load(str(self.path))
            except (OSError, paramiko.SSHException) as exc:
                raise errors.KeyMaterialError(f"cannot read known_hosts {self.path}: {exc}",
                                              path=str(self.path)) from exc
        return keys

    def lookup(self, host: str, port: int) -> dict[str, paramiko.PKey]:
        """Pinned keys for ``host:port`` by key type (empty when the host is unknown)."""
        entry = self._load().lookup(host_pattern(host, port))
        return {} if entry is None else {t: entry[t] for t in entry}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(self.path.with_name(self.path.name + ".lock")):
            yield

    def _rewrite(self, keep: list[str]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(line if line.endswith("\n") else line + "\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _lines_without(self, pattern: str) -> list[str]:
        if not self.path.exists():
            return []
        keep = []
        for line in self.path.read_text().splitlines(keepends=True):
            fields = line.split()
            if fields and not line.startswith("#") and pattern in fields[0].split(","):
                continue
            keep.append(line)
        return keep

    def pin(self, host: str, port: int, key: paramiko.PKey, *, replace: bool = False) -> None:
        """Record ``key`` for ``host:port``. ``replace`` drops earlier keys for it first
        (the lab re-creates boards at the same address; an operator never does this
        silently: :class:`ChangedHostKeyError` tells them to ``forget`` first)."""
        pattern = host_pattern(host, port)
        with self._locked():
            keep = self._lines_without(pattern) if replace else (
                self.path.read_text().splitlines(keepends=True) if self.path.exists() else [])
            keep.append(f"{pattern} {public_key_line(key)}\n")
            self._rewrite(keep)

    def forget(self, host: str, port: int) -> bool:
        pattern = host_pattern(host, port)
        with self._locked():
            before = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            keep = self._lines_without(pattern)
            if len(keep) != len(before):
                self._rewrite(keep)
                return True
        return False


# -- the fleet's client key ----------------------------------------------------------------
def ensure_ssh_key(path: Path) -> Path:
    """Create the fleet's ed25519 client key at ``path`` (0600, OpenSSH format) and its
    ``.pub`` if missing; refuse an existing key that others can read."""
    path = Path(path)
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise errors.KeyMaterialError(
                f"ssh key {path} is readable by others (mode {mode:o}); chmod 600 it",
                path=str(path))
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    os.replace(tmp, path)
    path.with_name(path.name + ".pub").write_bytes(public + b" mnn-fleet\n")
    return path


def load_private_key(path: Path) -> paramiko.PKey:
    """Load the client key (any type paramiko knows), refusing loose permissions."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise errors.KeyMaterialError(f"ssh key {path} missing: {exc}", path=str(path)) from exc
    if mode & 0o077:
        raise errors.KeyMaterialError(
            f"ssh key {path} is readable by others (mode {mode:o}); chmod 600 it",
            path=str(path))
    try:
        return paramiko.PKey.from_path(str(path))
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise errors.KeyMaterialError(f"cannot load ssh key {path}: {exc}",
                                      path=str(path)) from exc
