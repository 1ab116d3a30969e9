"""``fleet-agent serve``: hold an MNN-LLM base in memory, answer generation requests on a
Unix socket, hot-swap LoRA adapters without dropping a request.

The swap is a pointer swap under a lock. Every request takes a counted reference to the
adapter that is current when it starts and runs wholly on it; a swap prepares the new
adapter completely (open the pack, check its base binding, ``create_lora``, reproduce its
reference outputs) before it touches the pointer, so a failure leaves the old adapter
serving. The old adapter is released when its last in-flight request ends.

pymnn holds the GIL inside ``generate`` and one ``Llm`` object keeps one KV cache, so all
native calls go through one engine lock: requests never run two at a time, and a swap's
preparation interleaves with requests at the granularity of one native call.

The adapter being served is persisted (temp file + rename) after every swap; a restarted
daemon loads the base, re-checks that adapter and serves it again.

Model sources: ``model`` (a package in the device store, decrypted into memfds and opened
through a folder of links, see :class:`fleet_agent.lora_packs.LinkDir`) or ``model_dir`` (a plain
folder, for development and the fixtures). Protocol: :mod:`fleet_agent.serve_protocol`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.core.limits import SERVE, ServeLimits
from fleet_agent import lora_packs as L
from fleet_agent.context import AgentContext
from fleet_agent.hardening import harden_process
from fleet_agent.serve_protocol import MAX_LINE, decode, encode, error_doc

__all__ = ["Adapter", "LlmEngine", "ServeServer", "open_engine", "serve"]

log = logging.getLogger("fleet_agent.serve")
STATE_SCHEMA = "fleet.serve/1"
MAX_NEW_TOKENS = 1024
_HISTORY = 10
#: accept() errors that mean "out of descriptors or memory": back off, do not spin
_ACCEPT_BACKOFF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: seconds a refused connection stays half-closed before it is closed (lingering close)
_LINGER_S = 2.0
#: Native log lines that mean ``create_lora`` failed (the object it returns would crash).
_LORA_FAILED = ("Load Lora error", "Load module failed", "model file not found")


@dataclass
class Adapter:
    """A model that requests run on: the base itself or a LoRA sharing its weights."""

    label: str  # "base" or "name@version"
    spec: dict[str, Any] | None  # how to load it again (None: the base)
    model: Any  # pymnn's native LLM object
    closers: list[Callable[[], None]] = field(default_factory=list)
    refs: int = 0
    retired: bool = False
    released: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LlmEngine:
    """The base model, the current adapter pointer, and the swap procedure."""

    def __init__(self, llm: Any, *, links: L.LinkDir, base_info: dict[str, Any],
                 base_manifest: Any = None, store: Any = None, state_file: Path | None = None,
                 closers: list[Callable[[], None]] | None = None) -> None:
        self.llm = llm
        self.links = links
        self.base_info = base_info
        self.base_manifest = base_manifest
        self.store = store
        self.state_file = state_file
        self._closers = closers or []
        self._engine = threading.Lock()  # every native call
        self._ptr = threading.Lock()  # the current pointer and reference counts
        self._swap = threading.Lock()  # one swap at a time
        self.base = Adapter("base", None, llm._c_obj, info={"name": None})
        self.current = self.base
        self.history: list[dict[str, Any]] = []
        self.served = 0
        self.swaps = 0
        self.refused = 0
        self.started = time.time()
        self.restore_error: dict[str, Any] | None = None
        self.vocab = _vocab_size(llm)
        self.memory_only = dict(links.forced)

    def check_prompt(self, ids: list[int], max_tokens: int) -> None:
        """Refuse a prompt longer than ``max_tokens`` or with ids outside the vocabulary
        (MNN indexes its embedding table with them unchecked)."""
        if len(ids) > max_tokens:
            raise errors.RequestLimitError(
                f"prompt of {len(ids)} tokens; at most {max_tokens}", limit=max_tokens,
                tokens=len(ids))
        if self.vocab is not None:
            bad = next((t for t in ids if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise errors.RequestLimitError(
                    f"token id {bad} is outside the vocabulary (0..{self.vocab - 1})",
                    vocab=self.vocab, token=bad)

    # -- requests ---------------------------------------------------------------------
    def generate(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
        with self._ptr:
            a = self.current
            a.refs += 1
        try:
            with self._engine:
                a.model.reset()
                out = [int(t) for t in a.model.generate(ids, max_new_tokens)]
            self.served += 1
            return out, a.label
        finally:
            with self._ptr:
                a.refs -= 1
                drop = a.retired and a.refs == 0 and not a.released
                if drop:
                    a.released = True
            if drop:
                self._release(a)

    def encode_text(self, text: str) -> list[int]:
        with self._engine:
            return [int(t) for t in self.llm.tokenizer_encode(text)]

    def decode_ids(self, ids: list[int]) -> str:
        with self._engine:
            return "".join(self.llm.tokenizer_decode(int(t)) for t in ids)

    # -- swap -------------------------------------------------------------------------
    def swap(self, spec: dict[str, Any] | None, *, persist: bool = True,
             record: bool = True) -> dict[str, Any]:
        """Serve ``spec`` (None: the base alone). Raises, with the old adapter serving,
        when the pack is corrupt, bound to another base, or misses its references."""
        with self._swap:
            t0 = time.perf_counter()
            try:
                new = self.base if spec is None else self._prepare(spec)
            except errors.FleetError:
                self.refused += 1
                raise
            prep_ms = (time.perf_counter() - t0) * 1e3
            with self._ptr:
                old = self.current
                self.current = new
                if old is not new and old is not self.base:
                    old.retired = True
                drop = old.retired and old.refs == 0 and not old.released
                if drop:
                    old.released = True
                in_flight = old.refs
            swap_ms = (time.perf_counter() - t0) * 1e3
            if record and old is not new:
                self.history = [*self.history, old.spec or {"name": None}][-_HISTORY:]
            self.swaps += 1
            if persist:
                self._persist()
            if drop:
                self._release(old)
            return {"adapter": new.label, "previous": old.label, "swap_ms": round(swap_ms, 3),
                    "prepare_ms": round(prep_ms, 3), "old_in_flight": in_flight,
                    "check": new.info.get("check"),
                    "base": {k: self.base_info.get(k) for k in ("name", "version")}}

    def rollback(self) -> dict[str, Any]:
        """Serve the adapter served before the current one."""
        if not self.history:
            raise errors.StoreError("no adapter was served before this one")
        target = self.history[-1]
        res = self.swap(None if _label(target) == "base" else target, record=False)
        self.history = self.history[:-1]
        self._persist()
        return res

    def _prepare(self, spec: dict[str, Any]) -> Adapter:
        closers: list[Callable[[], None]] = []
        try:
            label, rel, ref, info = self._open(spec, closers)
            t0 = time.perf_counter()
            with self._engine:
                from fleet.core.mnn.fdcapture import capture_fds

                with capture_fds() as cap:
                    model = self.llm._c_obj.create_lora(rel)
            text = cap.combined
            if model is None or any(m in text for m in _LORA_FAILED):
                del model
                raise errors.InvalidModelError(
                    f"MNN could not load adapter {label}: {text.strip()[-300:]}",
                    adapter=label, log=text[-2000:])
            a = Adapter(label, spec, model, closers, info=info)
            t1 = time.perf_counter()
            try:
                a.info["check"] = L.check_reference(self._gen_on(model), ref, adapter=label)
                a.info["check"].update(create_ms=round((t1 - t0) * 1e3, 3),
                                       check_ms=round((time.perf_counter() - t1) * 1e3, 3))
            except BaseException:
                with self._engine:
                    del a.model
                raise
            return a
        except BaseException:
            for c in reversed(closers):
                with contextlib.suppress(Exception):
                    c()
            raise

    def _gen_on(self, model: Any) -> Callable[[list[int], int], list[int]]:
        def gen(ids: list[int], n: int) -> list[int]:
            with self._engine:  # one prompt per lock hold: requests interleave
                model.reset()
                return [int(t) for t in model.generate(ids, n)]
        return gen

    def _open(self, spec: dict[str, Any], closers: list[Callable[[], None]]
              ) -> tuple[str, str, L.Reference, dict[str, Any]]:
        """(label, link name for create_lora, reference, info) of an adapter spec.

        A daemon serving a store package takes only installed, signed LoRA packs by name
        and version (re-verified from the store, as at push) and their own references: a
        path, or a caller's reference/binding/digest, is refused before anything is read."""
        if self.store is None:
            if not spec.get("path"):
                raise errors.UsageError("this daemon serves a plain folder: swap needs path")
            return self._open_file(spec, closers)
        foreign = sorted(k for k in CALLER_ONLY_KEYS if spec.get(k) is not None)
        if foreign:
            raise errors.UsageError(
                f"this daemon serves a signed package: swap takes an installed LoRA pack by "
                f"name@version, never {', '.join(foreign)} from the caller", refused=foreign)
        name, version = parse_pack_ref(spec.get("name"), spec.get("version"))
        if version is None:
            version = _newest_version(self.store.ctx, name)
        stack = contextlib.ExitStack()
        closers.append(stack.close)
        opened = stack.enter_context(self.store.open_payload(name, int(version)))
        m = opened.manifest
        if m.kind != "lora":
            raise errors.UsageError(f"{name} v{version} is a {m.kind} package, not a LoRA")
        from fleet.core.package import check_base_binding

        check_base_binding(m, self.base_manifest)
        ref_path = opened.paths.get(m.golden or L.REFERENCE_FILE)
        if ref_path is None:
            raise errors.ReferenceMismatchError(
                f"LoRA pack {name} v{version} carries no reference outputs", adapter=name)
        ref = L.Reference.from_dict(L.read_json(Path(ref_path)))
        label = f"{name}@{m.version}"
        link = self.links.link(f"lora-{name}-{m.version}-{os.urandom(3).hex()}.mnn",
                               opened.entry)
        closers.append(lambda: self.links.unlink(link))
        return label, link, ref, {"name": name, "version": m.version,
                                  "payload_sha256": m.sha256}

    def _open_file(self, spec: dict[str, Any], closers: list[Callable[[], None]]
                   ) -> tuple[str, str, L.Reference, dict[str, Any]]:
        path = Path(str(spec["path"])).resolve()
        if not path.is_file():
            raise errors.NotFoundError(f"no adapter file at {path}", path=str(path))
        name = str(spec.get("name") or path.stem)
        version = spec.get("version")
        label = f"{name}@{version}" if version is not None else name
        L.check_binding(spec.get("base"), self.base_info, adapter=label)
        raw = spec.get("reference")
        if raw is None and spec.get("reference_path"):
            raw = L.read_json(Path(str(spec["reference_path"])))
        if raw is None:
            raise errors.ReferenceMismatchError(
                f"adapter {label} carries no reference outputs", adapter=label)
        ref = L.Reference.from_dict(raw)
        want = spec.get("sha256")
        if want is not None and L._sha256(path) != want:
            raise errors.DigestMismatchError(f"adapter {label}: file digest differs",
                                             adapter=label)
        link = self.links.link(f"lora-{name}-{os.urandom(3).hex()}.mnn", str(path))
        closers.append(lambda: self.links.unlink(link))
        return label, link, ref, {"name": name, "version": version, "path": str(path)}

    def _release(self, a: Adapter) -> None:
        with self._engine:
            a.model = None  # drops pymnn's object: MNN frees the adapter's modules
        for c in reversed(a.closers):
            with contextlib.suppress(Exception):
                c()
        a.closers.clear()

    # -- state ------------------------------------------------------------------------
    def _persist(self) -> None:
        if self.state_file is None:
            return
        L.write_json_atomic(self.state_file, {
            "schema": STATE_SCHEMA, "adapter": self.current.spec,
            "label": self.current.label, "history": self.history,
            "base": {k: self.base_info.get(k) for k in ("name", "version")},
            "updated": _now()})

    def restore(self) -> None:
        """Serve the adapter the state file names (checked again, as on any swap)."""
        if self.state_file is None:
            return
        doc = L.read_json(self.state_file) or {}
        self.history = [h for h in doc.get("history") or [] if isinstance(h, dict)]
        spec = doc.get("adapter")
        if isinstance(spec, dict):
            try:
                self.swap(spec, persist=False, record=False)
            except errors.FleetError as exc:
                log.error("could not restore adapter %s: %s", spec, exc.message)
                self.restore_error = exc.to_dict()

    def status(self) -> dict[str, Any]:
        with self._ptr:
            cur = self.current
        return {"adapter": cur.label, "adapter_info": {k: v for k, v in cur.info.items()
                                                       if k != "check"},
                "base": self.base_info, "served": self.served, "swaps": self.swaps,
                "refused": self.refused, "history": [_label(h) for h in self.history],
                "uptime_s": round(time.time() - self.started, 3), "pid": os.getpid(),
                "restore_error": self.restore_error, "vocab": self.vocab,
                "memory_only": {"forced": self.memory_only, **L.MEMORY_ONLY}}

    def close(self) -> None:
        with self._ptr:
            cur, self.current = self.current, self.base
        if cur is not self.base and not cur.released:
            cur.released = True
            self._release(cur)
        with self._engine:
            self.llm = None
            self.base.model = None
        for c in reversed(self._closers):
            with contextlib.suppress(Exception):
                c()
        self.links.close()


def _vocab_size(llm: Any) -> int | None:
    """The vocabulary size: the last dimension of the logits of one token (None when
    pymnn cannot tell; then only the prompt length is checked)."""
    try:
        size = int(llm._c_obj.forward([0]).shape[-1])
        llm._c_obj.reset()
    except Exception:  # not every pymnn build exposes forward; the check is best effort
        return None
    return size if size > 0 else None


def _label(spec: dict[str, Any]) -> str:
    if spec.get("name") is None and not spec.get("path"):
        return "base"
    v = spec.get("version")
    return f"{spec.get('name')}@{v}" if v is not None else str(spec.get("name"))


#: swap keys only a ``--model-dir`` daemon accepts (a store daemon reads them from the pack)
CALLER_ONLY_KEYS = ("path", "reference", "reference_path", "sha256", "base")


def parse_pack_ref(name: Any, version: Any) -> tuple[str, int | None]:
    """``("adapter_a", 3)`` from ``name="adapter_a", version=3`` or ``name="adapter_a@3"``.
    Raises :class:`UsageError` for anything that is not a valid pack name and version."""
    from fleet.core.package import Manifest

    if isinstance(name, str) and "@" in name and version is None:
        name, _, v = name.partition("@")
        version = v
    if not isinstance(name, str) or not Manifest.valid_name(name):
        raise errors.UsageError(f"swap needs name (a LoRA pack's name), not {name!r}")
    if version is None:
        return name, None
    if isinstance(version, bool) or not (isinstance(version, int) or (
            isinstance(version, str) and version.isdecimal() and version.isascii())):
        raise errors.UsageError(f"swap: bad version {version!r}")
    return name, int(version)


def _newest_version(ctx: AgentContext, name: str) -> int:
    state = L.read_json(ctx.state_file) or {}
    versions = ((state.get("models") or {}).get(name) or {}).get("versions") or {}
    if not versions:
        raise errors.NotFoundError(f"no LoRA pack {name} is staged on this device", name=name)
    return max(int(v) for v in versions)


# -- opening the base ----------------------------------------------------------------------
def _load_llm(config_path: str, overrides: dict[str, Any]) -> Any:
    import MNN.llm as mllm

    from fleet.core.mnn.fdcapture import capture_fds

    safe, _ = L.memory_only_config(overrides)  # no mmap caches: plaintext stays in memory
    with capture_fds() as cap:
        llm = mllm.create(config_path)
        # greedy: reference checks and clients need deterministic outputs
        llm.set_config({**safe, "sampler_type": "greedy"})
        llm.load()
        probe = llm._c_obj.generate([0], 1)
    if not probe:
        raise errors.InvalidModelError(
            f"MNN-LLM could not load {config_path}: {cap.combined.strip()[-300:]}",
            path=config_path)
    return llm


def open_engine(ctx: AgentContext, *, model: str | None = None, model_dir: str | None = None,
                state_file: Path | None = None, config: dict[str, Any] | None = None
                ) -> LlmEngine:
    """Load the base (from the store, or a plain folder) and restore the served adapter."""
    links = L.LinkDir(ctx.root / "run")
    closers: list[Callable[[], None]] = []
    try:
        if model:
            from fleet_agent.store import Store

            store = Store(ctx)
            stack = contextlib.ExitStack()
            closers.append(stack.close)
            opened = stack.enter_context(store.open_payload(model))
            for rel, path in opened.paths.items():
                if "/" in rel:
                    raise errors.InvalidModelError(f"{model}: nested file {rel} in an LLM "
                                                   "folder is not supported", name=model)
                links.link(rel, path)  # /proc/self/fd/N: plaintext stays in memory
            m = opened.manifest
            by_name = {f.path: f.sha256 for f in m.files}
            facts = m.mnn or {}
            info = {"name": m.name, "version": m.version, "source": "store",
                    "llm_mnn_sha256": by_name.get("llm.mnn"),
                    "llm_weight_sha256": by_name.get("llm.mnn.weight"),
                    "quant_bits": facts.get("quant_bits"),
                    "quant_block": facts.get("quant_block")}
            llm = _load_llm(str(links.path / "config.json"), config or {})
            engine = LlmEngine(llm, links=links, base_info=info, base_manifest=m, store=store,
                            state_file=state_file, closers=closers)
        elif model_dir:
            folder = Path(model_dir).resolve()
            cfg = L.read_json(folder / "config.json")
            if cfg is None:
                raise errors.InvalidModelError(f"{folder} has no config.json",
                                               path=str(folder))
            for p in folder.iterdir():
                if p.is_file():
                    links.link(p.name, str(p))
            info = {**L.dir_base_facts(folder, cfg), "source": "dir", "path": str(folder)}
            llm = _load_llm(str(links.path / "config.json"), config or {})
            engine = LlmEngine(llm, links=links, base_info=info, state_file=state_file,
                            closers=closers)
        else:
            raise errors.UsageError("serve needs model (a store package) or model_dir")
    except BaseException:
        for c in reversed(closers):
            with contextlib.suppress(Exception):
                c()
        links.close()
        raise
    engine.restore()
    return engine


# -- the socket server ---------------------------------------------------------------------
class _Handler(socketserver.StreamRequestHandler):
    server: ServeServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.limits.idle_timeout_s)  # silent: closed

    def handle(self) -> None:
        while True:
            try:
                line = self.rfile.readline(MAX_LINE + 1)
            except (TimeoutError, OSError):
                return  # idle past the timeout (or gone): the connection is closed
            if not line:
                return
            if not line.strip():
                continue
            try:
                doc = self.server.dispatch(decode(line))
            except Exception as exc:  # errors are data
                doc = error_doc(exc)
            try:
                self.wfile.write(encode(doc))
                self.wfile.flush()
            except OSError:
                return


class ServeServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The daemon's socket: one thread per connection, at most ``limits.max_connections``
    at once (the next is answered ``request_limit`` and closed after a short linger), each
    closed after ``limits.idle_timeout_s`` without a request; out of file descriptors, the
    accept loop
    backs off instead of spinning."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, path: Path, engine: LlmEngine, limits: ServeLimits = SERVE) -> None:
        self.engine = engine
        self.path = path
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._backoff = 0.0
        self._linger_lock = threading.Lock()
        self._lingering: list[tuple[float, Any]] = []
        self._reaper: threading.Thread | None = None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists() or path.is_symlink():
            _refuse_if_live(path)
            path.unlink()
        old = os.umask(0o177)  # the socket is created 0600: only this user may connect
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)

    def get_request(self) -> tuple[Any, Any]:
        try:
            conn = super().get_request()
        except OSError as exc:
            if exc.errno in _ACCEPT_BACKOFF:
                # the listening socket stays readable while accept() fails: without a
                # pause the serve loop would spin at 100 % CPU
                self._backoff = min(1.0, self._backoff * 2 or self.limits.accept_backoff_s)
                log.warning("accept failed (%s); backing off %.2f s", exc.strerror,
                            self._backoff)
                time.sleep(self._backoff)
            raise
        self._backoff = 0.0
        return conn

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(encode(error_doc(errors.RequestLimitError(
                    f"too many connections (at most {self.limits.max_connections})",
                    limit=self.limits.max_connections))))
            self._linger(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def _linger(self, request: Any) -> None:
        """Close a refused connection gently (a *lingering close*, as HTTP servers do): stop
        sending now, close it a moment later, so a client still writing its request gets
        the error line and EOF instead of a broken pipe. One reaper thread, at most
        ``max_connections`` sockets lingering (the oldest is closed at once past that)."""
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
        with self._linger_lock:
            self._lingering.append((time.monotonic() + _LINGER_S, request))
            while len(self._lingering) > self.limits.max_connections:
                self.shutdown_request(self._lingering.pop(0)[1])
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(target=self._reap, name="serve-linger",
                                                daemon=True)
                self._reaper.start()

    def _reap(self) -> None:
        while True:
            with self._linger_lock:
                now = time.monotonic()
                while self._lingering and self._lingering[0][0] <= now:
                    self.shutdown_request(self._lingering.pop(0)[1])
                if not self._lingering:
                    self._reaper = None
                    return
                wait = self._lingering[0][0] - now
            time.sleep(min(wait, _LINGER_S))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        e = self.engine
        if op == "generate":
            ids = req.get("ids")
            text = req.get("text")
            if ids is None and isinstance(text, str):
                if len(text) > self.limits.max_prompt_tokens * 16:  # before tokenising
                    raise errors.RequestLimitError(
                        f"prompt text longer than {self.limits.max_prompt_tokens * 16} "
                        "characters", limit=self.limits.max_prompt_tokens * 16)
                ids = e.encode_text(text)
            if not isinstance(ids, list) or not ids or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise errors.UsageError("generate needs ids (token id list) or text")
            e.check_prompt(ids, self.limits.max_prompt_tokens)
            n = req.get("max_new_tokens", 16)
            if not isinstance(n, int) or not 0 < n <= MAX_NEW_TOKENS:
                raise errors.UsageError(f"max_new_tokens must be 1..{MAX_NEW_TOKENS}")
            out, label = e.generate(ids, n)
            doc: dict[str, Any] = {"ok": True, "ids": out, "adapter": label}
            if text is not None:
                doc["text"] = e.decode_ids(out)
            return doc
        if op == "swap":
            if req.get("rollback"):
                return {"ok": True, **e.rollback()}
            spec = {k: v for k, v in req.items() if k != "op"}
            if spec.get("name") is None and not spec.get("path"):
                return {"ok": True, **e.swap(None)}
            return {"ok": True, **e.swap(spec)}
        if op == "status":
            return {"ok": True, **e.status()}
        if op == "ping":
            return {"ok": True}
        raise errors.UsageError(f"unknown op {op!r}", op=op)


def serve_limits(given: Any) -> ServeLimits:
    """:data:`~fleet.core.limits.SERVE`, with the ``limits`` argument's keys (only those
    :class:`ServeLimits` has, positive numbers) over it."""
    if not given:
        return SERVE
    if not isinstance(given, dict):
        raise errors.UsageError("serve limits must be an object")
    known = {f.name: f.type for f in dataclasses.fields(ServeLimits)}
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key not in known or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or value <= 0:
            raise errors.UsageError(f"bad serve limit {key}={value!r}", key=key)
        out[key] = int(value) if key in ("max_connections", "max_prompt_tokens") else \
            float(value)
    return dataclasses.replace(SERVE, **out)


def _refuse_if_live(path: Path) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        return  # stale socket file of a dead daemon
    finally:
        s.close()
    raise errors.UsageError(f"a serve daemon already listens on {path}", socket=str(path))


# -- the verb ------------------------------------------------------------------------------
def _flag_args(argv: list[str]) -> dict[str, Any]:
    """``fleet-agent serve --socket P --model-dir D`` (the envelope passes only JSON args,
    so the daemon reads its flags from the command line itself)."""
    import argparse

    if "serve" not in argv:
        return {}
    ap = argparse.ArgumentParser(prog="fleet-agent serve", add_help=False)
    ap.add_argument("--socket")
    ap.add_argument("--model-dir", dest="model_dir")
    ap.add_argument("--model")
    ap.add_argument("--state", dest="state_file")
    ap.add_argument("--thread-num", dest="thread_num", type=int)
    known, _ = ap.parse_known_args(argv[argv.index("serve") + 1:])
    return {k: v for k, v in vars(known).items() if v is not None}


def serve(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns a summary."""
    harden_process()  # no core dumps of a process full of plaintext; private umask
    args = {**_flag_args(sys.argv), **args}
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s serve %(levelname)s %(message)s")
    # MNN logs on fd 1; the agent's one JSON document must stay alone on stdout.
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        ctx.ensure()
        sock = Path(args["socket"]) if args.get("socket") else L.serve_socket(ctx)
        state = Path(args["state_file"]) if args.get("state_file") else L.serve_state_file(ctx)
        config = dict(args.get("config") or {})
        if args.get("thread_num"):
            config["thread_num"] = int(args["thread_num"])
        config, forced = L.memory_only_config(config)  # the caller cannot switch mmap on
        engine = open_engine(ctx, model=args.get("model"), model_dir=args.get("model_dir"),
                             state_file=state, config=config)
        engine.memory_only.update({k: {**v, "file": "serve config"}
                                   for k, v in forced.items()})
        if engine.memory_only:
            log.warning("forced off (plaintext stays in memory): %s", engine.memory_only)
        server = ServeServer(sock, engine, serve_limits(args.get("limits")))
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            if not stop.is_set():
                stop.set()
                threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        log.info("serving %s on %s (adapter %s)", engine.base_info.get("name"), sock,
                 engine.current.label)
        try:
            server.serve_forever(poll_interval=0.2)
        finally:
            server.server_close()
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            summary = engine.status()
            engine.close()
        return {"stopped": True, **summary}
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)


def main(argv: list[str] | None = None) -> int:
    """``python -m fleet_agent.serve --root R --socket P --model-dir D``."""
    import json

    argv = list(sys.argv[1:] if argv is None else argv)
    root = None
    if "--root" in argv:
        root = argv[argv.index("--root") + 1]
    ctx = AgentContext.from_env(root)
    from fleet_agent.cli import dispatch

    sys.argv = ["fleet-agent", "serve", *argv]
    doc = dispatch(ctx, "serve", {})
    sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
