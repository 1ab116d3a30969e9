"""Trust decisions as pure functions over bytes and state (python-tuf's trusted set style).

No I/O here: the caller reads the header, the pinned controller key and ``state.json``,
and these functions decide. Each refusal is its own error class (docs/package-format.md
lists the threats). Order of checks in :func:`verify_manifest`, and why:

1. layout and size caps (FormatError, SizeLimitError): before anything is parsed further;
2. a signature is present (UnsignedError);
3. the manifest names a trusted signer (UntrustedSignerError): another key signed it, or
   a key the device's root of trust no longer lists (revoked, :mod:`.trust`);
4. the Ed25519 signature verifies (BadSignatureError): the trusted key signed *something*,
   and these bytes are not it, i.e. they were edited after signing;
5. the manifest is well formed (FormatError; its type matches the header's format
   version) and within limits (SizeLimitError);
6. this device is a recipient: format 1, its fingerprint is in ``recipients``
   (NotRecipientError); format 2, its key envelope came (MissingEnvelopeError), is well
   formed (EnvelopeFormatError), names this manifest (EnvelopeMismatchError) and this
   device (NotRecipientError);
7. version rules against the installed state (ReplayError, RollbackError).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet.core import errors
from fleet.core.package.canonical import parse_canonical
from fleet.core.package.envelope import Envelope, check_envelope
from fleet.core.package.keyid import fingerprint_public_key
from fleet.core.package.layout import Header, parse_header
from fleet.core.package.limits import Limits
from fleet.core.package.manifest import Manifest

__all__ = ["ModelState", "RollbackAllowance", "Signers", "check_base_binding",
           "check_limits", "check_recipient", "check_signature", "check_version",
           "verify_manifest"]

#: who may sign: one pinned key, or the online keys of the device's root (a KeyRing)
Signers = ed25519.Ed25519PublicKey | Mapping[str, ed25519.Ed25519PublicKey]


def _ring(signers: Signers) -> Mapping[str, ed25519.Ed25519PublicKey]:
    if isinstance(signers, ed25519.Ed25519PublicKey):
        return {fingerprint_public_key(signers): signers}
    return signers


@dataclass(frozen=True)
class ModelState:
    """What a device has for one model name (from its ``state.json``).

    ``floor`` is the highest version ever accepted: a version at or below it needs a
    rollback order, even after a local switch back to ``previous``. ``sequence`` is the
    highest signed sequence number seen for the name (packages and rollback orders)."""

    active: int | None = None
    floor: int = 0
    sequence: int = 0


@dataclass(frozen=True)
class RollbackAllowance:
    """A verified rollback order, reduced to what the version rule needs."""

    name: str
    version: int
    sequence: int


def check_signature(manifest_bytes: bytes, sig_alg: int, signature: bytes,
                    trusted_signer: Signers, what: str = "manifest") -> dict[str, Any]:
    """Steps 2-4 above; returns the parsed (canonical) JSON object."""
    ring = _ring(trusted_signer)
    if sig_alg == 0 or not signature:
        raise errors.UnsignedError(f"{what} is not signed")
    try:
        doc = parse_canonical(manifest_bytes, what)
    except errors.FormatError as exc:
        # Bytes that do not even parse cannot tell us their signer; they were altered.
        for key in ring.values():
            try:
                key.verify(signature, manifest_bytes)
            except InvalidSignature:
                continue
            raise exc from None  # a trusted key signed these bytes: they are just malformed
        raise errors.BadSignatureError(f"{what} does not match its signature") from exc
    signer = doc.get("signer") if isinstance(doc, dict) else None
    found = ring.get(signer) if isinstance(signer, str) else None
    if found is None:
        trusted = ", ".join(sorted(ring)) or "(no key)"
        version = getattr(ring, "version", None)
        raise errors.UntrustedSignerError(
            f"{what} is signed by {signer}, this device trusts {trusted}"
            + (f" (root v{version})" if version is not None else ""),
            signer=signer, trusted=trusted, root_version=version)
    try:
        found.verify(signature, manifest_bytes)
    except InvalidSignature as exc:
        raise errors.BadSignatureError(
            f"{what} signature does not verify: changed after signing, or signed by a key "
            "that claims to be the trusted one", signer=signer) from exc
    return doc


def check_limits(m: Manifest, limits: Limits) -> None:
    if m.size > limits.max_payload_bytes:
        raise errors.SizeLimitError(f"payload of {m.size} bytes exceeds the limit",
                                    size=m.size, limit=limits.max_payload_bytes)
    if not limits.min_chunk_size <= m.chunk_size <= limits.max_chunk_size:
        raise errors.SizeLimitError(f"chunk size {m.chunk_size} is out of bounds",
                                    chunk_size=m.chunk_size)
    if m.chunks >= 2**32:
        raise errors.SizeLimitError("too many chunks", chunks=m.chunks)
    if len(m.files) > limits.max_files:
        raise errors.SizeLimitError(f"{len(m.files)} files exceed the limit",
                                    files=len(m.files), limit=limits.max_files)


def check_version(m: Manifest, state: ModelState | None,
                  allowance: RollbackAllowance | None = None) -> None:
    """Strictly newer than anything accepted before, unless a rollback order says so."""
    if state is None or state.floor == 0 or m.version > state.floor:
        return
    if (allowance is not None and allowance.name == m.name
            and allowance.version == m.version and allowance.sequence > state.sequence):
        return
    details = {"name": m.name, "version": m.version, "installed": state.active,
               "floor": state.floor}
    if m.version == state.floor or m.version == state.active:
        raise errors.ReplayError(
            f"{m.name} version {m.version} was already installed here", **details)
    raise errors.RollbackError(
        f"{m.name} version {m.version} is older than version {state.floor} installed "
        "before; a rollback needs a signed rollback order", **details)


def check_base_binding(m: Manifest, installed_base: Manifest | None) -> None:
    """A LoRA works only on the exact base export it was made from (FIELD-NOTES): compare
    the digests (and quantization) the LoRA is bound to with the installed base's files."""
    if m.kind != "lora":
        return
    base = m.base or {}
    if installed_base is None:
        raise errors.BaseMismatchError(
            f"LoRA {m.name} needs base {base.get('name')!r}, which is not installed",
            reason="base_not_installed", base=base.get("name"))
    by_name = {f.path.rsplit("/", 1)[-1]: f.sha256 for f in installed_base.files}
    mismatches: dict[str, Any] = {}
    if base.get("name") not in (None, installed_base.name):
        mismatches["name"] = [base.get("name"), installed_base.name]
    for key, fname in (("llm_mnn_sha256", "llm.mnn"), ("llm_weight_sha256", "llm.mnn.weight")):
        want = base.get(key)
        if want is not None and by_name.get(fname) != want:
            mismatches[key] = [want, by_name.get(fname)]
    facts = installed_base.mnn or {}
    for key in ("quant_bits", "quant_block"):
        if base.get(key) is not None and facts.get(key) is not None \
                and base[key] != facts[key]:
            mismatches[key] = [base[key], facts[key]]
    if mismatches:
        raise errors.BaseMismatchError(
            f"LoRA {m.name} is bound to another base than {installed_base.name} "
            f"v{installed_base.version}", reason="digest_mismatch", mismatches=mismatches)


def check_recipient(m: Manifest, device_fingerprint: str, envelope: bytes | None
                    ) -> Envelope | None:
    """Step 6: is the package for this device? Format 2 answers from its envelope (which
    is returned); format 1 from ``recipients`` (an envelope is then ignored)."""
    if m.uses_envelopes:
        return check_envelope(envelope, m, device_fingerprint)
    if device_fingerprint not in m.recipients:
        raise errors.NotRecipientError(
            f"package {m.name} v{m.version} is not addressed to this device",
            device=device_fingerprint, recipients=sorted(m.recipients))
    return None


def verify_manifest(header_bytes: bytes, trusted_signer: Signers,
                    device_fingerprint: str | None,
                    installed_state: Mapping[str, ModelState] | None,
                    *, limits: Limits | None = None,
                    allowance: RollbackAllowance | None = None,
                    envelope: bytes | None = None) -> Manifest:
    """Decide whether a package header may be installed here; return its manifest.

    ``device_fingerprint`` None skips the recipient check and ``installed_state`` None the
    version check (the controller reading its own packages). ``envelope``: this device's
    key envelope (format 2)."""
    limits = limits or Limits()
    header: Header = parse_header(header_bytes, limits)
    doc = check_signature(header.manifest_bytes, header.sig_alg, header.signature,
                          trusted_signer)
    m = Manifest.from_dict(doc)
    if m.format != header.version:
        raise errors.FormatError(
            f"a format {header.version} package holds a format {m.format} manifest",
            version=header.version, manifest_format=m.format)
    check_limits(m, limits)
    if device_fingerprint is not None:
        check_recipient(m, device_fingerprint, envelope)
    if installed_state is not None:
        check_version(m, installed_state.get(m.name), allowance)
    return m
