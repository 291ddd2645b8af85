"""Repositories: the only code that writes SQL. Each works inside a session the caller opened
with ``Database.transaction()``, so one change is one transaction."""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, selectinload

from app.store.models import ApiKey, AuditEvent, Calibration, Edit, EditDelta, EditKeys, Job, Repair, RepairDelta, utcnow

ROLES = ("reader", "editor", "admin")
ROLE_RANK = {r: i for i, r in enumerate(ROLES)}


class BadCursor(ValueError):
    pass


def encode_cursor(created_at: datetime, ident: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{ident}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, ident = raw.split("|", 1)
        return datetime.fromisoformat(ts), ident
    except Exception as exc:  # noqa: BLE001
        raise BadCursor("malformed cursor") from exc


def _page(session: Session, model, stmt, limit: int, cursor: str | None):
    if cursor:
        ts, ident = decode_cursor(cursor)
        stmt = stmt.where(or_(model.created_at < ts, and_(model.created_at == ts, model.id < ident)))
    rows = list(session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    nxt = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], nxt


class EditRepo:
    def __init__(self, session: Session):
        self.s = session

    def get(self, edit_id: str, *, with_delta: bool = False, for_update: bool = False) -> Edit | None:
        """One edit; ``for_update`` locks its row until the transaction ends (PostgreSQL), so that
        replicas changing the same edit at once are serialised and each sees the other's result."""
        stmt = select(Edit).where(Edit.id == edit_id)
        if with_delta:
            stmt = stmt.options(selectinload(Edit.delta), selectinload(Edit.keys))
        if for_update:
            stmt = stmt.with_for_update()
        return self.s.scalars(stmt).first()

    def by_idempotency_key(self, key: str) -> Edit | None:
        return self.s.scalars(select(Edit).where(Edit.idempotency_key == key)).first()

    def list(self, *, status: str | None, limit: int, cursor: str | None) -> tuple[list[Edit], str | None]:
        stmt = select(Edit)
        if status:
            stmt = stmt.where(Edit.status == status)
        return _page(self.s, Edit, stmt, limit, cursor)

    def add(
        self,
        edit: Edit,
        *,
        delta_kind: str,
        delta_bytes: bytes,
        encoder: str,
        key_texts: list[str],
        key_vectors: bytes,
    ) -> Edit:
        edit.delta = EditDelta(
            kind=delta_kind,
            data=delta_bytes,
            sha256=hashlib.sha256(delta_bytes).hexdigest(),
            size_bytes=len(delta_bytes),
        )
        edit.keys = EditKeys(encoder=encoder, texts=key_texts, vectors=key_vectors)
        self.s.add(edit)
        self.s.flush()
        return edit

    def set_status(self, edit: Edit, status: str) -> None:
        edit.status = status
        edit.updated_at = utcnow()
        self.s.flush()

    def active_superseding(self, edit_id: str) -> Edit | None:
        """The active edit that superseded ``edit_id``, if any."""
        return self.s.scalars(select(Edit).where(Edit.supersedes_id == edit_id, Edit.status == "active")).first()

    def active_with_keys(self) -> Sequence[Edit]:
        stmt = select(Edit).where(Edit.status == "active").options(selectinload(Edit.keys))
        return list(self.s.scalars(stmt))

    def active_global_ids(self) -> list[str]:
        """Ids of the active edits made with ``"routed": false`` (their delta serves every query);
        one indexed query on the edits table, no keys or deltas loaded."""
        stmt = select(Edit.id).where(Edit.status == "active", Edit.config["routed"].as_boolean().is_(False))
        return list(self.s.scalars(stmt))

    def count_by_status(self) -> dict[str, int]:
        from sqlalchemy import func

        rows = self.s.execute(select(Edit.status, func.count()).group_by(Edit.status))
        return {status: n for status, n in rows}


class CalibrationRepo:
    def __init__(self, session: Session):
        self.s = session

    def get(self, cal_id: str) -> Calibration | None:
        return self.s.get(Calibration, cal_id)

    def add(self, cal: Calibration) -> Calibration:
        self.s.add(cal)
        self.s.flush()
        return cal

    def list(self, *, status: str | None, limit: int, cursor: str | None) -> tuple[list[Calibration], str | None]:
        stmt = select(Calibration)
        if status:
            stmt = stmt.where(Calibration.status == status)
        return _page(self.s, Calibration, stmt, limit, cursor)

    def active(self) -> list[Calibration]:
        return list(self.s.scalars(select(Calibration).where(Calibration.status == "active")))

    def active_ids(self) -> list[str]:
        """Ids of the active calibrations (without loading their deltas)."""
        return list(self.s.scalars(select(Calibration.id).where(Calibration.status == "active")))

    def delta_data(self, cal_id: str) -> bytes | None:
        return self.s.scalar(select(Calibration.delta).where(Calibration.id == cal_id))


class RepairRepo:
    def __init__(self, session: Session):
        self.s = session

    def get(self, repair_id: str, *, with_deltas: bool = False) -> Repair | None:
        stmt = select(Repair).where(Repair.id == repair_id)
        if with_deltas:
            stmt = stmt.options(selectinload(Repair.deltas))
        return self.s.scalars(stmt).first()

    def add(self, repair: Repair) -> Repair:
        self.s.add(repair)
        self.s.flush()
        return repair

    def add_delta(self, repair: Repair, *, calibration_id: str, kind: str, data: bytes) -> None:
        repair.deltas.append(RepairDelta(calibration_id=calibration_id, kind=kind, data=data,
                                         sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)))
        self.s.flush()

    def list(self, *, status: str | None, limit: int, cursor: str | None) -> tuple[list[Repair], str | None]:
        stmt = select(Repair)
        if status:
            stmt = stmt.where(Repair.status == status)
        return _page(self.s, Repair, stmt, limit, cursor)

    def active_deltas(self) -> list[RepairDelta]:
        """Deltas of active repairs whose calibration is active too."""
        stmt = (
            select(RepairDelta)
            .join(Repair, Repair.id == RepairDelta.repair_id)
            .join(Calibration, Calibration.id == RepairDelta.calibration_id)
            .where(Repair.status == "active", Calibration.status == "active")
        )
        return list(self.s.scalars(stmt))

    def active_delta_keys(self) -> list[tuple[str, str]]:
        """(repair id, calibration id) of :meth:`active_deltas`, without loading the deltas."""
        stmt = (
            select(RepairDelta.repair_id, RepairDelta.calibration_id)
            .join(Repair, Repair.id == RepairDelta.repair_id)
            .join(Calibration, Calibration.id == RepairDelta.calibration_id)
            .where(Repair.status == "active", Calibration.status == "active")
        )
        return [(r, c) for r, c in self.s.execute(stmt)]

    def delta_data(self, repair_id: str, cal_id: str) -> bytes | None:
        return self.s.scalar(select(RepairDelta.data).where(RepairDelta.repair_id == repair_id,
                                                            RepairDelta.calibration_id == cal_id))


class JobRepo:
    def __init__(self, session: Session):
        self.s = session

    def get(self, job_id: str) -> Job | None:
        return self.s.get(Job, job_id)

    def add(self, job: Job) -> Job:
        self.s.add(job)
        self.s.flush()
        return job

    def unfinished(self) -> list[Job]:
        return list(self.s.scalars(select(Job).where(Job.status.in_(("queued", "running")))))

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        self.s.execute(update(Job).where(Job.id == job_id).values(progress=progress))


class AuditRepo:
    def __init__(self, session: Session):
        self.s = session

    def record(self, *, actor: str | None, action: str, entity_type: str, entity_id: str, **details: Any) -> None:
        self.s.add(AuditEvent(actor=actor, action=action, entity_type=entity_type, entity_id=entity_id, details=details))

    def for_entity(self, entity_type: str, entity_id: str) -> list[AuditEvent]:
        stmt = (
            select(AuditEvent)
            .where(AuditEvent.entity_type == entity_type, AuditEvent.entity_id == entity_id)
            .order_by(AuditEvent.id)
        )
        return list(self.s.scalars(stmt))


def hash_key(raw: str) -> str:
    # API keys are 256-bit random tokens, so a plain SHA-256 is a safe, fast verifier.
    return hashlib.sha256(raw.encode()).hexdigest()


def generate_key() -> str:
    return "fp_" + secrets.token_urlsafe(32)


class ApiKeyRepo:
    def __init__(self, session: Session):
        self.s = session

    def create(self, *, name: str, role: str, raw: str | None = None) -> tuple[ApiKey, str]:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        raw = raw or generate_key()
        key = ApiKey(name=name, role=role, key_hash=hash_key(raw), prefix=raw[:8])
        self.s.add(key)
        self.s.flush()
        return key, raw

    def ensure(self, *, name: str, role: str, raw: str) -> ApiKey:
        """Register a configured key (idempotent; updates the role if it changed)."""
        existing = self.s.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(raw))).first()
        if existing:
            existing.role = role
            existing.revoked_at = None
            return existing
        return self.create(name=name, role=role, raw=raw)[0]

    def verify(self, raw: str) -> ApiKey | None:
        key = self.s.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(raw))).first()
        if key is None or key.revoked_at is not None:
            return None
        return key

    def any_admin(self) -> bool:
        stmt = select(ApiKey.id).where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None)).limit(1)
        return self.s.scalars(stmt).first() is not None

    def list(self) -> list[ApiKey]:
        return list(self.s.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    def revoke(self, key_id: str) -> bool:
        key = self.s.get(ApiKey, key_id)
        if key is None:
            return False
        key.revoked_at = utcnow()
        return True
