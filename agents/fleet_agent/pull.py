"""``fleet-agent --root DIR pull --server URL --ca FILE [--token T] [--once]``: pull mode.

The device calls home (``docs/device-api.md``): enroll once with the one-time token
(the agent makes its P-256 key, sends the public half, pins the root of trust it gets
back), then every cycle: authenticate (a challenge signed by the device key, traded for
a short-lived bearer token), check in with its status, verify the **desired state** it
gets (:func:`fleet.core.pull.verify_desired_state`: an online key of its root signed it,
for this device, not expired, counter not below the last one accepted, kept in
``ROOT/pull.json``), and make it so: download (resumable, verified as it arrives:
:mod:`fleet_agent.pull_download`), ``stage``, ``activate``, upload the activation report
signed by the device key. Each step is reported at the next check-in, which the server
turns into the deployment's step (``downloading``, ``staged``, ``failed`` …). An entry
of kind ``lora`` (a LoRA pack) is downloaded the same way, staged with ``lora add`` and,
when the entry activates it, swapped in with ``lora swap`` (:meth:`PullAgent._apply_lora`).

The loop sleeps the server's suggested interval with ±20 % jitter; errors back off
exponentially (2 s doubling to 15 min, full jitter). ``--once`` runs one cycle and prints
one JSON document (exit 0, or 1 with the error as data). The TLS server certificate must
chain to ``--ca`` (the fleet CA that ``fleet server init-tls`` made); nothing else is
trusted. Verbs run through :func:`fleet_agent.cli.dispatch`, as for the controller's
pushes, so the root's lock and every store check apply.
"""

from __future__ import annotations

import argparse
import json
import random
import ssl
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from fleet.core import errors
from fleet.core.fsutil import atomic_write
from fleet.core.package import ClockReading, Limits
from fleet.core.pull import (
    API_PREFIX,
    AUTH_TAG,
    DesiredModel,
    DesiredState,
    in_window,
    sign_device,
    sign_report,
    verify_desired_state,
)
from fleet_agent.context import AgentContext

__all__ = ["PullAgent", "main"]

BACKOFF_MIN_S = 2.0
BACKOFF_MAX_S = 900.0
JITTER = 0.2


def _error(resp: httpx.Response) -> errors.FleetError:
    """The server's error document as the class its code names."""
    try:
        e = resp.json().get("error") or {}
    except ValueError:
        e = {}
    code, msg = str(e.get("code") or "server"), str(e.get("message") or resp.text[:200])
    if resp.status_code == 429:
        after = resp.headers.get("Retry-After", "1")
        return errors.RateLimitedError(msg, retry_after_s=float(after)
                                       if after.replace(".", "").isdigit() else 1.0)
    if code == "usage" or resp.status_code in (400, 422):
        return errors.UsageError(f"server refused the request: {msg}", status=resp.status_code)
    err = errors.error_from_code(code, msg, {"status": resp.status_code})
    if resp.status_code == 401 and not isinstance(err, errors.AuthError):
        return errors.ServerAuthError(msg, status=401)
    return err


class PullAgent:
    """One device's pull client; :meth:`cycle` is one check-in and what follows it."""

    def __init__(self, ctx: AgentContext, server: str, ca: Path, *,
                 max_rate: float | None = None, timeout: float = 60.0) -> None:
        self.ctx = ctx
        self.max_rate = max_rate
        tls = ssl.create_default_context(cafile=str(ca))  # the fleet CA only
        self.http = httpx.Client(base_url=server.rstrip("/"), verify=tls, timeout=timeout)
        self.bearer: str | None = None
        self.poll_s = 1800
        self.progress: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []

    # -- local state ------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.ctx.root / "pull.json"

    def _state(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {"last_counter": 0, "done": []}
        except ValueError as exc:
            raise errors.StoreError("pull.json is corrupt", path=str(self.state_file)) from exc
        return doc if isinstance(doc, dict) else {"last_counter": 0, "done": []}

    def _save(self, doc: dict[str, Any]) -> None:
        atomic_write(self.state_file, json.dumps(doc, sort_keys=True).encode())

    def _verb(self, verb: str, args: dict[str, Any]) -> dict[str, Any]:
        from fleet_agent.cli import dispatch, stdout_to_stderr

        with stdout_to_stderr():
            doc = dispatch(self.ctx, verb, args)
        if not doc["ok"]:
            e = doc["error"]
            raise errors.error_from_code(e["code"], e["message"], e.get("details"))
        return doc

    def _store(self) -> Any:
        from fleet_agent.store import Store

        return Store(self.ctx)

    # -- HTTP -------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any], *, auth: bool = True) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.bearer}"} if auth and self.bearer else {}
        try:
            resp = self.http.post(API_PREFIX + path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise errors.ConnectionLostError(f"fleet server: {exc}") from exc
        if resp.status_code >= 300:
            raise _error(resp)
        doc: dict[str, Any] = resp.json()
        return doc

    def enroll(self, token: str) -> dict[str, Any]:
        """Make the device key, redeem ``token`` with its public half, pin the root."""
        first = self._verb("enroll", {})
        doc = self._post("/enroll", {"token": token, "public_key": first["public_key"],
                                     "agent_version": first.get("agent_version")},
                         auth=False)
        pinned = self._verb("enroll", {"trust": doc["trust"]})
        st = self._state()
        st.update(enrolled=True, device=doc["device"], fingerprint=doc["fingerprint"])
        self._save(st)
        self.poll_s = int(doc.get("poll_s") or self.poll_s)
        return {"device": doc["device"], "fingerprint": doc["fingerprint"],
                "root_version": pinned.get("root_version")}

    def authenticate(self) -> None:
        store = self._store()
        ch = self._post("/auth/challenge", {"fingerprint": store.fingerprint}, auth=False)
        sig = sign_device(store.device_key, AUTH_TAG, ch["challenge"].encode())
        tok = self._post("/auth/token", {"challenge": ch["challenge"], "signature": sig},
                         auth=False)
        self.bearer = tok["token"]
        self.poll_s = int(tok.get("poll_s") or self.poll_s)

    def _fetch(self, sha: str) -> Any:
        def fetch(offset: int) -> tuple[int, Iterator[bytes]]:
            headers = {"Authorization": f"Bearer {self.bearer}"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            req = self.http.build_request("GET", f"{API_PREFIX}/packages/{sha}",
                                          headers=headers)
            try:
                resp = self.http.send(req, stream=True)
            except httpx.HTTPError as exc:
                raise errors.ConnectionLostError(f"fleet server: {exc}") from exc
            if resp.status_code >= 300:
                resp.read()
                resp.close()
                raise _error(resp)

            def body() -> Iterator[bytes]:
                try:
                    yield from resp.iter_raw(1 << 16)
                except httpx.HTTPError as exc:
                    raise errors.ConnectionLostError(
                        f"download cut: {exc}", package=sha) from exc
                finally:
                    resp.close()

            return resp.status_code, body()

        return fetch

    # -- one cycle --------------------------------------------------------------------
    def _status(self) -> dict[str, Any]:
        from fleet_agent.verbs_basic import status

        doc = status(self.ctx, {})
        installed = {n: {k: v for k, v in row.items()
                         if k in ("active", "previous", "versions", "floor", "kind")}
                     for n, row in (doc.get("installed") or {}).items()}
        return {"installed": installed, "disk_free": int(doc["disk"]["free"]),
                "agent_version": doc.get("agent_version"),
                "root_version": (doc.get("trust") or {}).get("root_version")}

    def checkin(self) -> DesiredState:
        body = self._status() | {"progress": self.progress[:64]}
        doc = self._post("/checkin", body)
        self.progress = self.progress[64:]
        self.poll_s = int(doc.get("poll_s") or self.poll_s)
        if doc.get("trust"):  # a key rotation or revocation travels here too
            self._verb("enroll", {"trust": doc["trust"]})
        store = self._store()
        st = self._state()
        clock = ClockReading(now=datetime.now(UTC), tolerance_s=Limits().clock_tolerance_s)
        desired = verify_desired_state(doc["desired"], store.trusted_signer,
                                       store.fingerprint, int(st.get("last_counter") or 0),
                                       clock)
        st["last_counter"] = desired.counter
        self._save(st)
        return desired

    def _say(self, m: DesiredModel, state: str, **extra: Any) -> None:
        item = {"name": m.name, "version": m.version, "state": state,
                "deployment": m.deployment, **extra}
        self.progress.append(item)
        self.log.append(item)

    def _key(self, m: DesiredModel) -> str:
        return f"{m.deployment}/{m.name}/{m.version}"

    def apply(self, desired: DesiredState) -> None:
        """Make each desired model so; a package or health refusal is reported as
        ``failed`` and not tried again; a transport error propagates (retried later)."""
        for m in desired.models:
            st = self._state()
            if self._key(m) in st.get("done", []):
                continue
            try:
                if self._apply_one(m):
                    continue  # staged, waiting for its install window: not done yet
            except (errors.TransportError, errors.BusyError):
                raise
            except errors.FleetError as exc:
                self._say(m, "failed", error_code=exc.code, error_message=exc.message[:2000])
            st = self._state()
            st["done"] = [*st.get("done", [])[-200:], self._key(m)]
            self._save(st)

    def _apply_one(self, m: DesiredModel) -> bool:
        """Make ``m`` so; True when it is staged and waits for its install window
        (``m.window``, device-local time: downloading and staging happen before)."""
        if m.kind == "lora":
            return self._apply_lora(m)
        row = self._store().installed().get(m.name) or {}
        active = row.get("active")
        if active == m.version:
            self._say(m, "skipped")
            return False
        if m.order is not None and isinstance(active, int) and m.version < active:
            self._verb("rollback", {"name": m.name, "order": m.order})
            self._say(m, "rolled_back")
            return False
        if m.version not in (row.get("versions") or []):
            self._say(m, "downloading")
            self._flush()
            self._download_and_stage(m)
        self._say(m, "staged")
        if not m.activate:
            return False
        if not in_window(m.window, datetime.now().astimezone()):
            self.log.append({"name": m.name, "version": m.version,
                             "waiting_for_window": m.window})
            return True
        self._say(m, "activating")
        self._flush()
        act = self._verb("activate", {"name": m.name, "version": m.version})
        self._report(m, act["report"])
        return False

    def _apply_lora(self, m: DesiredModel) -> bool:
        """A LoRA pack: downloaded and verified as a model, staged by the push-mode
        ``lora add`` verb; with ``m.activate`` swapped in by ``lora swap`` and the daemon's
        answer reported, signed. True while the swap waits (for the install window, or
        for a serve daemon to run: ``fleet lora serve`` or the board's unit)."""
        row = self._store().installed().get(m.name) or {}
        if m.version not in (row.get("versions") or []):
            self._say(m, "downloading")
            self._flush()
            self._download_and_stage(m, verb="lora add")
        elif not m.activate:
            self._say(m, "skipped")  # staged already
            return False
        self._say(m, "staged")
        if not m.activate:
            return False
        if not in_window(m.window, datetime.now().astimezone()):
            self.log.append({"name": m.name, "version": m.version,
                             "waiting_for_window": m.window})
            return True
        try:
            swap = self._verb("lora swap", {"name": m.name, "version": m.version})
        except (errors.NotFoundError, errors.ConnectError) as exc:
            if "socket" not in exc.details:
                raise
            self.log.append({"name": m.name, "version": m.version,
                             "waiting_for_serve": exc.message})
            return True
        self._say(m, "activating")
        self._report(m, {k: v for k, v in swap.items() if k not in ("schema", "ok", "verb")})
        return False

    def _download_and_stage(self, m: DesiredModel, verb: str = "stage") -> None:
        from fleet_agent.pull_download import download_verified

        store = self._store()
        self.ctx.ensure()
        got = download_verified(self._fetch(m.package_sha256), self.ctx.incoming,
                                package_sha256=m.package_sha256, size=m.size,
                                trusted=store.trusted_signer, device_key=store.device_key,
                                envelope=m.envelope, max_rate=self.max_rate)
        self.log.append({"name": m.name, "version": m.version, "downloaded": got.size,
                         "resumed_from": got.resumed_from, "received": got.received})
        args: dict[str, Any] = {"path": str(got.path), "envelope": m.envelope}
        self._verb(verb, args if verb == "lora add" else {**args, "order": m.order})

    def _report(self, m: DesiredModel, report: dict[str, Any]) -> None:
        signed = sign_report(self._store().device_key, {
            "name": m.name, "version": m.version, "deployment": m.deployment,
            "bytes_received": m.size, "report": report})
        self._post("/reports", signed)

    def _flush(self) -> None:
        """Tell the server how far we got (a check-in whose answer is not needed)."""
        if self.progress:
            self.checkin()

    def cycle(self, token: str | None = None) -> dict[str, Any]:
        st = self._state()
        out: dict[str, Any] = {}
        if not st.get("enrolled"):
            if not token:
                raise errors.UsageError("not enrolled with a fleet server: pass --token "
                                        "(from `fleet device add pull://NAME`)")
            out["enrolled"] = self.enroll(token)
        self.authenticate()
        desired = self.checkin()
        self.apply(desired)
        if self.progress:
            self.checkin()
        out.update(counter=desired.counter, models=[m.name for m in desired.models],
                   steps=self.log, poll_s=self.poll_s)
        return out


def _args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fleet-agent pull", description=__doc__.split("\n")[0])
    p.add_argument("--root")
    p.add_argument("--server", required=True, help="https://HOST:PORT of fleet server")
    p.add_argument("--ca", required=True, type=Path, help="the fleet CA (PEM) to pin")
    p.add_argument("--token", help="one-time enrollment token (first run only)")
    p.add_argument("--once", action="store_true", help="one cycle, one JSON document")
    p.add_argument("--max-rate", type=float, help="download at most this many bytes/s")
    p.add_argument("--poll", type=float, help="override the server's interval (s)")
    return p.parse_args(list(argv))


def _sleep_s(base: float) -> float:
    return base * random.uniform(1 - JITTER, 1 + JITTER)


def main(argv: Sequence[str]) -> int:
    """Entry from :func:`fleet_agent.cli.main` (``pull`` and its options)."""
    from fleet.core.protocol import fail, ok

    a = _args(argv)
    ctx = AgentContext.from_env(a.root)
    try:
        agent = PullAgent(ctx, a.server, a.ca, max_rate=a.max_rate)
    except (OSError, ssl.SSLError) as exc:
        print(json.dumps(fail("pull", errors.UsageError(f"--ca {a.ca}: {exc}"))))
        return 2
    backoff = BACKOFF_MIN_S
    token = a.token
    while True:
        try:
            doc = ok("pull", **agent.cycle(token))
            token = None
            backoff = BACKOFF_MIN_S
        except Exception as exc:  # errors are data; the loop goes on
            doc = fail("pull", exc) | {"steps": agent.log}
            if isinstance(exc, errors.UsageError) and not isinstance(
                    exc, errors.NotFoundError):
                print(json.dumps(doc, sort_keys=True, default=str))
                return 2 if a.once else 1
        if a.once:
            print(json.dumps(doc, sort_keys=True, default=str))
            return 0 if doc["ok"] else 1
        sys.stderr.write(json.dumps(doc, sort_keys=True, default=str) + "\n")
        agent.log = []
        if doc["ok"]:
            wait = _sleep_s(a.poll or agent.poll_s)
        else:
            err = doc.get("error") or {}
            hinted = (err.get("details") or {}).get("retry_after_s")
            wait = max(random.uniform(0, backoff), float(hinted or 0))
            backoff = min(BACKOFF_MAX_S, backoff * 2)
        time.sleep(wait)
