"""The API's request and response bodies: the OpenAPI document is generated from these.

Response models allow extra fields (`extra="allow"`): the MI commands behind most endpoints
may grow a field without breaking a client or the document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from acm_module.web.security import MIN_PASSWORD

Role = Literal["viewer", "analyst", "admin"]
SeverityName = Literal["LOW", "HIGH", "CRITICAL"]
NUMBER_MAX = 64  # a raw number as sent (URI forms included); the pool normalises it
_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    """Every error: a stable code and a sentence for people."""

    code: str = Field(description="machine-readable error code")
    message: str


# -- events ---------------------------------------------------------------------------------
class CallEventRequest(BaseModel):
    """The design document's CallEventRequest (§6.2)."""

    model_config = ConfigDict(extra="forbid")

    call_id: str = Field(min_length=1, max_length=256)
    a_number: str = Field(max_length=NUMBER_MAX, description="caller (A), any form the "
                          "decision contract accepts: E.164, national, sip:/tel: URI")
    b_number: str = Field(max_length=NUMBER_MAX, description="called number (B)")
    timestamp: datetime | None = Field(default=None, description="RFC 3339; default: now")
    status: str = Field(default="", max_length=32,
                        description="the call's status as the switch saw it (echoed)")
    source_ip: str | None = Field(default=None, max_length=64,
                                  description="signalling source address (gateway context)")
    trunk: str | None = Field(default=None, max_length=128,
                              description="trunk group (gateway context)")


class DetectionResult(BaseModel):
    """The design document's DetectionResultDto, plus the pool's verdict and reason."""

    detected: bool
    threat_level: str = Field(description="the alert's severity (LOW, HIGH, CRITICAL) when "
                              "the call belongs to one, else NONE")
    distinct_a_numbers: int
    alert_id: str | None = None
    verdict: Literal["allow", "drop"]
    reason: str


class DetectionResponse(BaseModel):
    """The design document's DetectionResponse."""

    status: Literal["accepted"]
    call_id: str
    call_status: str = ""
    detection_result: DetectionResult


# -- auth -----------------------------------------------------------------------------------
class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)
    session: bool = Field(default=False, description="also set the console's session cookie "
                          "(unsafe requests then need the X-CSRF-Token header)")


class LoginResponse(BaseModel):
    token: str = Field(description="bearer token of this login; expires")
    token_type: Literal["bearer"] = "bearer"
    expires_at: str
    user: str
    role: Role
    csrf_token: str | None = Field(default=None, description="with session=true: send it "
                                   "as X-CSRF-Token on POST/PUT/PATCH/DELETE")


class Me(BaseModel):
    user: str
    role: Role
    csrf_token: str | None = None


class UserOut(BaseModel):
    name: str
    role: Role
    created_at: str | None
    disabled: bool


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_ID_PATTERN)
    role: Role
    password: str = Field(min_length=MIN_PASSWORD, max_length=256)


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    password: str | None = Field(default=None, min_length=MIN_PASSWORD, max_length=256)
    disabled: bool | None = None


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=128)


class TokenOut(BaseModel):
    id: str
    user: str
    kind: Literal["api", "session"]
    name: str
    created_at: str | None
    expires_at: str | None


class TokenCreated(TokenOut):
    token: str = Field(description="shown once; only its hash is kept")


class UserList(BaseModel):
    users: list[UserOut]


class TokenList(BaseModel):
    tokens: list[TokenOut]


# -- alerts ---------------------------------------------------------------------------------
class Alert(_Open):
    alert_id: str
    alert_type: str
    severity: str
    b_number: str
    a_numbers: list[str]
    a_number_count: int
    detected_at: str | None
    last_detection_at: str | None
    status: str | None = None
    assigned_to: str | None = None
    ncc_incident_id: str | None = None
    carrier_id: str | None = None


class AlertPage(BaseModel):
    count: int = Field(description="alerts in this page")
    offset: int
    limit: int
    source: str = Field(description="where alerts were read: postgres or store")
    alerts: list[Alert]


class AlertCall(_Open):
    call_id: str
    a_number: str
    at: str | None
    verdict: str
    reason: str
    distinct: int


class AuditEntry(_Open):
    id: str
    at: str | None
    actor: str
    action: str
    target: str
    old: Any = None
    new: Any = None


class AlertDetail(_Open):
    alert: Alert
    calls: list[AlertCall] = Field(description="the episode's calls (at most 500, the newest): "
                                   "QuestDB's call_events merged with the stream")
    calls_source: str = Field(description="where the calls were read: questdb+stream, or "
                              "stream (no questdb_url, or QuestDB failed: see calls_warning)")
    calls_warning: str | None = Field(None, description="why QuestDB was not read")
    timeline: list[dict[str, Any]] = Field(description="calls and lifecycle events by time")
    actions: list[AuditEntry] = Field(description="disconnects, notifications, blocks, NCC "
                                      "ids and lifecycle changes")
    notes: list[str]


class Transition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: str = Field(description="the target status (see TRANSITIONS)", max_length=32)
    note: str | None = Field(default=None, max_length=4000)
    assignee: str | None = Field(default=None, min_length=1, max_length=255)
    whitelist: bool = Field(default=False,
                            description="with FALSE_POSITIVE: also whitelist the B-number")
    reason: str | None = Field(default=None, max_length=255)


class NoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field(min_length=1, max_length=4000)


class Assign(BaseModel):
    model_config = ConfigDict(extra="forbid")

    assignee: str = Field(min_length=1, max_length=255)
    note: str | None = Field(default=None, max_length=4000)


# -- lists ----------------------------------------------------------------------------------
class WhitelistIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b_number: str = Field(min_length=1, max_length=NUMBER_MAX)
    reason: str = Field(min_length=1, max_length=255)
    expires_at: datetime | None = None
    ttl: int | None = Field(default=None, ge=1, le=10 * 365 * 86400)


class CarrierIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=_ID_PATTERN)
    name: str = Field(min_length=1, max_length=200)
    licence: str = Field(min_length=1, max_length=32)
    contact: str | None = Field(default=None, max_length=200)
    cli_rule: Literal["enforce", "monitor", "off"] | None = None


class GatewayIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=_ID_PATTERN)
    carrier: str = Field(pattern=_ID_PATTERN)
    addresses: list[str] = Field(max_length=256)
    trunks: list[str] = Field(default_factory=list, max_length=256)
    rate_limit_cps: int = Field(default=0, ge=0, le=100000)
    rate_window_s: float = Field(default=1.0, ge=0.1, le=60)


class GatewayLimit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cps: int = Field(ge=0, le=100000)
    window: float | None = Field(default=None, ge=0.1, le=60)


class RouteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=_ID_PATTERN)
    carrier: str = Field(pattern=_ID_PATTERN)
    direction: Literal["international", "national"]
    gateway: str | None = Field(default=None, pattern=_ID_PATTERN)
    trunk: str | None = Field(default=None, max_length=128)
    cli_rule: Literal["enforce", "monitor", "off"] | None = None


class Result(_Open):
    """The result of a command (the MI command's result, as JSON)."""


class Health(BaseModel):
    status: Literal["ok"]
