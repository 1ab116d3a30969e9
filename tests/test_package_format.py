"""The package format itself: round trips, layout edge cases, canonical JSON, bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fleet.artifacts import build_package
from fleet.artifacts.keys import public_pem
from fleet.core import errors
from fleet.core.package import (
    Manifest,
    Recipient,
    decrypt_package,
    encode_header,
    parse_header,
    verify_manifest,
)
from fleet.core.package.canonical import canonical_bytes, parse_canonical


@pytest.fixture
def keys() -> tuple[ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey]:
    return ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())


def _build(tmp: Path, keys, files: dict[str, bytes], **kw):  # type: ignore[no-untyped-def]
    signer, dev = keys
    pairs = []
    for i, (rel, data) in enumerate(files.items()):
        p = tmp / f"in{i}"
        p.write_bytes(data)
        pairs.append((rel, p))
    out = tmp / "p.fpkg"
    kw.setdefault("entry", next(iter(files)))
    m = build_package(pairs, out, name=kw.pop("name", "m"), version=1, kind="model",
                      recipients=[Recipient.from_public_key(dev.public_key())],
                      signing_key=signer, mnn_facts=None, **kw)
    return out, m


def _open(out: Path, keys) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    got: dict[str, bytearray] = {}
    decrypt_package(out, keys[0].public_key(), keys[1],
                    write=lambda p, v: got.setdefault(p, bytearray()).extend(v))
    return {k: bytes(v) for k, v in got.items()}


def test_round_trip_of_several_files_with_an_empty_one(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    files = {"llm.mnn": b"a" * 5000, "empty.bin": b"", "sub/llm.mnn.weight": b"w" * 9001}
    out, m = _build(tmp_path, keys, files, chunk_size=4096)
    assert [f.offset for f in m.files] == [0, 5000, 5000] and m.chunks == 4
    got = _open(out, keys)
    assert got["llm.mnn"] == files["llm.mnn"]
    assert got["sub/llm.mnn.weight"] == files["sub/llm.mnn.weight"]
    assert got.get("empty.bin", b"") == b""


def test_empty_payload_is_one_empty_chunk(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    out, m = _build(tmp_path, keys, {"x.mnn": b""})
    assert m.chunks == 1 and m.chunk_size == 1 << 20
    assert out.stat().st_size == parse_header(out.read_bytes()).payload_offset + 16
    assert _open(out, keys) == {}


def test_default_chunk_size_and_exact_multiple(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * (3 * 4096)  # exactly 3 MiB: the last chunk is full
    out, m = _build(tmp_path, keys, {"x.mnn": data})
    assert m.chunks == 3
    assert _open(out, keys)["x.mnn"] == data


def test_memory_stays_bounded_both_ways(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "big"
    with src.open("wb") as f:
        for i in range(24):
            f.write(bytes([i]) * (1 << 20))
    signer, dev = keys
    tracemalloc.start()
    try:
        build_package([("big.mnn", src)], tmp_path / "big.fpkg", name="big", version=1,
                      kind="model", recipients=[Recipient.from_public_key(dev.public_key())],
                      signing_key=signer, entry="big.mnn", mnn_facts=None)
        _, enc_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        n = 0

        def count(_p: str, v: memoryview) -> None:
            nonlocal n
            n += len(v)

        decrypt_package(tmp_path / "big.fpkg", signer.public_key(), dev, write=count)
        _, dec_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 24 << 20
    assert enc_peak < 6 << 20 and dec_peak < 6 << 20, (enc_peak, dec_peak)  # 24 MiB payload


@pytest.mark.parametrize("bad", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_unsafe_payload_paths_are_refused_at_build(tmp_path: Path, keys, bad: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.UsageError):
        _build(tmp_path, keys, {bad: b"x"})


def test_build_refuses_bad_names_and_no_recipients(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.UsageError):
        _build(tmp_path, keys, {"x.mnn": b"x"}, name="../etc")
    p = tmp_path / "x"
    p.write_bytes(b"x")
    with pytest.raises(errors.UsageError):
        build_package([("x.mnn", p)], tmp_path / "o.fpkg", name="m", version=1, kind="model",
                      recipients=[], signing_key=keys[0], entry="x.mnn", mnn_facts=None)


def test_a_signed_but_non_canonical_manifest_is_a_format_error(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    out, _ = _build(tmp_path, keys, {"x.mnn": b"x" * 100})
    h = parse_header(out.read_bytes())
    loose = h.manifest_bytes.replace(b'"kind":', b'"kind": ')
    resigned = encode_header(loose, keys[0].sign(loose))
    with pytest.raises(errors.FormatError):
        verify_manifest(resigned, keys[0].public_key(), None, None)


def test_canonical_json_rules() -> None:
    want = '{"a":[true,null,"é"],"b":1}'.encode()
    assert canonical_bytes({"b": 1, "a": [True, None, "é"]}) == want
    with pytest.raises(errors.FormatError):
        canonical_bytes({"x": 1.5})
    for text in (b'{"a":1,"a":2}', b'{"a":1.0}', b'{"b":1,"a":2}', b'{"a": 1}', b"\xff"):
        with pytest.raises(errors.FormatError):
            parse_canonical(text)


def test_manifest_refuses_unknown_fields_and_bad_tiling(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    _, m = _build(tmp_path, keys, {"x.mnn": b"x" * 10, "y": b"yy"})
    d = m.to_dict()
    Manifest.from_dict(d)
    with pytest.raises(errors.FormatError):
        Manifest.from_dict({**d, "extra": 1})
    files = [dict(f) for f in d["files"]]
    files[1]["offset"] = 11
    with pytest.raises(errors.FormatError):
        Manifest.from_dict({**d, "files": files})
    with pytest.raises(errors.FormatError):
        Manifest.from_dict({**d, "kind": "lora"})  # a LoRA must carry its base binding


def test_recipient_fingerprint_must_match_its_key(keys) -> None:  # type: ignore[no-untyped-def]
    pem = public_pem(keys[0].public_key())  # an Ed25519 key is no recipient
    with pytest.raises(errors.KeyMaterialError):
        Recipient.from_pem(pem)
    dev_pem = Recipient.from_public_key(keys[1].public_key())
    from cryptography.hazmat.primitives import serialization
    p = keys[1].public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    assert Recipient.from_pem(p).fingerprint == dev_pem.fingerprint
    with pytest.raises(errors.KeyMaterialError):
        Recipient.from_pem(p, fingerprint="SHA256:" + "B" * 43)
