"""``fleet lab up --farm N``: the lab's devices behind N farm hosts, with the servers a
farm needs (Redis, PostgreSQL) written into the home's ``config.toml``.

Services (:func:`start_services`, before any device is registered): a private Redis
(:mod:`fleet.lab.redis`, a Unix socket only) and a private PostgreSQL cluster
(:mod:`fleet.lab.pg`); ``config.toml`` gets ``registry.url``, ``broker.url`` and
``broker.deadline_s``, and the registry there is migrated, so every later ``fleet``
command, and every worker, uses them with no environment set. A registry the home had
before (SQLite) is left as it was, unused while the lab runs.

Farm host ``farmI`` (:func:`up`, after the devices are up and enrolled):

- network namespace ``fleetlab-<tag>-farmI`` (loopback only: the broker and the
  registry are reached through their Unix sockets, which a network namespace does not
  hide);
- the lab's devices are spread over the hosts round-robin, by name, and each one's
  record gets ``via = farmI``;
- an IoT board's link (the root-side end of its veth, with its address) moves into the
  host's namespace: from then on only that host reaches the board;
- its own adb server (``adb -P PORT`` inside the namespace, its own key) connected to
  its phones through the supervisor's relays, and its own usbmuxd socket (a relay to the
  lab's one emulated usbmuxd, so it lists every lab iPhone; a real host's lists only its
  own);
- a supervisor process (:mod:`fleet.lab.farm_supervisor`) that runs ``fleet worker
  --host farmI`` in the namespace and restarts it when it dies.

:func:`down` undoes it by name (supervisors and workers stopped, links moved back to the
root namespace with their addresses, namespaces deleted, ``via`` cleared);
:func:`stop_services` stops the servers and takes their keys out of ``config.toml``.
:func:`hold` / :func:`release` stop a host's worker and keep it stopped (a host down;
``fleet lab fault farmI --down|--up``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fleet import config
from fleet.core import errors
from fleet.home import FleetHome
from fleet.lab import netns
from fleet.lab import redis as lab_redis
from fleet.lab.base import lab_tag, load_state, save_state

__all__ = ["KIND", "down", "hold", "hosts", "release", "services_running", "start_services",
           "status", "stop_services", "up", "worker_pid"]

KIND = "farm"
DEFAULT_DEADLINE_S = 120.0
_READY_S = 60.0


def _dir(home: FleetHome) -> Path:
    return home.lab_dir / KIND


def _host_dir(home: FleetHome, host: str) -> Path:
    return _dir(home) / host


# -- services -------------------------------------------------------------------------------
def start_services(home: FleetHome, *, deadline_s: float = DEFAULT_DEADLINE_S) -> dict[str, Any]:
    """Start Redis and PostgreSQL (or find them running), write them into config.toml
    and migrate the registry there. Returns the lab state's ``services`` record."""
    from fleet.lab import pg
    from fleet.registry import Registry

    home.ensure()
    state = load_state(home, KIND)
    svc = dict(state.get("services") or {})
    srv = lab_redis.start(Path(svc.get("redis_root") or _dir(home) / "redis"))
    svc["redis_root"] = str(srv.root)
    if svc.get("pg_root"):
        cluster = pg.load(Path(svc["pg_root"]))
    else:
        cluster = pg.create(pg.private_root(_dir(home) / "pg", prefix="fleetlab-pg-"))
        svc["pg_root"] = str(cluster.root)
    state["services"] = svc
    save_state(home, KIND, state)
    pg.start(cluster)
    svc.update(registry_url=cluster.url(), broker_url=srv.url, deadline_s=deadline_s)
    previous = config.load(home.path)
    svc.setdefault("previous", {k: previous.get(k) for k in
                                ("registry.url", "broker.url", "broker.deadline_s")})
    state["services"] = svc
    save_state(home, KIND, state)
    config.update(home.path, {"registry.url": svc["registry_url"],
                              "broker.url": svc["broker_url"],
                              "broker.deadline_s": float(deadline_s)})
    Registry.init(FleetHome(home.path)).close()  # migrate PostgreSQL to head
    return svc


def services_running(home: FleetHome) -> bool:
    svc = load_state(home, KIND).get("services") or {}
    root = svc.get("redis_root")
    return root is not None and lab_redis.RedisServer(Path(str(root))).ping()


def stop_services(home: FleetHome) -> list[str]:
    """Stop the lab's Redis and PostgreSQL, remove them, and put config.toml back as it
    was before the lab. Returns what was stopped."""
    from fleet.lab import pg

    state = load_state(home, KIND)
    svc = state.pop("services", None) or {}
    stopped = []
    if svc.get("redis_root") and lab_redis.stop(Path(str(svc["redis_root"]))):
        stopped.append("redis")
    if svc.get("pg_root"):
        with contextlib.suppress(errors.LabError):
            pg.destroy(pg.load(Path(svc["pg_root"])))
            stopped.append("postgresql")
    if svc:
        config.update(home.path, dict(svc.get("previous") or {
            "registry.url": None, "broker.url": None, "broker.deadline_s": None}))
    save_state(home, KIND, state)
    return stopped


# -- hosts ----------------------------------------------------------------------------------
def _adb_env(hdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ANDROID_SDK_HOME", "ANDROID_USER_HOME", "ADB_VENDOR_KEYS",
                        "ANDROID_SERIAL", "ANDROID_ADB_SERVER_PORT")}
    (hdir / "adb-home").mkdir(parents=True, exist_ok=True, mode=0o700)
    env.update(HOME=str(hdir / "adb-home"), TMPDIR=str(hdir))
    return env


def _adb(host: dict[str, Any], *args: str, timeout: float = 30.0
         ) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("adb")
    if exe is None:
        raise errors.LabError("adb not found (Debian's adb package, see the Makefile)")
    argv = [*netns.nsenter_argv(host["netns"]), exe, "-P", str(host["adb_port"]), *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=_adb_env(Path(host["dir"])), stdin=subprocess.DEVNULL,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise errors.LabError(f"{' '.join(argv)} timed out", argv=argv) from exc


def _move_link(board: dict[str, Any], ns: str | None) -> None:
    """The board's root-side veth end into namespace ``ns`` (None: back to the root
    namespace), with its address, up."""
    ifname, addr = board["host_if"], f"{board['host_addr']}/{board['prefix']}"
    if ns is None:
        src = board.get("farm_netns")
        if not src or not netns.netns_exists(src):
            return
        netns.sh(["ip", "-n", src, "link", "set", "dev", ifname, "netns", "1"], check=False)
        netns.sh(["ip", "addr", "add", addr, "dev", ifname], check=False)
        netns.sh(["ip", "link", "set", ifname, "up"], check=False)
        return
    netns.sh(["ip", "link", "set", "dev", ifname, "netns", ns])
    netns.sh(["ip", "-n", ns, "addr", "add", addr, "dev", ifname])
    netns.sh(["ip", "-n", ns, "link", "set", ifname, "up"])


def _worker_argv(home: FleetHome, host: str, concurrency: int) -> list[str]:
    return [sys.executable, "-m", "fleet", "--home", str(home.path), "worker", "--host", host,
            "--concurrency", str(concurrency)]


def _worker_env(usbmux_socket: str, adb_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLEET_DB", "FLEET_BROKER", "FLEET_ARTIFACTS", "FLEET_HOME",
                        "FLEET_TEST_KILL_AT")}
    env.update(FLEET_USBMUX_SOCKET=usbmux_socket, FLEET_ADB_PORT=str(adb_port),
               PYTHONUNBUFFERED="1", NO_COLOR="1")
    return env


def _start_supervisor(home: FleetHome, host: dict[str, Any]) -> int:
    hdir = Path(host["dir"])
    (hdir / "supervisor.ready").unlink(missing_ok=True)
    spec_path = hdir / "spec.json"
    spec_path.write_text(json.dumps(host["spec"], indent=2))
    log = open(hdir / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child
    with log:
        proc = subprocess.Popen([sys.executable, "-m", "fleet.lab.farm_supervisor",
                                 str(spec_path)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
    deadline = time.monotonic() + 20
    while not (hdir / "supervisor.ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise errors.LabError(f"farm host {host['name']}: its supervisor did not start; "
                                  f"see {hdir / 'supervisor.log'}", host=host["name"])
        time.sleep(0.05)
    return proc.pid


def _usbmux_path(home: FleetHome, hdir: Path) -> Path:
    path = hdir / "usbmuxd.sock"
    if len(str(path)) > 100:
        path = Path("/tmp") / f"fleetlab-{lab_tag(home)}-{hdir.name}-usbmuxd.sock"
    return path


def _lab_devices(home: FleetHome) -> list[dict[str, Any]]:
    """Every lab device with what a farm host needs to reach it, sorted by name."""
    out: list[dict[str, Any]] = []
    for name, b in load_state(home, "iot").items():
        out.append({"name": name, "kind": "iot", "board": b})
    android = load_state(home, "android")
    for name, p in (android.get("phones") or {}).items():
        out.append({"name": name, "kind": "android", "port": int(p["port"]),
                    "adb_port": int(android.get("adb_port") or 15037)})
    ios = load_state(home, "ios")
    for p in ios.get("phones") or []:
        out.append({"name": p["name"], "kind": "ios", "socket": ios.get("socket")})
    return sorted(out, key=lambda d: d["name"])


def up(home: FleetHome, count: int, *, concurrency: int = 4) -> list[dict[str, Any]]:
    """Put every lab device behind ``count`` farm hosts (see the module docstring);
    returns one record per host. The services must run (:func:`start_services`)."""
    from fleet.registry import Registry

    if not 1 <= count <= 16:
        raise errors.UsageError(f"--farm takes 1..16 hosts, not {count}")
    netns.require_root_and_tools("ip", "nsenter")
    if not services_running(home):
        raise errors.LabError("the farm's services are not running (start_services first)")
    state = load_state(home, KIND)
    if state.get("hosts"):
        raise errors.LabError("the lab already has farm hosts: `fleet lab down` first")
    devices = _lab_devices(home)
    tag = lab_tag(home)
    hosts: dict[str, dict[str, Any]] = {}
    for i in range(count):
        name = f"farm{i}"
        hdir = _host_dir(home, name)
        hdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        hosts[name] = {"name": name, "netns": f"fleetlab-{tag}-{name}", "dir": str(hdir),
                       "devices": [], "boards": [], "adb_port": 15037,
                       "usbmux_socket": str(_usbmux_path(home, hdir))}
    for i, dev in enumerate(devices):
        host = hosts[f"farm{i % count}"]
        host["devices"].append(dev["name"])
        if dev["kind"] == "android":
            host["adb_port"] = dev["adb_port"]
    state["hosts"] = hosts
    save_state(home, KIND, state)  # from here on, down() can undo what follows
    boards = load_state(home, "iot")
    for host in hosts.values():
        netns.netns_add(host["netns"])
        netns.sh(["ip", "-n", host["netns"], "link", "set", "lo", "up"])
        mine = [d for d in devices if d["name"] in host["devices"]]
        for dev in mine:
            if dev["kind"] == "iot":
                _move_link(dev["board"], host["netns"])
                host["boards"].append(dev["name"])
                boards[dev["name"]]["farm_netns"] = host["netns"]
        save_state(home, "iot", boards)
        lab_ios = next((d["socket"] for d in devices if d["kind"] == "ios"), None)
        host["spec"] = {
            "dir": host["dir"], "netns_path": str(netns.NETNS_DIR / host["netns"]),
            "adb_ports": [d["port"] for d in mine if d["kind"] == "android"],
            "usbmux_socket": host["usbmux_socket"], "lab_usbmux_socket": lab_ios,
            "argv": _worker_argv(home, host["name"], concurrency),
            "env": _worker_env(host["usbmux_socket"], host["adb_port"])}
        host["supervisor_pid"] = _start_supervisor(home, host)
        save_state(home, KIND, state)
        _connect_phones(host, [d for d in mine if d["kind"] == "android"])
    reg = Registry.open(FleetHome(home.path))
    try:
        for host in hosts.values():
            for name in host["devices"]:
                uri = reg.get_device(name).uri
                fields: dict[str, Any] = {"via": host["name"]}
                if "usbmux=" in uri:  # the host's own usbmuxd (FLEET_USBMUX_SOCKET)
                    fields["uri"] = _without_query(uri, "usbmux")
                reg.update_device(name, **fields)
        _wait_live(reg, home, list(hosts))
    finally:
        reg.close()
    return [_public(h) for h in hosts.values()]


def _without_query(uri: str, key: str) -> str:
    base, _, query = uri.partition("?")
    kept = [p for p in query.split("&") if p and not p.startswith(f"{key}=")]
    return base + ("?" + "&".join(kept) if kept else "")


def _connect_phones(host: dict[str, Any], phones: list[dict[str, Any]]) -> None:
    if not phones:
        return
    res = _adb(host, "start-server")
    if res.returncode != 0:
        raise errors.LabError(f"farm host {host['name']}: adb server: {res.stderr.strip()}")
    for phone in phones:
        serial = f"127.0.0.1:{phone['port']}"
        deadline = time.monotonic() + 20
        while True:
            _adb(host, "connect", serial)
            states = _adb(host, "devices").stdout
            if f"{serial}\tdevice" in states:
                break
            if time.monotonic() > deadline:
                raise errors.LabError(f"farm host {host['name']}: {phone['name']} did not "
                                      f"come up in its adb server ({states.strip()})")
            time.sleep(0.2)


def _wait_live(reg: Any, home: FleetHome, names: list[str]) -> None:
    from fleet.worker import roster
    from fleet.worker.settings import settings_for

    stale = settings_for(FleetHome(home.path)).stale_s
    deadline = time.monotonic() + _READY_S
    while True:
        live = roster.host_liveness(reg, stale_s=stale)
        if all(n in live for n in names):
            return
        if time.monotonic() > deadline:
            missing = [n for n in names if n not in live]
            raise errors.LabError(f"farm host(s) {', '.join(missing)}: no worker came up in "
                                  f"{_READY_S:.0f}s; see {_dir(home)}/<host>/worker.log")
        time.sleep(0.2)


def _public(host: dict[str, Any]) -> dict[str, Any]:
    return {k: host[k] for k in ("name", "netns", "devices", "boards", "adb_port",
                                 "usbmux_socket", "dir") if k in host}


def _signal(home: FleetHome, host: str, sig: signal.Signals) -> dict[str, Any]:
    hosts = load_state(home, KIND).get("hosts") or {}
    if host not in hosts:
        raise errors.NotFoundError(f"no lab farm host {host!r} (hosts: "
                                   f"{', '.join(sorted(hosts)) or 'none'})", host=host)
    rec: dict[str, Any] = hosts[host]
    pid = rec.get("supervisor_pid")
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), sig)
    return rec


def hosts(home: FleetHome) -> list[str]:
    """The names of this home's lab farm hosts."""
    return sorted(load_state(home, KIND).get("hosts") or {})


def worker_pid(home: FleetHome, host: str) -> int | None:
    """The pid of ``host``'s running worker, None while it is stopped."""
    try:
        return int((_host_dir(home, host) / "worker.pid").read_text())
    except (OSError, ValueError):
        return None


def hold(home: FleetHome, host: str, *, timeout_s: float = 30.0) -> None:
    """Stop ``host``'s worker and keep it stopped (the host is down for the fleet)."""
    _signal(home, host, signal.SIGUSR1)
    deadline = time.monotonic() + timeout_s
    while worker_pid(home, host) is not None:
        if time.monotonic() > deadline:
            raise errors.LabError(f"farm host {host}: its worker did not stop")
        time.sleep(0.05)


def release(home: FleetHome, host: str) -> None:
    """Let ``host``'s supervisor start its worker again."""
    _signal(home, host, signal.SIGUSR2)


def _stop_supervisor(rec: dict[str, Any]) -> None:
    pid = rec.get("supervisor_pid")
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid), signal.SIGTERM)
    deadline = time.monotonic() + 25
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(int(pid), os.WNOHANG)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid), signal.SIGKILL)


def down(home: FleetHome) -> list[str]:
    """Remove every farm host this home's lab made; returns their names."""
    from fleet.registry import Registry

    state = load_state(home, KIND)
    hosts: dict[str, dict[str, Any]] = state.get("hosts") or {}
    boards = load_state(home, "iot")
    for rec in hosts.values():
        _stop_supervisor(rec)
        if netns.netns_exists(rec["netns"]):
            netns.kill_netns_processes(rec["netns"])  # the adb server, a stray worker
        for name in rec.get("boards", []):
            if name in boards:
                _move_link(boards[name], None)
                boards[name].pop("farm_netns", None)
        netns.netns_delete(rec["netns"])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rec["usbmux_socket"])
        shutil.rmtree(rec["dir"], ignore_errors=True)
    if boards:
        save_state(home, "iot", boards)
    if hosts and services_running(home):
        with contextlib.suppress(errors.FleetError):
            reg = Registry.open(FleetHome(home.path))
            try:
                for rec in hosts.values():
                    for name in rec["devices"]:
                        with contextlib.suppress(errors.NotFoundError):
                            reg.update_device(name, via=None)
            finally:
                reg.close()
    state.pop("hosts", None)
    save_state(home, KIND, state)
    return sorted(hosts)


def status(home: FleetHome) -> list[dict[str, Any]]:
    rows = []
    for name, rec in sorted((load_state(home, KIND).get("hosts") or {}).items()):
        pid = rec.get("supervisor_pid")
        rows.append({"name": name, "kind": KIND, "netns": rec["netns"],
                     "supervisor": "running" if pid and Path(f"/proc/{pid}").exists()
                     else "stopped", "worker_pid": worker_pid(home, name),
                     "state": "worker running" if worker_pid(home, name) else "worker stopped",
                     "devices": rec["devices"], "address": rec["netns"],
                     "link": "", "faults": {}})
    return rows
