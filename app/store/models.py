"""SQLAlchemy 2 models: the source of truth for edits, deltas, calibrations, jobs, audit and keys.

No torch here: deltas and selector keys are stored as safetensors bytes produced elsewhere.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class Edit(Base):
    __tablename__ = "edits"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    method: Mapped[str] = mapped_column(String(64))
    prompt: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text, nullable=True)
    paraphrases: Mapped[list[str]] = mapped_column(JSON, default=list)
    locality_prompts: Mapped[list[str]] = mapped_column(JSON, default=list)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), index=True)  # active | reverted | superseded
    # fact: serves queries asking the edited relation of its subject | subject: every query about it
    scope: Mapped[str] = mapped_column(String(16), default="fact", server_default="fact")
    supersedes_id: Mapped[str | None] = mapped_column(ForeignKey("edits.id"), nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    delta: Mapped["EditDelta"] = relationship(back_populates="edit", uselist=False, cascade="all, delete-orphan")
    keys: Mapped["EditKeys"] = relationship(back_populates="edit", uselist=False, cascade="all, delete-orphan")


class EditDelta(Base):
    __tablename__ = "edit_deltas"

    edit_id: Mapped[str] = mapped_column(ForeignKey("edits.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors bytes
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    edit: Mapped[Edit] = relationship(back_populates="delta")


class EditKeys(Base):
    """Selector keys of one edit, so the shared memory can be rebuilt from the database."""

    __tablename__ = "edit_keys"

    edit_id: Mapped[str] = mapped_column(ForeignKey("edits.id", ondelete="CASCADE"), primary_key=True)
    encoder: Mapped[str] = mapped_column(String(200))
    texts: Mapped[list[str]] = mapped_column(JSON)
    # safetensors bytes: float32 "keys" [n, d] and, when the edit has relation keys, "relation" [m, d]
    vectors: Mapped[bytes] = mapped_column(LargeBinary)

    edit: Mapped[Edit] = relationship(back_populates="keys")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued | running | succeeded | failed
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Calibration(Base):
    __tablename__ = "calibrations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    # queued | running | active | failed | reverted
    status: Mapped[str] = mapped_column(String(16), index=True)
    facts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    delta_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    delta: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    delta_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    delta_size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str | None] = mapped_column(String(64), nullable=True)  # api key id, or "system"
    action: Mapped[str] = mapped_column(String(64))
    entity_type: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str] = mapped_column(String(36))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    __table_args__ = (Index("ix_audit_entity", "entity_type", "entity_id"),)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))  # reader | editor | admin
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Repair(Base):
    """A repair job: the causes of reported failures and, once applied, the deltas that erase them."""

    __tablename__ = "repairs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    # queued | running | reported (apply: false) | active | failed | reverted
    status: Mapped[str] = mapped_column(String(16), index=True)
    apply: Mapped[bool] = mapped_column(default=False)
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reverted_edits: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    deltas: Mapped[list["RepairDelta"]] = relationship(back_populates="repair", cascade="all, delete-orphan")


class RepairDelta(Base):
    """One repair delta, applied on top of one calibration's own (never rewritten) delta."""

    __tablename__ = "repair_deltas"

    repair_id: Mapped[str] = mapped_column(ForeignKey("repairs.id", ondelete="CASCADE"), primary_key=True)
    calibration_id: Mapped[str] = mapped_column(ForeignKey("calibrations.id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors bytes
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)

    repair: Mapped[Repair] = relationship(back_populates="deltas")
