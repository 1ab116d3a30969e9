"""The registry's front door: open it, and query or change devices and groups.

Deployments, reports and findings have their own module (:mod:`fleet.registry.history`);
both work through :class:`Registry`, which owns the engine and sessions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry.db import check_schema, make_engine, migrate
from fleet.registry.models import Device, Group, Membership
from fleet.transports.uri import parse_uri

__all__ = ["Registry"]


class Registry:
    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, home: FleetHome) -> Registry:
        """Open an initialised registry; refuse a missing, older or newer schema."""
        url = home.db_url
        if url.startswith("sqlite:///") and not (home.db_override or
                                                  (home.path / "registry.db").exists()):
            raise errors.NotInitializedError(
                f"no fleet registry in {home.path}: run `fleet init` first", home=str(home.path))
        engine = make_engine(url)
        check_schema(engine, url)
        return cls(engine, url)

    @classmethod
    def init(cls, home: FleetHome) -> Registry:
        """Create the home and migrate the registry to head (idempotent)."""
        home.ensure()
        migrate(home.db_url)
        engine = make_engine(home.db_url)
        check_schema(engine, home.db_url)
        return cls(engine, home.db_url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

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
            dev = self._device(s, name)
            for key, value in fields.items():
                if not hasattr(dev, key):
                    raise AttributeError(key)
                setattr(dev, key, value)
            s.add(dev)
            return dev

    def touch_device(self, name: str, *, status: str | None = None,
                     agent_version: str | None = None, seen: datetime | None = None) -> None:
        from fleet.registry.types import utcnow
        with self.session() as s:
            dev = self._device(s, name)
            dev.last_seen = seen or utcnow()
            if status:
                dev.status = status
            if agent_version:
                dev.agent_version = agent_version
            s.add(dev)

    def get_device(self, name: str) -> Device:
        with self.session() as s:
            return self._device(s, name)

    def list_devices(self, group: str | None = None) -> list[Device]:
        with self.session() as s:
            if group is None:
                return list(s.exec(select(Device).order_by(col(Device.name))).all())
            g = self._group(s, group)
            stmt = (select(Device).join(Membership, col(Membership.device_id) == col(Device.id))
                    .where(Membership.group_id == g.id).order_by(col(Device.name)))
            return list(s.exec(stmt).all())

    def remove_device(self, name: str) -> None:
        with self.session() as s:
            dev = self._device(s, name)
            for m in s.exec(select(Membership).where(Membership.device_id == dev.id)).all():
                s.delete(m)
            s.flush()
            s.delete(dev)

    def groups_of(self, name: str) -> list[str]:
        with self.session() as s:
            dev = self._device(s, name)
            stmt = (select(Group.name).join(Membership, col(Membership.group_id) == col(Group.id))
                    .where(Membership.device_id == dev.id).order_by(col(Group.name)))
            return list(s.exec(stmt).all())

    # -- groups -------------------------------------------------------------------------
    def create_group(self, name: str, description: str = "") -> Group:
        if not name or any(c.isspace() for c in name):
            raise errors.UsageError(f"invalid group name {name!r}")
        with self.session() as s:
            if s.exec(select(Group).where(Group.name == name)).first():
                raise errors.DuplicateError(f"a group named {name!r} already exists", name=name)
            g = Group(name=name, description=description)
            s.add(g)
            return g

    def ensure_group(self, name: str) -> Group:
        with self.session() as s:
            return self._group(s, name, create=True)

    def list_groups(self) -> list[tuple[Group, int]]:
        with self.session() as s:
            groups = list(s.exec(select(Group).order_by(col(Group.name))).all())
            out = []
            for g in groups:
                n = len(s.exec(select(Membership).where(Membership.group_id == g.id)).all())
                out.append((g, n))
            return out

    def get_group(self, name: str) -> Group:
        with self.session() as s:
            return self._group(s, name)

    def add_to_group(self, group: str, device_names: Iterable[str]) -> list[str]:
        """Add devices to a group; returns the names newly added (existing ones are kept)."""
        added = []
        with self.session() as s:
            g = self._group(s, group)
            devs = [self._device(s, n) for n in device_names]
            for dev in devs:
                if s.get(Membership, (g.id, dev.id)) is None:
                    s.add(Membership(group_id=g.id, device_id=dev.id))
                    added.append(dev.name)
        return added

    def remove_from_group(self, group: str, device_names: Iterable[str]) -> list[str]:
        removed = []
        with self.session() as s:
            g = self._group(s, group)
            devs = [self._device(s, n) for n in device_names]
            for dev in devs:
                m = s.get(Membership, (g.id, dev.id))
                if m is not None:
                    s.delete(m)
                    removed.append(dev.name)
        return removed

    def delete_group(self, name: str) -> None:
        with self.session() as s:
            g = self._group(s, name)
            for m in s.exec(select(Membership).where(Membership.group_id == g.id)).all():
                s.delete(m)
            s.flush()
            s.delete(g)

    def resolve_targets(self, groups: Iterable[str] = (), devices: Iterable[str] = ()
                        ) -> list[Device]:
        """Union of the named groups' members and the named devices, by name, no repeats."""
        seen: dict[str, Device] = {}
        for g in groups:
            for dev in self.list_devices(g):
                seen.setdefault(dev.name, dev)
        for n in devices:
            dev = self.get_device(n)
            seen.setdefault(dev.name, dev)
        return [seen[k] for k in sorted(seen)]

    # -- internals ----------------------------------------------------------------------
    @staticmethod
    def _device(s: Session, name: str) -> Device:
        dev = s.exec(select(Device).where(Device.name == name)).first()
        if dev is None:
            raise errors.NotFoundError(f"no device named {name!r}", kind="device", name=name)
        return dev

    @staticmethod
    def _group(s: Session, name: str, *, create: bool = False) -> Group:
        g = s.exec(select(Group).where(Group.name == name)).first()
        if g is None:
            if not create:
                raise errors.NotFoundError(f"no group named {name!r}", kind="group", name=name)
            g = Group(name=name)
            s.add(g)
            s.flush()
        return g
