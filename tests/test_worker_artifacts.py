"""Packages reach a farm worker over HTTPS with Range (fleet.worker.artifacts): a real
``fleet server`` application (its ``/artifacts/`` mount, Starlette's StaticFiles) under a
real uvicorn with the fleet CA's TLS certificate, one for the module; a recording ASGI
layer in front of it logs each request's Range header, status and body bytes sent, and
can cut a response mid-body (the server raising mid-stream: uvicorn drops the connection,
as a network cut does) or hide the Range header (a server that ignores Range)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import uvicorn

from fleet import config
from fleet.core import errors
from fleet.core.package.layout import FORMAT_VERSION, MAGIC
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.server.app import create_app
from fleet.server.settings import ServerSettings
from fleet.server.tls import init_tls
from fleet.worker import artifacts
from fleet.worker.settings import FarmSettings, settings_for
from fleet.worker.tasks import HANDLERS, Job

SIZE = 1_500_000  # bytes: several of StaticFiles' 64 KiB chunks


@dataclass
class Hit:
    path: str
    range: str | None
    status: int = 0
    sent: int = 0


@dataclass
class Recorder:
    """ASGI middleware: logs requests; ``cut_after`` bytes into the next response it
    raises (the connection drops); ``ignore_range`` removes the Range header."""

    app: Any
    hits: list[Hit] = field(default_factory=list)
    cut_after: int | None = None
    ignore_range: bool = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rng = headers.get(b"range")
        if self.ignore_range:
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"]
                                          if k != b"range"]}
        hit = Hit(scope["path"], rng.decode() if rng else None)
        self.hits.append(hit)
        cut, self.cut_after = self.cut_after, None

        async def counting(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                hit.status = msg["status"]
            elif msg["type"] == "http.response.body":
                if cut is not None and hit.sent + len(msg.get("body", b"")) > cut:
                    raise ConnectionResetError("cut by the test")
                hit.sent += len(msg.get("body", b""))
            await send(msg)

        await self.app(scope, receive, counting)


@dataclass
class Served:
    root: Path  #: the directory the server serves under /artifacts/
    rec: Recorder
    url: str
    ca: Path
    cache: Path

    def settings(self, **kw: Any) -> FarmSettings:
        return FarmSettings(broker_url=None, artifacts=Path("/nonexistent"),
                            artifacts_url=self.url, artifacts_ca=self.ca,
                            cache_dir=self.cache, **kw)

    def put(self, key: str, data: bytes) -> str:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("artifacts")
    home = FleetHome(base / "home")
    tls = init_tls(home)
    root = base / "served"
    root.mkdir()
    rec = Recorder(create_app(ServerSettings(home=home, artifacts=root)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(rec, lifespan="off", log_level="critical",
                                          ssl_certfile=str(tls.cert),
                                          ssl_keyfile=str(tls.key)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Served(root, rec, f"https://127.0.0.1:{port}/artifacts/", tls.ca_cert,
                     base / "cache")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def rec(served: Served) -> Recorder:
    served.rec.hits.clear()
    return served.rec


def _package(seed: int, fmt: int | None = None) -> bytes:
    body = hashlib.sha256(str(seed).encode()).digest() * (SIZE // 32)
    return (MAGIC + fmt.to_bytes(2, "big") + body[10:]) if fmt else body


def test_a_partial_download_is_resumed_with_range_and_only_the_rest_is_sent(
        served: Served, rec: Recorder) -> None:
    data = _package(1)
    sha = served.put("farm/a.fpkg", data)
    part = served.cache / f"{sha}.fpkg.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data[:400_000])  # a fetch cut earlier

    got = artifacts.fetch(served.settings(), "farm/a.fpkg", sha)

    assert got == served.cache / f"{sha}.fpkg" and got.read_bytes() == data
    assert not part.exists()
    assert [(h.path, h.range, h.status, h.sent) for h in rec.hits] == [
        ("/artifacts/farm/a.fpkg", "bytes=400000-", 206, len(data) - 400_000)]
    rec.hits.clear()  # a verified copy is reused: nothing is asked for again
    assert artifacts.fetch(served.settings(), "farm/a.fpkg", sha) == got
    assert rec.hits == []


def test_a_connection_cut_mid_body_resumes_where_the_file_ends(
        served: Served, rec: Recorder) -> None:
    data = _package(2)
    sha = served.put("farm/b.fpkg", data)
    rec.cut_after = 700_000
    got = artifacts.fetch(served.settings(), "farm/b.fpkg", sha)
    assert hashlib.sha256(got.read_bytes()).hexdigest() == sha
    first, second = rec.hits
    assert first.range is None and 0 < first.sent <= 700_000
    assert second.range is not None and second.status == 206
    start = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= first.sent and second.sent == len(data) - start


def test_a_server_that_ignores_range_restarts_the_file_cleanly(
        served: Served, rec: Recorder) -> None:
    data = _package(3)
    sha = served.put("farm/c.fpkg", data)
    part = served.cache / f"{sha}.fpkg.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data[:300_000])
    rec.ignore_range = True
    try:
        got = artifacts.fetch(served.settings(), "farm/c.fpkg", sha)
    finally:
        rec.ignore_range = False
    assert got.read_bytes() == data  # not the 300 kB twice
    assert [(h.range, h.status, h.sent) for h in rec.hits] == [
        ("bytes=300000-", 200, len(data))]


def test_a_partial_file_longer_than_the_package_starts_over(
        served: Served, rec: Recorder) -> None:
    data = _package(9)
    sha = served.put("farm/h.fpkg", data)
    part = served.cache / f"{sha}.fpkg.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data + b"junk")
    assert artifacts.fetch(served.settings(), "farm/h.fpkg", sha).read_bytes() == data
    assert [(h.range, h.status) for h in rec.hits] == [(f"bytes={len(data) + 4}-", 416),
                                                       (None, 200)]


def test_a_digest_mismatch_is_refused_and_the_bad_file_removed(
        served: Served, rec: Recorder) -> None:
    served.put("farm/d.fpkg", _package(4))
    want = hashlib.sha256(_package(5)).hexdigest()  # the task's package is another
    with pytest.raises(errors.DigestMismatchError, match="not the task's package"):
        artifacts.fetch(served.settings(), "farm/d.fpkg", want)
    assert sorted(p.name for p in served.cache.glob(f"{want}*")) == [f"{want}.fpkg.lock"]
    assert rec.hits[0].status == 200


def test_a_missing_package_is_a_clear_not_found(served: Served, rec: Recorder) -> None:
    sha = "0" * 64
    with pytest.raises(errors.NotFoundError, match=r"not on the artifact server \(HTTP 404"):
        artifacts.fetch(served.settings(), "farm/gone.fpkg", sha)
    assert not (served.cache / f"{sha}.fpkg").exists()
    assert not (served.cache / f"{sha}.fpkg.part").exists()
    with pytest.raises(errors.UsageError, match="bad artifact key"):
        artifacts.fetch(served.settings(), "../keys/signing.pem", sha)
    with pytest.raises(errors.UsageError, match="no sha256"):
        artifacts.fetch(served.settings(), "farm/gone.fpkg", None)


def test_a_format_2_package_brings_its_bundle_revalidated_by_etag(
        served: Served, rec: Recorder) -> None:
    data = _package(6, FORMAT_VERSION)
    sha = served.put("farm/e.fpkg", data)
    (served.root / "farm/e.fpkg.envelopes").write_bytes(b"bundle-1")
    got = artifacts.fetch(served.settings(), "farm/e.fpkg", sha)
    bundle = got.with_name(got.name + ".envelopes")
    assert bundle.read_bytes() == b"bundle-1"
    assert [(h.path, h.status) for h in rec.hits] == [
        ("/artifacts/farm/e.fpkg", 200), ("/artifacts/farm/e.fpkg.envelopes", 200)]
    rec.hits.clear()
    artifacts.fetch(served.settings(), "farm/e.fpkg", sha)
    assert [(h.path, h.status) for h in rec.hits] == [("/artifacts/farm/e.fpkg.envelopes",
                                                        304)]
    rec.hits.clear()
    (served.root / "farm/e.fpkg.envelopes").write_bytes(b"bundle-2, more recipients")
    os.utime(served.root / "farm/e.fpkg.envelopes", (time.time() + 5, time.time() + 5))
    artifacts.fetch(served.settings(), "farm/e.fpkg", sha)
    assert bundle.read_bytes() == b"bundle-2, more recipients"
    (served.root / "farm/e.fpkg.envelopes").unlink()
    artifacts.fetch(served.settings(), "farm/e.fpkg", sha)
    assert not bundle.exists()  # the push then fails as MissingEnvelopeError


def test_without_the_fleet_ca_the_server_is_not_trusted(served: Served) -> None:
    data = _package(7)
    sha = served.put("farm/f.fpkg", data)
    s = FarmSettings(broker_url=None, artifacts=Path("/nonexistent"),
                     artifacts_url=served.url, cache_dir=served.cache)
    with pytest.raises(errors.ConnectError, match="cannot reach the artifact server"):
        artifacts.fetch(s, "farm/f.fpkg", sha)


def test_a_worker_task_fetches_its_pack_over_http_before_it_runs(
        served: Served, rec: Recorder, tmp_path: Path) -> None:
    data = _package(8)
    sha = served.put("farm/g.fpkg", data)
    job = Job(FleetHome(tmp_path), cast(Registry, None), served.settings(),
              {"verb": "lora list", "args": {}, "pack": "farm/g.fpkg", "pack_sha256": sha},
              Device(name="d1", platform="linux", uri="local:///x"), threading.Event())
    assert callable(HANDLERS["lora"].build(job))
    assert (served.cache / f"{sha}.fpkg").read_bytes() == data
    assert [h.path for h in rec.hits] == ["/artifacts/farm/g.fpkg"]
    job.args["pack_sha256"] = "f" * 64  # the task's digest decides, not the server
    with pytest.raises(errors.DigestMismatchError):
        HANDLERS["lora"].build(job)


def test_the_url_comes_from_config_toml_unless_the_environment_says_otherwise(
        tmp_path: Path) -> None:
    home = FleetHome(tmp_path)
    assert settings_for(home, env={}).artifacts_url is None
    config.update(tmp_path, {"artifacts.url": "http://ctl.example:8000/artifacts",
                             "artifacts.ca_file": "~/ca.pem"})
    home = FleetHome(tmp_path)
    s = settings_for(home, env={})
    assert s.artifacts_url == "http://ctl.example:8000/artifacts/"
    assert s.artifacts_ca == Path("~/ca.pem").expanduser()
    assert s.cache_dir == tmp_path / "cache" / "artifacts"
    s = settings_for(home, env={"FLEET_ARTIFACTS_URL": "https://s3.example/b/"})
    assert s.artifacts_url == "https://s3.example/b/"
    with pytest.raises(errors.UsageError, match="not an http"):
        settings_for(home, env={"FLEET_ARTIFACTS_URL": "ftp://x/"})
