"""The registry's front door: open it, and query or change devices and groups.

Deployments, reports and findings have their own module (:mod:`fleet.registry.history`);
both work through :class:`Registry`, which owns the engine and sessions. Every session
maps storage faults to registry errors (:mod:`fleet.registry.faults`): a read-only, full
or locked-too-long registry raises :class:`RegistryReadOnlyError`,
:class:`RegistryFullError` or :class:`RegistryBusyError` with the transaction rolled back,
never a driver exception.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, col, select

from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry.db import (
    READS_ONLY,
    check_schema,
    make_engine,
    migrate,
    open_read_only,
    serialize,
)
from fleet.registry.faults import map_registry_errors, os_error_for, sqlite_path
from fleet.registry.models import Device, Group, Membership
from fleet.registry.status import DeviceState, answered, device_status, says_about_device
from fleet.registry.types import utcnow
from fleet.transports.uri import parse_uri

__all__ = ["IN_CHUNK", "Registry", "chunked", "note_contact"]

#: values per SQL ``IN (...)`` list (SQLite allows 32,766 bound parameters per statement)
IN_CHUNK = 10_000


def chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def note_contact(dev: Device, error: BaseException | None = None, *,
                 agent_version: str | None = None, seen: datetime | None = None
                 ) -> DeviceState:
    """:meth:`Registry.record_contact` on a row the caller holds locked (in memory;
    the caller's transaction writes it)."""
    cls = type(error) if error is not None else None
    if answered(cls):
        dev.last_seen = seen or utcnow()
    state = device_status(cls, dev.last_seen, previous=dev.status)
    if cls is None:
        dev.last_error = None
    elif says_about_device(cls):
        dev.last_error = str(getattr(error, "code", cls.__name__))
    dev.status = state.value
    if agent_version:
        dev.agent_version = agent_version
    return state


class Registry:
    def __init__(self, engine: Engine, url: str, *, read_only: bool = False) -> None:
        self.engine = engine
        self.url = url
        #: opened from a read-only mount: reads work, any write raises RegistryReadOnlyError
        self.read_only = read_only
        self._reader = engine.execution_options(**{READS_ONLY: True})
        #: SQLite: this process's writers (the fan-out's threads) queue here, in order,
        #: rather than in SQLite's busy handler, which sleeps between retries (~10 % more
        #: transactions/s from 8 threads). Other processes still queue on BEGIN
        #: IMMEDIATE. Reentrant: a write inside a write is the same thread's.
        self._writers: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if engine.dialect.name == "sqlite"
            else contextlib.nullcontext())

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, home: FleetHome) -> Registry:
        """Open an initialised registry; refuse a missing, older or newer schema.

        Raises NotInitializedError, SchemaTooNewError, RegistryError (older schema), or the
        registry error of a storage fault (RegistryBusyError, RegistryIOError, ...)."""
        url = home.db_url
        path = sqlite_path(url)
        if path is not None and not path.exists():  # do not create an empty file
            raise errors.NotInitializedError(
                f"no fleet registry in {home.path}: run `fleet init` first", home=str(home.path))
        read_only = open_read_only(url)
        engine = make_engine(url, read_only=read_only)
        check_schema(engine, url)
        return cls(engine, url, read_only=read_only)

    @classmethod
    def init(cls, home: FleetHome) -> Registry:
        """Create the home and migrate the registry to head (idempotent). Raises
        RegistryReadOnlyError / RegistryFullError when the home cannot be written."""
        try:
            home.ensure()
        except OSError as exc:
            mapped = os_error_for(exc, home.path)
            if mapped is None:
                raise
            raise mapped from exc
        migrate(home.db_url)
        engine = make_engine(home.db_url)
        check_schema(engine, home.db_url)
        return cls(engine, home.db_url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back when it raises.
        Storage faults raise registry errors (see the module docstring)."""
        with self._writers, map_registry_errors(self.url), \
                Session(self.engine, expire_on_commit=False) as s:
            try:
                yield s
                s.commit()
            except BaseException:
                with contextlib.suppress(DBAPIError):  # keep the first error, not this one
                    s.rollback()
                raise

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A transaction that only reads: it does not take the write lock, so it goes on
        while another command writes (SQLite WAL). Storage faults raise registry errors;
        a write in it fails (SQLITE_BUSY) rather than queueing: use :meth:`session`."""
        with map_registry_errors(self.url), Session(self._reader, expire_on_commit=False) as s:
            yield s  # closing ends the transaction and keeps the loaded rows usable

    def close(self) -> None:
        self.engine.dispose()

    # -- devices ------------------------------------------------------------------------
    def add_device(self, name: str, uri: str, *, groups: Sequence[str] = (),
                   tags: dict[str, str] | None = None, platform: str | None = None,
                   agent_root: str | None = None, agent_cmd: list[str] | None = None,
                   public_key: str | None = None, fingerprint: str | None = None,
                   create_groups: bool = False) -> Device:
        parsed = parse_uri(uri)
        if not name or any(c.isspace() for c in name):
            raise errors.UsageError(f"invalid device name {name!r}")
        with self.session() as s:
            if s.exec(select(Device).where(Device.name == name)).first():
                raise errors.DuplicateError(f"a device named {name!r} already exists", name=name)
            group_rows = [self._group(s, g, create=create_groups) for g in groups]
            dev = Device(name=name, uri=uri, platform=platform or parsed.platform,
                         tags=dict(tags or {}), agent_root=agent_root, agent_cmd=agent_cmd,
                         public_key=public_key, fingerprint=fingerprint,
                         status="enrolled" if public_key else "registered")
            s.add(dev)
            s.flush()
            for g in group_rows:
                s.add(Membership(group_id=g.id, device_id=dev.id))
            try:
                s.flush()
            except IntegrityError as exc:
                raise errors.DuplicateError(f"a device named {name!r} already exists",
                                            name=name) from exc
            return dev

    def update_device(self, name: str, **fields: Any) -> Device:
        with self.session() as s:
            dev = self._device(s, name, lock=True)
            for key, value in fields.items():
                if not hasattr(dev, key):
                    raise AttributeError(key)
                setattr(dev, key, value)
            s.add(dev)
            return dev

    def record_contact(self, name: str, error: BaseException | None = None, *,
                       agent_version: str | None = None, seen: datetime | None = None
                       ) -> DeviceState:
        """Record how a contact with device ``name`` ended (``error`` None: it went well)
        and return its new status, decided by :func:`fleet.registry.status.device_status`.
        The one writer of ``devices.status``; errors that say nothing about the device
        (registry, usage, plan) leave it as it was. Raises NotFoundError."""
        with self.session() as s:
            dev = self._device(s, name, lock=True)  # read-modify-write: no lost update
            state = note_contact(dev, error, agent_version=agent_version, seen=seen)
            s.add(dev)
            return state

    def touch_device(self, name: str, *, status: str | None = None,
                     agent_version: str | None = None, seen: datetime | None = None) -> None:
        """A contact that went well (:meth:`record_contact` with no error); ``status``
        overrides the decided status (kept for callers that set it themselves)."""
        self.record_contact(name, None, agent_version=agent_version, seen=seen)
        if status:
            self.update_device(name, status=DeviceState(status).value)

    def get_device(self, name: str) -> Device:
        with self.reading() as s:
            return self._device(s, name)

    def list_devices(self, group: str | None = None) -> list[Device]:
        with self.reading() as s:
            if group is None:
                return list(s.exec(select(Device).order_by(col(Device.name))).all())
            g = self._group(s, group)
            stmt = (select(Device).join(Membership, col(Membership.device_id) == col(Device.id))
                    .where(Membership.group_id == g.id).order_by(col(Device.name)))
            return list(s.exec(stmt).all())

    def remove_device(self, name: str) -> None:
        with self.session() as s:
            dev = self._device(s, name)
            s.execute(delete(Membership).where(col(Membership.device_id) == dev.id))
            s.delete(dev)

    def groups_of(self, name: str) -> list[str]:
        with self.reading() as s:
            dev = self._device(s, name)
            stmt = (select(Group.name).join(Membership, col(Membership.group_id) == col(Group.id))
                    .where(Membership.device_id == dev.id).order_by(col(Group.name)))
            return list(s.exec(stmt).all())

    # -- groups -------------------------------------------------------------------------
    def create_group(self, name: str, description: str = "") -> Group:
        if not name or any(c.isspace() for c in name):
            raise errors.UsageError(f"invalid group name {name!r}")
        with self.session() as s:
            serialize(s, f"group:{name}")
            if s.exec(select(Group).where(Group.name == name)).first():
                raise errors.DuplicateError(f"a group named {name!r} already exists", name=name)
            g = Group(name=name, description=description)
            s.add(g)
            try:
                s.flush()
            except IntegrityError as exc:
                raise errors.DuplicateError(f"a group named {name!r} already exists",
                                            name=name) from exc
            return g

    def ensure_group(self, name: str) -> Group:
        with self.session() as s:
            return self._group(s, name, create=True)

    def list_groups(self) -> list[tuple[Group, int]]:
        """Every group and its number of devices (one query)."""
        with self.reading() as s:
            stmt = (select(Group, func.count(col(Membership.device_id)))
                    .outerjoin(Membership, col(Membership.group_id) == col(Group.id))
                    .group_by(col(Group.id)).order_by(col(Group.name)))
            return [(g, int(n)) for g, n in s.exec(stmt).all()]

    def groups_by_device(self) -> dict[str, list[str]]:
        """Device name -> its groups' names, sorted, for every device (one query)."""
        with self.reading() as s:
            stmt = (select(Device.name, Group.name)
                    .join(Membership, col(Membership.device_id) == col(Device.id))
                    .join(Group, col(Group.id) == col(Membership.group_id))
                    .order_by(col(Device.name), col(Group.name)))
            out: dict[str, list[str]] = {}
            for dev_name, group_name in s.exec(stmt).all():
                out.setdefault(dev_name, []).append(group_name)
            return out

    def get_group(self, name: str) -> Group:
        with self.reading() as s:
            return self._group(s, name)

    def _members(self, s: Session, group: Group, names: Sequence[str]
                 ) -> tuple[dict[str, uuid.UUID], set[uuid.UUID]]:
        """(name -> id of each named device, ids among them already in ``group``), in a
        fixed number of queries (IN lists of :data:`IN_CHUNK`); NotFoundError for the
        first unknown name."""
        ids: dict[str, uuid.UUID] = {}
        inside: set[uuid.UUID] = set()
        for part in chunked(list(dict.fromkeys(names)), IN_CHUNK):
            ids.update(s.exec(select(Device.name, Device.id)
                              .where(col(Device.name).in_(part))).all())
            inside.update(s.exec(select(Membership.device_id).join(
                Device, col(Device.id) == col(Membership.device_id)).where(
                Membership.group_id == group.id, col(Device.name).in_(part))).all())
        for n in names:
            if n not in ids:
                raise errors.NotFoundError(f"no device named {n!r}", kind="device", name=n)
        return ids, inside

    def add_to_group(self, group: str, device_names: Iterable[str]) -> list[str]:
        """Add devices to a group; returns the names newly added (existing ones are kept).
        The group's row is locked meanwhile: two commands adding the same device queue."""
        names = list(dict.fromkeys(device_names))
        with self.session() as s:
            g = self._group(s, group, lock=True)
            ids, inside = self._members(s, g, names)
            added = [n for n in names if ids[n] not in inside]
            if added:
                now = utcnow()
                s.execute(insert(Membership), [{"group_id": g.id, "device_id": ids[n],
                                                "added_at": now} for n in added])
        return added

    def remove_from_group(self, group: str, device_names: Iterable[str]) -> list[str]:
        names = list(dict.fromkeys(device_names))
        with self.session() as s:
            g = self._group(s, group, lock=True)
            ids, inside = self._members(s, g, names)
            removed = [n for n in names if ids[n] in inside]
            for part in chunked([ids[n] for n in removed], IN_CHUNK):
                s.execute(delete(Membership).where(col(Membership.group_id) == g.id,
                                                   col(Membership.device_id).in_(part)))
        return removed

    def delete_group(self, name: str) -> None:
        with self.session() as s:
            g = self._group(s, name, lock=True)
            s.execute(delete(Membership).where(col(Membership.group_id) == g.id))
            s.delete(g)

    def resolve_targets(self, groups: Iterable[str] = (), devices: Iterable[str] = ()
                        ) -> list[Device]:
        """Union of the named groups' members and the named devices, by name, no repeats
        (two queries per group or IN list, whatever the fleet size). NotFoundError for an
        unknown group or device."""
        seen: dict[str, Device] = {}
        for g in dict.fromkeys(groups):
            for dev in self.list_devices(g):
                seen.setdefault(dev.name, dev)
        names = [n for n in dict.fromkeys(devices) if n not in seen]
        with self.reading() as s:
            for part in chunked(names, IN_CHUNK):
                for dev in s.exec(select(Device).where(col(Device.name).in_(part))).all():
                    seen.setdefault(dev.name, dev)
        for n in names:
            if n not in seen:
                raise errors.NotFoundError(f"no device named {n!r}", kind="device", name=n)
        return [seen[k] for k in sorted(seen)]

    # -- internals ----------------------------------------------------------------------
    @staticmethod
    def _device(s: Session, name: str, *, lock: bool = False) -> Device:
        """The device row; ``lock``: ``FOR UPDATE`` (PostgreSQL: writers of this row
        queue until this transaction ends; SQLite's BEGIN IMMEDIATE already did that)."""
        stmt = select(Device).where(Device.name == name)
        dev = s.exec(stmt.with_for_update() if lock else stmt).first()
        if dev is None:
            raise errors.NotFoundError(f"no device named {name!r}", kind="device", name=name)
        return dev

    @staticmethod
    def _group(s: Session, name: str, *, create: bool = False, lock: bool = False) -> Group:
        """The group row; ``create`` makes it when missing (serialised on its name, so two
        commands creating one group make one); ``lock``: ``FOR UPDATE``."""
        if create:
            serialize(s, f"group:{name}")
        stmt = select(Group).where(Group.name == name)
        g = s.exec(stmt.with_for_update() if lock else stmt).first()
        if g is None:
            if not create:
                raise errors.NotFoundError(f"no group named {name!r}", kind="group", name=name)
            g = Group(name=name)
            s.add(g)
            s.flush()
        return g
