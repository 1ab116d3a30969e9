"""How packages reach farm workers: a directory that the controller and every worker
share (``artifacts.location``; by default the controller home's ``artifacts/``, which is
what a worker on the controller's machine, or a home on a shared mount, sees), or, on a
host that cannot share it, that directory served over HTTP(S) (``artifacts.url``).

The controller names a package by its path relative to the location (:func:`publish`,
which copies a package built elsewhere into the location under its sha256, with its key
envelope bundle, atomically); a worker opens it there (:func:`fetch`), and the push that
follows checks its sha256 end to end as every push does.

Over HTTP (:func:`fetch` with ``settings.artifacts_url``; any server that honours
``Range`` serves: ``fleet server`` with ``FLEET_SERVER_ARTIFACTS``, nginx, an S3 bucket),
the worker downloads ``URL + key`` into its cache (``$FLEET_HOME/cache/artifacts``, named
by the sha256 the task carries): a partial download (``NAME.part``) is resumed with
``Range: bytes=N-`` (a ``206`` whose ``Content-Range`` starts at N appends; a ``200``
starts over), a connection cut mid-body is resumed up to :data:`ATTEMPTS` times, and the
whole file's sha256 must equal the task's before it takes its final name (otherwise it is
removed: :class:`~fleet.core.errors.DigestMismatchError`). A verified copy is reused; one
lock file per package keeps a worker's threads and processes from fetching it twice. A
format-2 package's envelope bundle (``KEY.envelopes``) comes with it, revalidated per
task by its ETag (``If-None-Match``; envelopes need no digest: a changed one fails on the
device, ``docs/package-format.md``). Packages are encrypted and signed, so plain HTTP
shows no model; ``https://`` with ``artifacts.ca_file`` keeps even their names private.
The download runs when the task is built, before the device's deadline starts and
without watching its cancel event; a host's first task for a package pays for it, the
others wait on the lock and reuse it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import quote

from fleet.artifacts.envelopes import copy_package, package_format
from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.core.package.bundle import BUNDLE_SUFFIX, bundle_path
from fleet.core.package.layout import FORMAT_VERSION
from fleet.registry.faults import os_error_for
from fleet.worker.settings import FarmSettings

if TYPE_CHECKING:
    import httpx

__all__ = ["ATTEMPTS", "download", "fetch", "publish"]

#: how many times one fetch resumes a download cut mid-body before it gives up
ATTEMPTS = 3
_SHA = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


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


def _relative(key: str) -> PurePosixPath:
    rel = PurePosixPath(key)
    if not key or rel.is_absolute() or ".." in rel.parts:
        raise errors.UsageError(f"bad artifact key {key!r}", key=key)
    return rel


def fetch(settings: FarmSettings, key: str, sha256: str | None = None) -> Path:
    """The local path of published package ``key``: in the shared location, or (with
    ``settings.artifacts_url``) downloaded into the worker's cache and checked against
    ``sha256`` (required then; UsageError without). NotFoundError when this host does not
    see it; over HTTP also :func:`download`'s errors."""
    rel = _relative(key)
    if settings.artifacts_url is not None:
        if sha256 is None or not _SHA.fullmatch(sha256):
            raise errors.UsageError(f"package {key}: the task carries no sha256 to check "
                                    "a download against", key=key)
        cache = settings.cache_dir or Path(tempfile.gettempdir()) / "fleet-artifacts"
        return download(settings.artifacts_url + quote(rel.as_posix()), sha256,
                        cache / f"{sha256}{rel.suffix}", ca_file=settings.artifacts_ca)
    location = settings.artifacts
    path = location / Path(*rel.parts)
    if not path.is_file():
        raise errors.NotFoundError(
            f"package {key} is not in the artifact location {location} on this host (is "
            "artifacts.location shared with the controller, or should artifacts.url be "
            "set?)", key=key, location=str(location))
    return path


def _client(ca_file: Path | None) -> httpx.Client:
    import httpx

    verify: ssl.SSLContext | bool = True
    if ca_file is not None:
        try:
            verify = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise errors.UsageError(f"artifacts.ca_file {ca_file}: cannot load it ({exc})",
                                    path=str(ca_file)) from exc
    return httpx.Client(verify=verify, follow_redirects=True,
                        timeout=httpx.Timeout(30.0, read=120.0))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One fetch of ``path`` at a time (threads and processes: flock on its own file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def download(url: str, sha256: str, dest: Path, *, ca_file: Path | None = None,
             client: httpx.Client | None = None) -> Path:
    """``dest``, holding the bytes at ``url`` whose sha256 is ``sha256`` (lowercase hex):
    reused when already there, otherwise fetched (resuming ``dest.part``) and verified
    first; a format-2 package's bundle comes along (module docstring). Raises
    NotFoundError (404/410), DigestMismatchError (the bytes are not the task's package;
    the partial file is removed), ConnectError (no connection), ConnectionLostError (cut
    :data:`ATTEMPTS` times; the partial file stays for the next fetch), TransportError
    (any other HTTP answer), RegistryFullError / RegistryIOError (the cache cannot be
    written)."""
    own = client is None
    http = _client(ca_file) if client is None else client
    try:
        with _locked(dest):
            if not dest.is_file():
                _fetch_verified(http, url, sha256, dest)
            if package_format(dest) == FORMAT_VERSION:
                _fetch_bundle(http, url + BUNDLE_SUFFIX, dest)
        return dest
    except OSError as exc:
        raise (os_error_for(exc, dest.parent) or errors.RegistryIOError(
            f"the worker's artifact cache {dest.parent}: {exc.strerror or exc}",
            path=str(dest.parent))) from exc
    finally:
        if own:
            http.close()


def _fetch_verified(http: httpx.Client, url: str, sha256: str, dest: Path) -> None:
    import httpx

    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _get_into(http, url, part)
            break
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                raise errors.ConnectError(f"cannot reach the artifact server for {url}: "
                                          f"{exc}", url=url) from exc
            if attempt == ATTEMPTS:
                raise errors.ConnectionLostError(
                    f"download of {url} cut {ATTEMPTS} times ({exc}); "
                    f"{part.stat().st_size if part.exists() else 0} bytes kept to resume",
                    url=url) from exc
    got = sha256_file(part)
    if got != sha256:
        part.unlink(missing_ok=True)
        raise errors.DigestMismatchError(
            f"{url} is not the task's package (sha256 {got[:16]}…, expected "
            f"{sha256[:16]}…); removed, not used", url=url, expected=sha256, actual=got)
    os.replace(part, dest)


def _get_into(http: httpx.Client, url: str, part: Path) -> None:
    """GET ``url`` into ``part``, asking only for what it lacks (one request; two when
    the server says the partial file is longer than the package: 416)."""
    have = part.stat().st_size if part.exists() else 0
    with http.stream("GET", url, headers={"Range": f"bytes={have}-"} if have else {}) as r:
        if r.status_code != 416 or not have:
            _write(r, url, part, have)
            return
    part.unlink()  # not a prefix of this package: start over
    with http.stream("GET", url) as r:
        _write(r, url, part, 0)


def _write(r: httpx.Response, url: str, part: Path, have: int) -> None:
    _check_status(r, url)
    mode = "wb"  # 200: the server sends it all (it ignored Range): start over
    if r.status_code == 206:
        m = _RANGE.fullmatch(r.headers.get("content-range", "").strip())
        if m is None or int(m.group(1)) != have:
            raise errors.TransportError(
                f"{url}: the server answered a Range request with Content-Range "
                f"{r.headers.get('content-range')!r}, not bytes {have}-", url=url)
        mode = "ab"
    with open(part, mode) as f:
        for chunk in r.iter_bytes():
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _check_status(r: httpx.Response, url: str) -> None:
    if r.status_code in (404, 410):
        raise errors.NotFoundError(f"package {url} is not on the artifact server "
                                   f"(HTTP {r.status_code}): published there?", url=url)
    if r.status_code not in (200, 206):
        raise errors.TransportError(f"artifact server answered HTTP {r.status_code} for "
                                    f"{url}", url=url, status=r.status_code)


def _fetch_bundle(http: httpx.Client, url: str, dest: Path) -> None:
    """Bring ``dest``'s envelope bundle up to date (ETag revalidation); a server without
    one removes the local copy (the push then fails as MissingEnvelopeError)."""
    import httpx

    bundle = bundle_path(dest)
    tag_file = bundle.with_name(bundle.name + ".etag")
    tag = tag_file.read_text().strip() if tag_file.is_file() and bundle.is_file() else ""
    try:
        with http.stream("GET", url, headers={"If-None-Match": tag} if tag else {}) as r:
            if r.status_code == 304:
                return
            if r.status_code in (404, 410):
                bundle.unlink(missing_ok=True)
                tag_file.unlink(missing_ok=True)
                return
            _check_status(r, url)
            tmp = bundle.with_name(f".{bundle.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
            os.replace(tmp, bundle)
            etag = r.headers.get("etag")
    except httpx.TransportError as exc:
        raise errors.ConnectionLostError(f"cannot fetch {url}: {exc}", url=url) from exc
    if etag:
        tag_file.write_text(etag)
    else:
        tag_file.unlink(missing_ok=True)
