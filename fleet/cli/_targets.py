"""The target options every device-targeting command shares: ``-g``, ``-d``, ``-l``.

``--group/-g G`` and ``--device/-d D`` (both repeatable) name devices; their union is then
filtered by every ``--selector/-l KEY=VALUE[,KEY=VALUE]`` (repeatable, all must hold).
With only ``-l``, the selectors choose among every device. The grammar and the keys are
in ``docs/selectors.md`` (:mod:`fleet.registry.selectors` evaluates them in SQL).

A command declares the three options with :data:`GroupOpt`, :data:`DeviceOpt` and
:data:`SelectorOpt`, builds :class:`Targets` before it opens anything (a malformed
selector is a usage error, exit 2, before any work), then calls :meth:`Targets.resolve`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from fleet.core import errors
from fleet.registry import Device, Registry

__all__ = ["DeviceOpt", "GroupOpt", "SelectorOpt", "Targets", "parse_target_text"]

GroupOpt = Annotated[list[str], typer.Option(
    "--group", "-g", help="The devices of group G (repeat for more groups).")]
DeviceOpt = Annotated[list[str], typer.Option(
    "--device", "-d", help="Device D (repeat for more devices).")]
SelectorOpt = Annotated[list[str], typer.Option(
    "--selector", "-l",
    help="Only devices matching KEY=VALUE[,KEY=VALUE] (all must hold; repeat to add terms): "
         "tags (site=lab), hardware from the last probe (hw.arch=arm64, hw.fp16=true, "
         "hw.ram_gb>=4), platform, model=NAME; also != , KEY and !KEY. Alone: among all "
         "devices. See docs/selectors.md.")]


@dataclass(frozen=True)
class Targets:
    """What the operator named; :meth:`resolve` turns it into devices."""

    groups: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    selectors: tuple[str, ...] = ()
    #: names that are a group if one is so named, else a device (the deprecated ``--for``)
    either: tuple[str, ...] = ()

    @classmethod
    def parse(cls, group: list[str] | None = None, device: list[str] | None = None,
              selector: list[str] | None = None, *, either: list[str] | None = None
              ) -> Targets:
        """Check the selectors' grammar and keys now (UsageError, exit 2)."""
        from fleet.registry.selectors import parse_selectors

        t = cls(tuple(dict.fromkeys(group or ())), tuple(dict.fromkeys(device or ())),
                tuple(selector or ()), tuple(dict.fromkeys(either or ())))
        parse_selectors(t.selectors)
        return t

    @property
    def named(self) -> bool:
        return bool(self.groups or self.devices or self.selectors or self.either)

    def _split_either(self, reg: Registry) -> Targets:
        if not self.either:
            return self
        known = {g.name for g, _ in reg.list_groups()}
        return Targets(tuple(dict.fromkeys([*self.groups,
                                            *(n for n in self.either if n in known)])),
                       tuple(dict.fromkeys([*self.devices,
                                            *(n for n in self.either if n not in known)])),
                       self.selectors)

    def describe(self) -> str:
        """The targets as the command line would name them (``-g a -l site=lab``)."""
        parts = [*(("-g", g) for g in self.groups), *(("-d", d) for d in self.devices),
                 *(("-l", s) for s in self.selectors)]
        return " ".join(f"{flag} {shlex.quote(v)}" for flag, v in parts)

    def to_dict(self) -> dict[str, list[str]]:
        return {"groups": list(self.groups), "devices": list(self.devices),
                "selectors": list(self.selectors)}

    def resolve(self, reg: Registry, *, required: bool = True) -> list[Device]:
        """The devices, sorted by name. ``required`` (commands that act on devices): no
        targets named is a UsageError (exit 2) and a selection of no device a
        NoTargetsError (exit 26); otherwise nothing named means every device and an empty
        selection is an empty list. Unknown groups/devices: NotFoundError (exit 5)."""
        from fleet.registry.selectors import parse_selectors, select_devices

        if required and not self.named:
            raise errors.UsageError("name the targets: --group/-g G, --device/-d D and/or "
                                    "--selector/-l KEY=VALUE")
        if self.either:
            return self._split_either(reg).resolve(reg, required=required)
        devs = select_devices(reg, groups=self.groups, devices=self.devices,
                              terms=parse_selectors(self.selectors))
        if required and not devs:
            raise errors.NoTargetsError(
                f"no device matches {self.describe()} (`fleet device list "
                f"{self.describe()}` shows what they select)", targets=self.to_dict())
        return devs


def parse_target_text(text: str | None) -> dict[str, Any]:
    """A deployment's recorded ``target`` back as lists (``{"groups", "devices",
    "selectors"}``); a target recorded before selectors existed (``a,b``) comes back as
    ``{"text": "a,b"}`` with empty lists."""
    out: dict[str, Any] = {"groups": [], "devices": [], "selectors": []}
    raw = text or ""
    try:
        words = shlex.split(raw)
    except ValueError:
        words = []
    keys = {"-g": "groups", "-d": "devices", "-l": "selectors"}
    if len(words) % 2 or any(w not in keys for w in words[::2]) or not words:
        return out | {"text": raw}
    for flag, value in zip(words[::2], words[1::2], strict=True):
        out[keys[flag]].append(value)
    return out
