"""In-memory test doubles for the fan-out: a device agent, a transport, a clock.

As python-tuf's repository simulator and httpx's ``MockTransport`` do, the doubles
implement the production interfaces: :class:`FakeTransport` is a
:class:`fleet.transports.base.Transport` (run/push/pull/stat/close) and answers the exec
form of the agent protocol (``docs/agent-protocol.md``) with :class:`FakeAgent`, so the
real :class:`fleet.agent_client.AgentClient` and the real fan-out run on them. Faults are
scripted per verb: fail N times with a (retryable) transport error, answer with an error
document (refusal, disk full, unhealthy model), hang until the transport is closed, or
run a hook (e.g. to cancel the fan-out mid-call). A "package" here is a JSON file
``{"name", "version", "digest"}`` (see :func:`fake_package`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.agent_client import AgentClient
from fleet.core import errors
from fleet.core.protocol import SCHEMA, decode_args, fail, ok
from fleet.registry.models import Device
from fleet.transports.base import (
    CommandResult,
    ProgressCallback,
    RemoteStat,
    TransferResult,
    Transport,
)

__all__ = ["FakeAgent", "FakeBroker", "FakeClock", "FakeFleet", "FakeTransport", "fake_package"]


class FakeClock:
    """Monotonic seconds that move only when told; ``sleep`` records and advances."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._now += seconds


def fake_package(directory: Path, name: str, version: int, digest: str | None = None
                 ) -> tuple[Path, str]:
    """A file the fake agent stages as ``name@version``; returns (path, its sha256)."""
    path = directory / f"{name}-{version}.fpkg"
    path.write_text(json.dumps({"name": name, "version": version,
                                "digest": digest or f"digest-{name}-{version}"}))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class _Fault:
    times: int  #: how many calls it hits (then the verb works); -1: every call
    raise_: errors.TransportError | None = None  #: raised by the transport
    answer: errors.FleetError | None = None  #: sent back as an error document
    hang_advance: tuple[FakeClock, float] | None = None  #: advance, then block until closed
    hook: Callable[[], None] | None = None  #: run, then the verb answers normally


@dataclass
class FakeAgent:
    """One device's agent: a store of staged/active versions, and scripted faults."""

    name: str = "fake"
    files: dict[str, bytes] = field(default_factory=dict)
    #: model name -> {"versions": {version: digest}, "active": int | None, "previous": ...}
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    unhealthy: set[tuple[str, int]] = field(default_factory=set)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    push_error: errors.TransportError | None = None
    _faults: dict[str, list[_Fault]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- scripting ----------------------------------------------------------------------
    def install(self, name: str, version: int, digest: str | None = None) -> None:
        """Start with ``name@version`` active (as an earlier deploy would leave it)."""
        rec = self.models.setdefault(name, {"versions": {}, "active": None, "previous": None})
        rec["versions"][version] = digest or f"digest-{name}-{version}"
        rec["previous"], rec["active"] = rec["active"], version

    def fail(self, verb: str, times: int, error: errors.TransportError) -> None:
        """The transport raises ``error`` on the next ``times`` calls of ``verb``."""
        self._faults.setdefault(verb, []).append(_Fault(times, raise_=error))

    def refuse(self, verb: str, error: errors.FleetError, times: int = -1) -> None:
        """The agent answers ``verb`` with ``error`` as data (``ok: false``)."""
        self._faults.setdefault(verb, []).append(_Fault(times, answer=error))

    def hang(self, verb: str, clock: FakeClock, advance_s: float) -> None:
        """``verb`` moves ``clock`` on by ``advance_s`` and blocks until the transport is
        closed (a peer that stopped answering)."""
        self._faults.setdefault(verb, []).append(_Fault(1, hang_advance=(clock, advance_s)))

    def on_call(self, verb: str, hook: Callable[[], None]) -> None:
        self._faults.setdefault(verb, []).append(_Fault(1, hook=hook))

    def verbs(self) -> list[str]:
        return [v for v, _ in self.calls]

    # -- the protocol -------------------------------------------------------------------
    def _due(self, verb: str) -> list[_Fault]:
        """Every fault that hits this call (each one counts the call)."""
        due = []
        with self._lock:
            for f in self._faults.get(verb, []):
                if f.times != 0:
                    if f.times > 0:
                        f.times -= 1
                    due.append(f)
        return due

    def handle(self, verb: str, args: dict[str, Any], closed: threading.Event
               ) -> dict[str, Any]:
        with self._lock:
            self.calls.append((verb, args))
        due = self._due(verb)
        for f in due:
            if f.hook:
                f.hook()
        for f in due:
            if f.raise_ is not None:
                raise f.raise_
            if f.answer is not None:
                return fail(verb, f.answer)
            if f.hang_advance is not None:
                clock, seconds = f.hang_advance
                clock.advance(seconds)
                if not closed.wait(10.0):  # a safety net: the test failed to unblock it
                    raise errors.TransportTimeout(f"{self.name}: hung call never closed")
                raise errors.ConnectionLostError(f"{self.name}: transport closed mid-call")
        try:
            return ok(verb, **self._answer(verb, args))
        except errors.FleetError as exc:
            return fail(verb, exc)

    def _answer(self, verb: str, args: dict[str, Any]) -> dict[str, Any]:
        if verb == "status":
            return {"agent_version": "fake", "root": "/fake", "enrolled": True,
                    "installed": self._installed()}
        if verb == "stage":
            doc = json.loads(self.files[args["path"]])
            rec = self.models.setdefault(doc["name"], {"versions": {}, "active": None,
                                                       "previous": None})
            rec["versions"][doc["version"]] = doc["digest"]
            return {**doc, "package_sha256": hashlib.sha256(self.files[args["path"]])
                    .hexdigest()}
        if verb == "activate":
            return self._activate(str(args["name"]), int(args["version"]))
        if verb == "rollback":
            rec = self.models[str(args["name"])]
            if rec["previous"] is None:
                raise errors.StoreError(f"{args['name']}: no previous version")
            rec["active"], rec["previous"] = rec["previous"], rec["active"]
            return {"name": args["name"], "current": rec["active"],
                    "previous": rec["previous"], "changed": True}
        if verb == "audit":
            return {"models": [{"name": n, "version": r["active"], "findings": []}
                               for n, r in self.models.items() if r["active"] is not None]}
        if verb.startswith("lora "):
            return {"adapter": args.get("name"), "previous": None}
        raise errors.UsageError(f"unknown verb {verb!r}")

    def _installed(self) -> dict[str, Any]:
        out = {}
        for name, rec in self.models.items():
            row: dict[str, Any] = {"versions": sorted(rec["versions"]), "active": rec["active"]}
            if rec["active"] is not None:
                row["version"] = rec["active"]
                row["digest"] = rec["versions"][rec["active"]]
            out[name] = row
        return out

    def _activate(self, name: str, version: int) -> dict[str, Any]:
        rec = self.models.get(name) or {}
        if version not in rec.get("versions", {}):
            raise errors.StoreError(f"{name}@{version} is not staged")
        if (name, version) in self.unhealthy:
            raise errors.HealthCheckError(f"{name}@{version}: no backend produced correct "
                                          "outputs; not activated", name=name)
        rec["previous"], rec["active"] = rec["active"], version
        return {"report": {"name": name, "version": version, "previous": rec["previous"],
                           "pick": {"label": "cpu/fp32", "effective_backend": "cpu"},
                           "median_ms": 1.5, "cpu_median_ms": 1.5, "findings": []}}


class FakeTransport(Transport):
    """The production transport contract over a :class:`FakeAgent`, in memory."""

    scheme = "fake"
    default_agent_root = "/fake/agent"

    def __init__(self, agent: FakeAgent, uri: str | None = None) -> None:
        super().__init__(uri or f"fake://{agent.name}")
        self.agent = agent
        self.closed = threading.Event()

    def _check_open(self, what: str) -> None:
        if self.closed.is_set():
            raise errors.ConnectionLostError(f"{what}: transport closed", uri=self.uri)

    def run(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None
            ) -> CommandResult:
        self._check_open("run")
        words = list(argv)
        i = words.index("--root")
        j = words.index("--args-b64")
        verb = " ".join(words[i + 2:j])
        doc = self.agent.handle(verb, decode_args(words[j + 1]), self.closed)
        assert doc["schema"] == SCHEMA
        return CommandResult(tuple(words), 0 if doc["ok"] else 1,
                             (json.dumps(doc) + "\n").encode(), b"", 0.0)

    def push(self, local: Path, remote: str, *, resume: bool = True,
             progress: ProgressCallback | None = None) -> TransferResult:
        self._check_open("push")
        if self.agent.push_error is not None:
            raise self.agent.push_error
        data = local.read_bytes()
        have = self.agent.files.get(remote, b"")
        resumed = len(have) if resume and data.startswith(have) else 0
        self.agent.files[remote] = data
        if progress:
            progress(len(data), len(data))
        return TransferResult(str(local), remote, len(data), len(data) - resumed, resumed,
                              hashlib.sha256(data).hexdigest(), 0.0)

    def pull(self, remote: str, local: Path) -> TransferResult:
        self._check_open("pull")
        if remote not in self.agent.files:
            raise errors.RemoteFileError(f"no {remote}", uri=self.uri)
        data = self.agent.files[remote]
        local.write_bytes(data)
        return TransferResult(str(local), remote, len(data), len(data), 0,
                              hashlib.sha256(data).hexdigest(), 0.0)

    def stat(self, remote: str) -> RemoteStat | None:
        self._check_open("stat")
        data = self.agent.files.get(remote)
        return None if data is None else RemoteStat(remote, len(data), 0o600, 0.0, False)

    def close(self) -> None:
        self.closed.set()


class FakeFleet:
    """Agents by device name, and the ``opener`` the rollout code takes instead of
    :func:`fleet.connect.device_session` (same contract: register the close, yield the
    client, close on exit)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.agents = {n: FakeAgent(n) for n in names}
        self.transports: dict[str, list[FakeTransport]] = {n: [] for n in names}

    def __getitem__(self, name: str) -> FakeAgent:
        return self.agents[name]

    @contextmanager
    def opener(self, device: Device | str, ctx: Any = None) -> Iterator[AgentClient]:
        name = device if isinstance(device, str) else device.name
        transport = FakeTransport(self.agents[name])
        self.transports[name].append(transport)
        if ctx is not None:
            ctx.add_closer(transport.close)
        with transport:
            yield AgentClient(transport, device if isinstance(device, Device) else None)


class FakeBroker:
    """:class:`fleet.worker.broker.Broker` in memory, for the Celery dispatcher's tests.

    A task sent to a queue runs at once through ``run`` (give it the real worker code,
    :func:`fleet.worker.tasks.run_payload`), its result passed through JSON as Celery
    would, unless its queue is ``held``: then it stays ``PENDING`` (a worker that took
    it and died, or none at all) until :meth:`release`. :meth:`start` marks a held task
    ``STARTED``. Revokes and cancel tokens are recorded; :meth:`mget` answers the
    workers' cancel watch (:class:`fleet.worker.watch.CancelWatch`)."""

    def __init__(self, run: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        from fleet.worker.broker import Send, TaskState

        self.run = run
        self.sent: list[Send] = []
        self.results: dict[str, TaskState] = {}
        self.revoked: list[str] = []
        self.cancelled: set[str] = set()
        self.held: set[str] = set()
        self.hashes: dict[str, dict[str, str]] = {}
        self._state = TaskState

    def _finish(self, payload: dict[str, Any]) -> Any:
        assert self.run is not None
        doc = json.loads(json.dumps(self.run(json.loads(json.dumps(payload)))))
        return self._state("SUCCESS", doc)

    def send(self, batch: Sequence[Any]) -> None:
        for item in batch:
            self.sent.append(item)
            if item.queue not in self.held:
                self.results[item.task_id] = self._finish(item.payload)

    def task(self, device: str) -> Any:
        return next(s for s in self.sent if s.payload["device"] == device)

    def start(self, device: str) -> None:
        self.results[self.task(device).task_id] = self._state("STARTED")

    def release(self, device: str) -> None:
        """Run a held task now (its worker came back)."""
        item = self.task(device)
        self.results[item.task_id] = self._finish(item.payload)

    def states(self, task_ids: Sequence[str]) -> dict[str, Any]:
        return {t: self.results[t] for t in task_ids if t in self.results}

    def hset(self, key: str, device: str, value: str, keep_s: int) -> None:
        """The workers' push-progress writes (``fleet.worker.progress.Write``)."""
        self.hashes.setdefault(key, {})[device] = value

    def pushed(self, token: str) -> dict[str, tuple[int, int]]:
        from fleet.worker.broker import bytes_key, decode_bytes

        return decode_bytes(self.hashes.get(bytes_key(token), {}))

    def revoke(self, task_ids: Sequence[str]) -> None:
        self.revoked.extend(task_ids)

    def cancel(self, token: str) -> None:
        self.cancelled.add(token)

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        from fleet.worker.broker import CANCEL_PREFIX

        return [b"1" if k.removeprefix(CANCEL_PREFIX) in self.cancelled else None
                for k in keys]
