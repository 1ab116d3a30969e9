"""Findings 6 and 8, serve side (``cases/serve-unsigned-path-swap``,
``cases/serve-unbounded``): a daemon serving a signed package swaps only installed, signed
LoRA packs by name@version with their own references; prompts are bounded in length and
token range; connections are capped and idle ones closed; EMFILE never makes the accept
loop spin; the daemon runs without core dumps. One attack per test, exact error class,
the served adapter unchanged."""

from __future__ import annotations

import errno
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fleet_agent.lora_packs import lora_add, serve_state_file
from fleet_agent.serve import ServeServer, parse_pack_ref, serve_limits
from fleet_agent.serve_protocol import ServeClient, call

from fleet.artifacts import base_binding
from fleet.core import errors
from fleet.core.limits import ServeLimits
from tests.package_kit import make_device
from tests.test_lora_serve import FIX, _build_base, _build_pack, _ref, _stop

LIMITS = {"max_connections": 4, "idle_timeout_s": 1.0, "max_prompt_tokens": 64}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("serve-hard")
    signer = ed25519.Ed25519PrivateKey.generate()
    dev = make_device(tmp / "dev", signer)
    base_pkg, base_m = _build_base(tmp, signer, dev)
    st = dev.store()
    st.stage(base_pkg)
    st.activate("llm", 1)
    pack = _build_pack(tmp, signer, dev, "adapter_a", 1, base_binding(base_m))
    lora_add(dev.ctx, {"path": str(pack)})
    sock = tmp / "serve.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet_agent", "--root", str(dev.ctx.root), "serve", "--args",
         json.dumps({"model": "llm", "socket": str(sock), "thread_num": 1,
                     "limits": LIMITS})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            call(sock, "ping", timeout=2)
            break
        except errors.FleetError:
            time.sleep(0.1)
    yield {"dev": dev, "sock": sock, "proc": proc, "tmp": tmp}
    _stop(proc)


def _adapter(sock: Path) -> str:
    return str(call(sock, "status")["adapter"])


def test_path_swap_is_refused_by_a_store_daemon(served: dict[str, Any]) -> None:
    sock = served["sock"]
    before = _adapter(sock)
    with ServeClient(sock) as c:
        answer = c.request({"op": "swap", "path": str(FIX / "lora" / "adapter_a.mnn"),
                            "name": "unsigned", "version": 1,
                            "reference": _ref("adapter_a")})
    assert not answer["ok"] and answer["error"]["code"] == "usage"
    assert "never path" in answer["error"]["message"]
    assert _adapter(sock) == before
    persisted = json.loads(serve_state_file(served["dev"].ctx).read_text()) \
        if serve_state_file(served["dev"].ctx).exists() else {}
    assert "path" not in json.dumps(persisted)


def test_caller_reference_is_refused_even_for_a_signed_pack(served: dict[str, Any]) -> None:
    sock = served["sock"]
    before = _adapter(sock)
    with pytest.raises(errors.UsageError, match="reference"):
        call(sock, "swap", name="adapter_a", version=1, reference=_ref("adapter_a"))
    assert _adapter(sock) == before


def test_signed_pack_swaps_by_name_at_version(served: dict[str, Any]) -> None:
    sock = served["sock"]
    out = call(sock, "swap", name="adapter_a@1")
    assert out["adapter"] == "adapter_a@1"
    call(sock, "swap", name=None)


def test_pack_reference_forms() -> None:
    assert parse_pack_ref("a@3", None) == ("a", 3) and parse_pack_ref("a", 2) == ("a", 2)
    with pytest.raises(errors.UsageError):
        parse_pack_ref("../x", None)


def test_token_ids_past_the_vocabulary_are_refused(served: dict[str, Any]) -> None:
    with pytest.raises(errors.RequestLimitError, match="vocabulary"):
        call(served["sock"], "generate", ids=[5, 6, 100000, 2**31 - 1], max_new_tokens=1)


def test_a_prompt_past_the_limit_is_refused(served: dict[str, Any]) -> None:
    with pytest.raises(errors.RequestLimitError, match="at most 64"):
        call(served["sock"], "generate", ids=[5] * 65, max_new_tokens=1)


def test_connections_past_the_cap_are_refused(served: dict[str, Any]) -> None:
    held = [ServeClient(served["sock"], timeout=5) for _ in range(LIMITS["max_connections"])]
    try:
        for c in held:
            assert c.request({"op": "ping"})["ok"]
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(5)
        extra.connect(str(served["sock"]))
        answer = extra.makefile("rb").readline()
        extra.close()
        assert json.loads(answer)["error"]["code"] == "request_limit"
    finally:
        for c in held:
            c.close()


def test_a_refused_client_still_writing_gets_the_error_not_a_broken_pipe(
        served: dict[str, Any]) -> None:
    held = [ServeClient(served["sock"], timeout=5) for _ in range(LIMITS["max_connections"])]
    try:
        for c in held:
            assert c.request({"op": "ping"})["ok"]
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(5)
        extra.connect(str(served["sock"]))
        reader = extra.makefile("rb")
        assert json.loads(reader.readline())["error"]["code"] == "request_limit"
        extra.sendall(b'{"op": "ping"}\n')  # the daemon stopped sending, not reading
        assert reader.read() == b""  # then EOF: nothing more is served on it
        extra.close()
    finally:
        for c in held:
            c.close()


def test_idle_connections_are_closed(served: dict[str, Any]) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(served["sock"]))
    s.sendall(b'{"op": "pi')  # half a line, then silence
    t0 = time.monotonic()
    assert s.recv(10) == b""  # the daemon closed it
    assert time.monotonic() - t0 < 5
    s.close()
    assert call(served["sock"], "ping")["ok"]


def test_the_daemon_runs_without_core_dumps(served: dict[str, Any]) -> None:
    limits = Path(f"/proc/{served['proc'].pid}/limits").read_text()
    line = next(ln for ln in limits.splitlines() if ln.startswith("Max core file size"))
    assert line.split()[4:6] == ["0", "0"]


def test_accept_loop_backs_off_on_emfile(tmp_path: Path) -> None:
    import resource

    server = ServeServer(tmp_path / "s.sock", engine=None,  # type: ignore[arg-type]
                         limits=ServeLimits(accept_backoff_s=0.05))
    try:
        def no_fds() -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        class NoFds:  # the listening socket, out of descriptors
            accept = staticmethod(no_fds)

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        real = server.socket
        server.socket = NoFds()  # type: ignore[assignment]
        cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        t0 = time.monotonic()
        calls = 0
        while time.monotonic() - t0 < 1.0:
            server._handle_request_noblock()
            calls += 1
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0
        assert calls < 20 and cpu < 0.5
    finally:
        server.socket = real
        server.server_close()


def test_bad_limits_argument_is_refused() -> None:
    with pytest.raises(errors.UsageError):
        serve_limits({"max_connections": -1})
    assert serve_limits({"max_connections": 2}).max_connections == 2
