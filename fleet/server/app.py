"""The device API (``/api/device/v1``) as a FastAPI application (``docs/device-api.md``).

FastAPI rather than bare Starlette because the API's contract is its OpenAPI document
(``/openapi.json``, fuzzed by schemathesis in the tests): FastAPI derives it, and the
validation of every body, from the pydantic models in :mod:`.schemas` (pydantic already
comes with sqlmodel), where Starlette would leave both to be written and kept in step by
hand. Handlers are plain functions: FastAPI runs them in its thread pool, and the registry
(SQLAlchemy, SQLite or PostgreSQL) is synchronous anyway.

Errors are ``{"error": {"code", "type", "message", "details"}}`` (the agent protocol's
form) with an HTTP status from :func:`status_for`: 4xx for anything a device or an
attacker can cause, 503 for a busy registry; nothing it is sent makes a 5xx otherwise.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from sqlalchemy import bindparam
from sqlmodel import col, select

from fleet.artifacts.keys import load_signing_key
from fleet.artifacts.trust import TrustPaths, chain_docs, current_root
from fleet.core import errors
from fleet.core.package.trust import format_time
from fleet.core.pull import (
    API_PREFIX,
    AUTH_TAG,
    DesiredModel,
    sign_desired_state,
    verify_device_signature,
    verify_report,
)
from fleet.registry import Device, Registry
from fleet.registry.models import DesiredState
from fleet.registry.types import utcnow
from fleet.rollout import pull
from fleet.server import auth
from fleet.server.escrow import envelope_for_device
from fleet.server.ratelimit import RateLimiter
from fleet.server.schemas import (
    ChallengeIn,
    ChallengeOut,
    CheckinIn,
    CheckinOut,
    EnrollIn,
    EnrollOut,
    ErrorOut,
    ReportIn,
    ReportOut,
    TokenIn,
    TokenOut,
)
from fleet.server.seen import SeenWriter
from fleet.server.settings import ServerSettings
from fleet.server.tokens import redeem_token

__all__ = ["ServerContext", "create_app", "factory", "status_for"]

#: seconds between two writes of a device's ``last_seen`` (check-ins in between only read)
SEEN_EVERY_S = 60.0


def status_for(exc: errors.FleetError) -> int:
    """The HTTP status of a refusal (an explicit ``details.status`` wins)."""
    given = exc.details.get("status")
    if isinstance(given, int):
        return given
    table: list[tuple[type[errors.FleetError], int]] = [
        (errors.RateLimitedError, 429), (errors.ServerAuthError, 401),
        (errors.RevokedError, 403), (errors.NotRecipientError, 403),
        (errors.BadSignatureError, 401), (errors.NotFoundError, 404),
        (errors.DuplicateError, 409), (errors.RegistryBusyError, 503),
        (errors.RegistryError, 503), (errors.UsageError, 400),
        (errors.PackageError, 400), (errors.KeyMaterialError, 400)]
    for cls, code in table:
        if isinstance(exc, cls):
            return code
    return 500


class ServerContext:
    """What every request needs, made once per worker process."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.home = settings.home
        self.limiter = RateLimiter(settings.rate_per_min, settings.rate_burst)
        self.secret = auth.load_secret(self.home.keys_dir / "server_secret")
        self._reg: Registry | None = None
        self._trust: tuple[int | None, int | None, list[dict[str, Any]]] | None = None
        self.seen = SeenWriter(lambda: self.reg)

    @property
    def reg(self) -> Registry:
        if self._reg is None:
            self._reg = Registry.open(self.home)
        return self._reg

    @cached_property
    def signing_key(self) -> Any:
        return load_signing_key(self.home)

    def trust(self) -> tuple[int | None, list[dict[str, Any]]]:
        """The newest root's version and the chain, v1 first; parsed once and kept while
        the roots directory is unchanged (``fleet keys rotate`` adds a file: its mtime
        moves), so a check-in costs one ``stat``, not a parse of every root."""
        roots = TrustPaths(self.home).roots
        try:
            stamp = roots.stat().st_mtime_ns
        except OSError:
            stamp = None
        if self._trust is None or self._trust[0] != stamp or stamp is None:
            root = current_root(self.home)
            self._trust = (stamp, (root.signed.version if root else None),
                           chain_docs(self.home) or [])
        return self._trust[1], self._trust[2]

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.settings.clock_skew_s)


_bearer = HTTPBearer(auto_error=False, description="the token from /auth/token")


def _ctx(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


def _client_key(request: Request) -> str:
    return "ip:" + (request.client.host if request.client else "?")


def _device(request: Request,
            cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
            ) -> Device:
    """The device a bearer token names; refused when absent, forged, expired, for a key
    the device no longer has, or for a revoked device. Rate limited per device."""
    ctx = _ctx(request)
    if cred is None or cred.scheme.lower() != "bearer":
        ctx.limiter.take(_client_key(request))
        raise errors.ServerAuthError("a bearer token is required (POST /auth/token)",
                                     status=401)
    return _authorized(ctx, cred.credentials, with_state=False)[0]


def _device_and_state(request: Request,
                      cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                      ) -> tuple[Device, DesiredState | None]:
    """:func:`_device` and its desired state, read in one query (the check-in's only
    read)."""
    ctx = _ctx(request)
    if cred is None or cred.scheme.lower() != "bearer":
        ctx.limiter.take(_client_key(request))
        raise errors.ServerAuthError("a bearer token is required (POST /auth/token)",
                                     status=401)
    return _authorized(ctx, cred.credentials, with_state=True)


#: the check-in's one read, built once (not per request)
_DEVICE_AND_STATE = (select(Device, DesiredState).outerjoin(
    DesiredState, col(DesiredState.device_id) == col(Device.id))
    .where(col(Device.id) == bindparam("dev_id")))


def _authorized(ctx: ServerContext, token: str, *, with_state: bool
                ) -> tuple[Device, DesiredState | None]:
    claims = auth.check_token(ctx.secret, token, int(time.time()))
    ctx.limiter.take("dev:" + claims.device_id)
    try:
        dev_id = uuid.UUID(claims.device_id)
    except ValueError as exc:
        raise errors.ServerAuthError("malformed token", status=401) from exc
    state: DesiredState | None = None
    with ctx.reg.reading() as s:
        if with_state:
            row = s.exec(_DEVICE_AND_STATE, params={"dev_id": dev_id}).first()
            dev, state = (row[0], row[1]) if row is not None else (None, None)
        else:
            dev = s.get(Device, dev_id)
    if dev is None or dev.fingerprint != claims.fingerprint:
        raise errors.ServerAuthError("this token's device key is no longer registered",
                                     status=401)
    if dev.revoked_at is not None:
        raise errors.RevokedError(f"device {dev.name} is revoked", status=403)
    return dev, state


DeviceDep = Annotated[Device, Depends(_device)]
DeviceStateDep = Annotated[tuple[Device, "DesiredState | None"], Depends(_device_and_state)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 429, 503)}


def _touch(ctx: ServerContext, dev: Device, body: CheckinIn | None = None) -> None:
    """``last_seen`` and the status facts, at most every :data:`SEEN_EVERY_S`."""
    seen = dev.last_seen
    now = utcnow()
    if seen is not None and (now - seen).total_seconds() < SEEN_EVERY_S \
            and not (body and body.progress):
        return
    if body is not None and not body.progress and not _facts_stale(dev, body, now):
        ctx.seen.note(dev.id, now, agent_version=body.agent_version,
                      root_version=body.root_version)  # written behind, in a batch
        return
    from fleet.registry import facts
    from fleet.registry.status import device_status

    with ctx.reg.session() as s:  # one transaction: the row locked, read, written
        row = s.get(Device, dev.id, with_for_update=True)
        if row is None:
            return
        row.last_seen = now
        row.status = device_status(None, now, previous=row.status).value
        row.last_error = None
        if body is not None:
            if body.agent_version:
                row.agent_version = body.agent_version
            if body.root_version is not None and body.root_version != row.root_version:
                row.root_version = body.root_version
            doc: dict[str, Any] = {"installed": body.installed}
            if body.disk_free is not None:
                doc["disk"] = {"free": body.disk_free}
            facts.note_status(s, dev.id, doc)
        s.add(row)


#: status facts older than this are rewritten even when nothing changed (seconds)
FACTS_EVERY_S = 3600.0


def _facts_stale(dev: Device, body: CheckinIn, now: datetime) -> bool:
    """Whether this check-in's status would change the device's facts (installed models,
    free space moved by more than 1 % or 64 MiB, or facts older than
    :data:`FACTS_EVERY_S`): those check-ins are written at once."""
    f = dev.facts or {}
    installed = {str(n): {"active": r.get("active", r.get("version")),
                          "previous": r.get("previous"),
                          "versions": list(r.get("versions") or []),
                          "digest": r.get("digest")}
                 for n, r in body.installed.items()
                 if isinstance(r, dict) and r.get("kind", "model") in ("model", None)}
    if f.get("_installed") != installed:
        return True
    if body.disk_free is not None:
        had = f.get("_disk_free")
        if not isinstance(had, int) or abs(had - body.disk_free) > max(
                64 << 20, body.disk_free // 100):
            return True
    try:
        at = datetime.fromisoformat(str(f.get("_status_at")))
    except ValueError:
        return True
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (now - at).total_seconds() > FACTS_EVERY_S


def _desired(ctx: ServerContext, dev: Device, row: DesiredState | None) -> dict[str, Any]:
    models: list[DesiredModel] = []
    for m in row.models if row is not None else []:
        if m.get("envelope") is None and m.get("order") is None:
            path = pull.package_path(ctx.reg, str(m.get("package_sha256")))
            if path is None:
                continue  # its package is gone (fleet gc): nothing a device could fetch
            env = envelope_for_device(ctx.home, Path(path), dev)
            if env is not None:
                pull.set_envelope(ctx.reg, dev.id, str(m["name"]), env)
                m = {**m, "envelope": env}
        models.append(DesiredModel.from_dict(m))
    return sign_desired_state(ctx.signing_key, device=str(dev.fingerprint),
                              counter=row.counter if row is not None else 0, models=models,
                              now=ctx.now(), ttl=timedelta(seconds=ctx.settings.state_ttl_s))


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """The application; ``settings`` default to the environment (:class:`ServerSettings`)."""
    cfg = settings or ServerSettings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ctx = ServerContext(cfg)
        app.state.ctx.reg  # noqa: B018 (open the registry now: refuse to start without one)
        yield
        with contextlib.suppress(errors.FleetError):
            app.state.ctx.seen.close()
        if app.state.ctx._reg is not None:
            app.state.ctx._reg.close()

    app = FastAPI(title="mnn-fleet device API", version="1.0.0", lifespan=lifespan,
                  openapi_url="/openapi.json", docs_url=None, redoc_url=None,
                  description="What pull-mode devices call (docs/device-api.md).")

    @app.exception_handler(errors.FleetError)
    async def fleet_error(_req: Request, exc: errors.FleetError) -> JSONResponse:
        code = status_for(exc)
        headers = {}
        if isinstance(exc, errors.RateLimitedError):
            headers["Retry-After"] = str(max(1, int(exc.details.get("retry_after_s", 1))))
        details = {k: v for k, v in exc.details.items() if k != "status"}
        return JSONResponse({"error": {**exc.to_dict(), "details": details}},
                            status_code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": {"code": "usage", "type": "ValidationError",
                                       "message": "request body or parameters are invalid",
                                       "details": {"errors": len(exc.errors())}}},
                            status_code=422)

    if cfg.artifacts is not None:
        # packages for farm workers (fleet.worker.artifacts): encrypted and signed, so
        # served without auth; StaticFiles answers GET/HEAD only, with Range and ETags,
        # lists nothing and follows no symlink out of the directory
        app.mount("/artifacts", StaticFiles(directory=cfg.artifacts, check_dir=False),
                  name="artifacts")

    @app.get("/healthz", tags=["server"])
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post(f"{API_PREFIX}/enroll", response_model=EnrollOut, responses=_ERRORS,
              tags=["device"])
    def enroll(body: EnrollIn, request: Request) -> EnrollOut:
        """Redeem a one-time enrollment token: record the device key, answer the root of
        trust to pin."""
        ctx = _ctx(request)
        ctx.limiter.take(_client_key(request))
        done = redeem_token(ctx.reg, body.token, body.public_key,
                            agent_version=body.agent_version)
        version, chain = ctx.trust()
        if not chain:
            raise errors.KeyMaterialError("the controller has no root of trust yet (`fleet "
                                          "keys init`)", status=503)
        if version is not None:
            ctx.reg.update_device(done.device.name, root_version=version)
        return EnrollOut(device=done.device.name, fingerprint=done.fingerprint, trust=chain,
                         poll_s=ctx.settings.poll_s)

    @app.post(f"{API_PREFIX}/auth/challenge", response_model=ChallengeOut,
              responses=_ERRORS, tags=["auth"])
    def challenge(body: ChallengeIn, request: Request) -> ChallengeOut:
        """A challenge for the device key ``fingerprint`` to sign (valid 2 minutes)."""
        ctx = _ctx(request)
        ctx.limiter.take(_client_key(request))
        return ChallengeOut(challenge=auth.make_challenge(ctx.secret, body.fingerprint,
                                                          int(time.time())),
                            expires_in=auth.CHALLENGE_TTL_S)

    @app.post(f"{API_PREFIX}/auth/token", response_model=TokenOut, responses=_ERRORS,
              tags=["auth"])
    def token(body: TokenIn, request: Request) -> TokenOut:
        """Trade a signed challenge for a bearer token."""
        ctx = _ctx(request)
        ctx.limiter.take(_client_key(request))
        now = int(time.time())
        fp = auth.check_challenge(ctx.secret, body.challenge, now)
        from sqlmodel import select

        with ctx.reg.reading() as s:
            dev = s.exec(select(Device).where(Device.fingerprint == fp)).first()
        if dev is None or not dev.public_key:
            raise errors.ServerAuthError("no enrolled device has this key", status=401)
        if dev.revoked_at is not None:
            raise errors.RevokedError(f"device {dev.name} is revoked", status=403)
        pub = serialization.load_pem_public_key(dev.public_key.encode())
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise errors.ServerAuthError("the registered key is not P-256", status=401)
        try:
            verify_device_signature(pub, AUTH_TAG, body.challenge.encode(), body.signature,
                                    "challenge")
        except errors.PackageError as exc:
            raise errors.ServerAuthError(f"challenge refused: {exc.message}",
                                         status=401) from exc
        ttl = ctx.settings.token_ttl_s
        return TokenOut(token=auth.make_token(ctx.secret, str(dev.id), fp, now, ttl),
                        expires_in=ttl, poll_s=ctx.settings.poll_s)

    @app.post(f"{API_PREFIX}/checkin", response_model=CheckinOut, responses=_ERRORS,
              tags=["device"])
    def checkin(body: CheckinIn, found: DeviceStateDep, request: Request) -> CheckinOut:
        """The device's status in, its signed desired state out."""
        ctx = _ctx(request)
        dev, state = found
        moved = False
        if body.progress:
            pull.apply_progress(ctx.reg, dev, [pull.Progress(
                p.name, p.version, p.state, p.deployment, p.error_code, p.error_message)
                for p in body.progress], home=ctx.home)
            moved = True
        moved = bool(pull.late_join(ctx.reg, dev)) or moved
        _touch(ctx, dev, body)
        if moved:  # a wave opened, a rollback or a late join may have written it
            state = pull.desired_of(ctx.reg, dev.id)
        version, chain = ctx.trust()
        behind = version is not None and (body.root_version or 0) < version
        return CheckinOut(desired=_desired(ctx, dev, state), trust=chain if behind else None,
                          poll_s=ctx.settings.poll_s, server_time=format_time(ctx.now()))

    @app.get(f"{API_PREFIX}/packages/{{sha256}}", responses={
        **_ERRORS, 200: {"content": {"application/octet-stream": {}}},
        206: {"description": "the requested byte range"}}, tags=["device"],
        response_class=FileResponse)
    def package(sha256: Annotated[str, _sha_path()], dev: DeviceDep,
                request: Request) -> FileResponse:
        """A package named in this device's desired state, with HTTP Range (resume)."""
        ctx = _ctx(request)
        row = pull.desired_of(ctx.reg, dev.id)
        if row is None or not any(m.get("package_sha256") == sha256 for m in row.models):
            raise errors.NotFoundError("no such package in this device's desired state",
                                       status=404)
        path = pull.package_path(ctx.reg, sha256)
        if path is None or not Path(path).is_file():
            raise errors.NotFoundError("the package is no longer on the server", status=404)
        return FileResponse(path, media_type="application/octet-stream",
                            filename=f"{sha256}.fpkg")

    @app.post(f"{API_PREFIX}/reports", response_model=ReportOut, responses=_ERRORS,
              tags=["device"])
    def report(body: ReportIn, dev: DeviceDep, request: Request) -> ReportOut:
        """An activation report, signed by the device key (a forged one is refused and
        nothing is recorded)."""
        ctx = _ctx(request)
        pub = serialization.load_pem_public_key(str(dev.public_key).encode())
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise errors.ServerAuthError("the registered key is not P-256", status=401)
        doc = verify_report(body.model_dump(), pub, str(dev.fingerprint))
        dep = pull.record_report(ctx.reg, dev, doc, home=ctx.home)
        return ReportOut(recorded=True, deployment=str(dep) if dep else None)

    return app


def _sha_path() -> Any:
    from fastapi import Path as PathParam

    return PathParam(pattern="^[0-9a-f]{64}$", description="the package file's SHA-256")


def factory() -> FastAPI:
    """What ``uvicorn --factory fleet.server.app:factory`` runs (every worker)."""
    return create_app()
