"""Helpers for the package and store tests: a controller key, enrolled device roots, small
packages, byte surgery on package files, and a tiny MNN model made with MNN's own API."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from fleet_agent.context import AgentContext
from fleet_agent.identity import load_or_create_device_key
from fleet_agent.store import Store

from fleet.artifacts import build_package
from fleet.artifacts.keys import public_pem
from fleet.core.package import (
    Manifest,
    Recipient,
    bundle_path,
    check_envelope,
    find_envelope,
    open_envelope,
    parse_header,
    unwrap_data_key,
)
from fleet.core.package.chunks import TAG_SIZE

CHUNK = 4096  # small chunks so a few KiB make several (the default stays 1 MiB)


@dataclass
class Device:
    ctx: AgentContext
    key: ec.EllipticCurvePrivateKey

    @property
    def recipient(self) -> Recipient:
        return Recipient.from_public_key(self.key.public_key(), self.ctx.root.name)

    def store(self) -> Store:
        return Store(self.ctx)

    def stored_files(self) -> list[str]:
        return sorted(p.name for p in self.ctx.store.iterdir()) if self.ctx.store.exists() \
            else []


def make_device(root: Path, controller: ed25519.Ed25519PrivateKey) -> Device:
    """An enrolled device root: P-256 key made on the device, controller key pinned."""
    ctx = AgentContext(root)
    ctx.ensure()
    key, _ = load_or_create_device_key(ctx.device_key)
    ctx.trust_file.write_text(public_pem(controller.public_key()))
    return Device(ctx, key)


def payload_bytes(size: int, seed: int) -> bytes:
    """Deterministic, distinct per seed (cheap; no need for randomness here)."""
    block = bytes((seed * 31 + i * 7) % 256 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


def make_package(tmp: Path, signer: ed25519.Ed25519PrivateKey, devices: list[Device], *,
                 version: int, name: str = "m", size: int = 4 * CHUNK, seed: int | None = None,
                 kind: str = "model", base: dict[str, object] | None = None,
                 files: list[tuple[str, bytes]] | None = None, out: str | None = None,
                 recipients: list[Recipient] | None = None, entry: str | None = None,
                 envelopes: bool = True) -> tuple[Path, Manifest]:
    """A package (format 2 with its bundle ``OUT.envelopes`` beside it; format 1 with
    ``envelopes=False``)."""
    src = tmp / f"src-{name}-{version}-{os.urandom(3).hex()}"
    src.mkdir(parents=True)
    if files is None:
        files = [("model.mnn", payload_bytes(size, version if seed is None else seed))]
    pairs = []
    for rel, data in files:
        p = src / rel.replace("/", "_")
        p.write_bytes(data)
        pairs.append((rel, p))
    dest = tmp / (out or f"{name}-v{version}-{os.urandom(3).hex()}.fpkg")
    m = build_package(pairs, dest, name=name, version=version, kind=kind,
                      recipients=recipients or [d.recipient for d in devices],
                      signing_key=signer, entry=entry or files[0][0],
                      mnn_facts={"inputs": []}, base=base, chunk_size=CHUNK,
                      envelopes=envelopes)
    return dest, m


def envelope_of(pkg: Path, dev: Device) -> bytes | None:
    """``dev``'s key envelope from the bundle the build wrote beside ``pkg``."""
    return find_envelope(bundle_path(pkg), dev.recipient.fingerprint)


def data_key_of(pkg: Path, m: Manifest, dev: Device) -> bytes:
    """The package's data key as ``dev`` opens it (either format)."""
    fp = dev.recipient.fingerprint
    if m.uses_envelopes:
        return open_envelope(check_envelope(envelope_of(pkg, dev), m, fp), dev.key, m)
    return unwrap_data_key(m.recipients[fp], dev.key, fp, m.content_digest())


def split(path: Path) -> tuple[bytes, list[bytes]]:
    """(header bytes, ciphertext chunks) of a package file."""
    data = path.read_bytes()
    h = parse_header(data)
    m = Manifest.from_dict(__import__("json").loads(h.manifest_bytes))
    body = data[h.payload_offset:]
    step = m.chunk_size + TAG_SIZE
    return data[:h.payload_offset], [body[i:i + step] for i in range(0, len(body), step)]


def make_tiny_mnn(path: Path, *, seed: int = 0) -> Path:
    """A real, loadable MNN model (1x3x4x4 -> relu(W @ x)), built with MNN.expr."""
    import MNN
    import numpy as np

    F = MNN.expr
    x = F.placeholder([1, 3, 4, 4], F.NCHW, F.float)
    x.name = "input"
    w = np.random.default_rng(seed).standard_normal((8, 3)).astype(np.float32)
    y = F.relu(F.matmul(F.const(w, [8, 3], F.NCHW, F.float),
                        F.reshape(x, [3, 16])))
    y.name = "output"
    F.save([y], str(path))
    return path
