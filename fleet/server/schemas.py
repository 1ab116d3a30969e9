"""Request and answer bodies of the device API (pydantic; they make ``/openapi.json``).

Bounds on every string and list keep a hostile body small before any work is done."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ChallengeIn", "ChallengeOut", "CheckinIn", "CheckinOut", "EnrollIn", "EnrollOut",
           "ErrorOut", "ProgressIn", "ReportIn", "ReportOut", "TokenIn", "TokenOut"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnrollIn(_In):
    token: str = Field(min_length=1, max_length=200,
                       description="the one-time token `fleet device add pull://NAME` printed")
    public_key: str = Field(min_length=1, max_length=2000,
                            description="the device's P-256 public key (SPKI PEM)")
    agent_version: str | None = Field(default=None, max_length=100)


class EnrollOut(BaseModel):
    device: str = Field(description="the device's name in the registry")
    fingerprint: str
    trust: list[dict[str, Any]] = Field(description="the root of trust chain, v1 first")
    poll_s: int


class ChallengeIn(_In):
    fingerprint: str = Field(min_length=1, max_length=100)


class ChallengeOut(BaseModel):
    challenge: str
    expires_in: int


class TokenIn(_In):
    challenge: str = Field(min_length=1, max_length=2048)
    signature: str = Field(min_length=1, max_length=400,
                           description="base64 DER ECDSA-SHA256 over "
                                       "'fleet.pull/1 auth\\n' + challenge")


class TokenOut(BaseModel):
    token: str
    expires_in: int
    poll_s: int


class ProgressIn(_In):
    name: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=1, le=2**62)
    state: str = Field(pattern="^(downloading|staged|activating|skipped|failed|rolled_back)$")
    deployment: str | None = Field(default=None, max_length=64)
    error_code: str | None = Field(default=None, max_length=100)
    error_message: str | None = Field(default=None, max_length=2000)


class CheckinIn(_In):
    installed: dict[str, dict[str, Any]] = Field(
        default_factory=dict, max_length=256,
        description="the agent's status.installed: name -> {active, previous, versions}")
    disk_free: int | None = Field(default=None, ge=0, le=2**62)
    probe_digest: str | None = Field(default=None, max_length=128)
    agent_version: str | None = Field(default=None, max_length=100)
    root_version: int | None = Field(default=None, ge=0, le=2**31)
    progress: list[ProgressIn] = Field(default_factory=list, max_length=64)


class CheckinOut(BaseModel):
    desired: dict[str, Any] = Field(description="{state, signature}: docs/device-api.md")
    trust: list[dict[str, Any]] | None = Field(
        default=None, description="the root chain, when the device holds an older root")
    poll_s: int
    server_time: str


class ReportIn(_In):
    report: str = Field(min_length=2, max_length=4 << 20,
                        description="the report as JSON text, exactly as signed")
    signature: str = Field(min_length=1, max_length=400,
                           description="base64 DER ECDSA-SHA256 over "
                                       "'fleet.pull/1 report\\n' + report")


class ReportOut(BaseModel):
    recorded: bool
    deployment: str | None


class ErrorOut(BaseModel):
    error: dict[str, Any]
