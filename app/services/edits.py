"""Create, supersede, revert and read edits.

One edit: check first what it will need to be stored (its Idempotency-Key claimed across
replicas, the database and Redis reachable), so that a request that cannot be stored is refused
before any training; then fit the method's delta (no database work yet), embed the selector keys,
find an active edit it supersedes, measure it through the served path on a staging copy of the
selector (the live one, which answers requests, never holds an edit before its commit), then
write the edit row, its delta, its keys and the audit events in one transaction; the shared
memory is updated inside that transaction (under the visibility lock), so a Redis failure rolls
the rows back and a database failure takes the memory change back. When taking it back fails
too (Redis stalled), the memory is reconciled with the database at the next periodic check.
Nothing of a failed edit remains anywhere.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError

from app.delta import Delta
from app.errors import Conflict, FactpatchError, Internal, NotFound, Unavailable, Unprocessable
from app.lm.engine import LM
from app.methods import base as methods
from app.services.answers import AnswerService, head_text
from app.services.deltas import DeltaCache
from app.services.global_deltas import GlobalDeltaSync
from app.selector.memory import StoredKeys
from app.services.memory_sync import MemorySync, stored_from_edit
from app.store import AuditRepo, Database, EditRepo
from app.store.db import DatabaseUnavailable, is_unavailable
from app.store.models import Edit

log = logging.getLogger(__name__)


@dataclass
class EditInput:
    prompt: str
    target: str
    subject: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    locality_prompts: list[str] = field(default_factory=list)
    method: str = "pnp"
    config: dict[str, Any] = field(default_factory=dict)
    scope: str = "fact"

    def request_hash(self) -> str:
        # The default scope is left out, so a request stored before scopes existed hashes the same.
        fields = {k: v for k, v in self.__dict__.items() if not (k == "scope" and v == "fact")}
        raw = json.dumps(fields, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()


@dataclass
class CreateResult:
    edit: Edit
    replayed: bool = False


class VisibilityChange:
    """Makes edits visible to routing or takes them away, in the order the stores must change.

    Inside the caller's database transaction, ``show`` and ``hide`` write the shared memory
    (Redis), remembering how to take each write back; if the transaction then fails, ``undo``
    restores the memory. Once it committed, ``apply`` updates this process's mirror and delta
    cache. So a failed change leaves no key behind, and the mirror never runs ahead of the rows.
    """

    def __init__(self, sync: MemorySync, selector, deltas: DeltaCache, globals: GlobalDeltaSync):
        self.sync, self.selector, self.deltas, self.globals = sync, selector, deltas, globals
        self._undo: list[tuple[str, StoredKeys | None]] = []  # (edit id, its memory record before)
        self._local: list[tuple[str, StoredKeys | None, Any, Delta | None]] = []

    def show(self, stored: StoredKeys, *, record=None, delta: Delta | None = None) -> None:
        """Put an edit's keys in the memory; ``record`` / ``delta``, when given, go to the mirror
        and delta cache as they are (else the mirror gets the record converted from ``stored``)."""
        self.sync.change_started(self)
        before = self.sync.memory.get(stored.edit_id)
        self._undo.append((stored.edit_id, before))
        self.sync.note_local_version(self.sync.memory.put(stored))
        self._local.append((stored.edit_id, stored, record, delta))

    def hide(self, edit_id: str) -> None:
        """Take an edit's keys out of the memory (and, on ``apply``, its mirror keys and delta)."""
        self.sync.change_started(self)
        before = self.sync.memory.get(edit_id)
        self._undo.append((edit_id, before))
        self.sync.note_local_version(self.sync.memory.delete(edit_id))
        self._local.append((edit_id, None, None, None))

    def undo(self, *, unknown: bool = False) -> None:
        """Give the memory back what the failed transaction's writes replaced (last first).

        ``unknown``: a memory write failed midway (a Redis timeout may still be applied later),
        so the memory is also reconciled with the database at the next periodic check, as it is
        whenever this undo fails."""
        if unknown and self._undo:
            self.sync.request_reconcile()
        try:
            for edit_id, before in reversed(self._undo):
                if before is None:
                    self.sync.memory.delete(edit_id)
                else:
                    self.sync.memory.put(before)
        except Exception:  # noqa: BLE001 - the periodic check reconciles with the database
            log.warning("could not undo the selector memory change; it will be reconciled with the database")
            self.sync.request_reconcile()
        self._undo, self._local = [], []
        self.sync.change_ended(self)

    def undo_and_raise(self, exc: BaseException, outcome: str):
        """Undo after ``exc`` ended the transaction, then raise: 503 with a code when a store was
        unavailable (``outcome`` says what did not happen), else ``exc`` itself."""
        self.undo(unknown=_is_redis_error(exc) or _is_db_error(exc))
        if _is_redis_error(exc):
            raise Unavailable(f"the selector memory (Redis) is unavailable; {outcome}",
                              code="memory_unavailable") from exc
        if _is_db_error(exc):
            raise DatabaseUnavailable(f"the database is unavailable; {outcome}") from exc
        raise exc

    def apply(self) -> None:
        """After the commit: this process's mirror and delta cache follow the memory, and a global
        edit's delta (``"routed": false``) is switched on or off for every query."""
        with self.sync.lock:
            for edit_id, stored, record, delta in self._local:
                if stored is None:
                    self.selector.remove(edit_id)
                    self.deltas.drop(edit_id)
                    set_global_edit(self.globals, edit_id, None)
                    continue
                if delta is not None:
                    self.deltas.put(edit_id, delta)
                self.selector.add(record if record is not None else self.sync.to_record(stored))
                set_global_edit(self.globals, edit_id, delta if delta is not None else self.deltas.get(edit_id))
            self._undo, self._local = [], []
            self.sync.change_ended(self)


GLOBAL_PREFIX = "edit:"


def is_global(delta: Delta | None) -> bool:
    """A delta made with ``"routed": false``: it applies to every query, not only routed ones."""
    return delta is not None and delta.meta.get("routed") == "false"


def set_global_edit(globals: GlobalDeltaSync, edit_id: str, delta: Delta | None) -> None:
    """Make a global edit's delta part of every forward pass (``delta`` None or routed: take it off)."""
    globals.set(GLOBAL_PREFIX + edit_id, delta if is_global(delta) else None)


class EditService:
    def __init__(self, db: Database, lm: LM, selector, sync: MemorySync, deltas: DeltaCache, answers: AnswerService,
                 globals: GlobalDeltaSync):
        self.db = db
        self.globals = globals
        # Global edits ("routed": false) reach every replica through the global delta sync; a poll
        # holds the visibility lock, so it never undoes a change it read before its commit.
        globals.register(GLOBAL_PREFIX, self._active_global, lock=sync.lock)
        self.lm = lm
        self.selector = selector
        self.sync = sync
        self.deltas = deltas
        self.answers = answers
        self._lock = threading.Lock()  # one change at a time in this process

    def _active_global(self, session) -> dict[str, Any]:
        """The active global edits (``"routed": false``), each key with a loader of its delta."""
        return {GLOBAL_PREFIX + i: (lambda i=i: self._global_delta(i)) for i in EditRepo(session).active_global_ids()}

    def _global_delta(self, edit_id: str) -> Delta | None:
        delta = self.deltas.get(edit_id)
        return delta if is_global(delta) else None

    # -- reads ---------------------------------------------------------------------------------
    def count_active(self) -> int:
        with self.db.session() as s:
            return int(EditRepo(s).count_by_status().get("active", 0))

    def get(self, edit_id: str) -> Edit:
        with self.db.session() as s:
            edit = EditRepo(s).get(edit_id)
            if edit is None:
                raise NotFound(f"no edit {edit_id}", code="edit_not_found")
            return edit

    def list(self, *, status: str | None, limit: int, cursor: str | None) -> tuple[list[Edit], str | None]:
        from app.store.repos import BadCursor

        with self.db.session() as s:
            try:
                return EditRepo(s).list(status=status, limit=limit, cursor=cursor)
            except BadCursor as exc:
                raise Unprocessable(str(exc), code="invalid_cursor") from exc

    def history(self, edit_id: str) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return [
                {"at": e.at, "actor": e.actor, "action": e.action, "details": e.details}
                for e in AuditRepo(s).for_entity("edit", edit_id)
            ]

    # -- create --------------------------------------------------------------------------------
    def validate(self, req: EditInput):
        """The request's method and parsed config, or 422: what can be refused before any work
        (also on a replica that hands the training to a worker)."""
        try:
            method = methods.get(req.method)
        except methods.UnknownMethod:
            method = None
        if method is None or not method.accepts_edits:
            raise Unprocessable(
                f"unknown edit method {req.method!r}; known: {', '.join(methods.names(edits_only=True))}",
                code="unknown_method",
            )
        try:
            config = method.parse_config(req.config)
            method.check(self.lm, config)  # e.g. block indices beyond the model's depth
        except methods.ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise Unprocessable(f"config.{loc}: {first.get('msg')}", code="invalid_config") from None
        except methods.ConfigError as exc:
            raise Unprocessable(f"config.{exc}", code="invalid_config") from None
        except methods.MethodUnavailable as exc:
            raise Conflict(str(exc), code=exc.code) from None
        return method, config

    def create(self, req: EditInput, *, actor: str | None, idempotency_key: str | None = None,
               edit_id: str | None = None) -> CreateResult:
        """Train, measure and store one edit. ``edit_id``: the id it must get (a queued edit's,
        chosen when it was queued); when an edit with that id is stored already (a job run again
        after its worker died past the commit), it is returned as a replay and nothing is trained."""
        method, config = self.validate(req)
        claim = self.db.claim(f"idempotency:{idempotency_key}") if idempotency_key else contextlib.nullcontext(True)
        with self._lock, claim as claimed, self.selector.memo():
            if not claimed:
                raise Conflict("a request with this Idempotency-Key is in progress", code="idempotency_conflict")
            if idempotency_key:
                replay = self._replay(idempotency_key, req)
                if replay is not None:
                    return CreateResult(replay, replayed=True)
            if edit_id is not None:
                with self.db.session() as s:
                    stored = EditRepo(s).get(edit_id)
                if stored is not None:
                    return CreateResult(stored, replayed=True)
            self._require_stores()
            checked = self._refuse_no_op(req, method)
            t0 = time.perf_counter()
            try:
                fit = method.fit(self.lm, self._edit_request(req), config)
            except FactpatchError:
                raise
            except Exception as exc:  # noqa: BLE001 - the caller gets a clear error, nothing is stored
                log.exception("fitting edit failed")
                raise Internal(f"training the edit failed: {type(exc).__name__}", code="training_failed") from exc
            if not checked:
                if fit.base_holds is None:
                    self._refuse_if_served(req)
                elif fit.base_holds:
                    raise _already_holds()
            record = self.selector.keys_for(
                req.prompt, req.paraphrases, req.subject, target=req.target, scope=req.scope,
            )
            superseded = self._superseded_by(req)
            edit = Edit(
                method=req.method, prompt=req.prompt, target=req.target, subject=req.subject, scope=req.scope,
                paraphrases=req.paraphrases, locality_prompts=req.locality_prompts, config=config.model_dump(),
                status="active", supersedes_id=superseded.id if superseded else None,
                idempotency_key=idempotency_key, request_hash=req.request_hash(), created_by=actor,
            )
            edit.id = edit_id or edit.id or _new_id()
            record.edit_id = edit.id
            metrics = self._measure(req, record, fit.delta, superseded, fit.prompt_holds)
            metrics.update(steps=fit.steps, train_ms=round(fit.train_ms, 1), total_ms=round((time.perf_counter() - t0) * 1000, 1))
            edit.metrics = metrics
            self._commit_new(edit, fit.delta, record, superseded, actor)
            return CreateResult(self.get(edit.id))

    def _require_stores(self) -> None:
        """Refuse (503) before training when the edit could not be stored: the database or the
        selector memory is unreachable."""
        from sqlalchemy import text

        with self.db.session() as s:
            s.execute(text("SELECT 1"))
        try:
            self.sync.memory.ping()
        except Exception as exc:
            if _is_redis_error(exc):
                raise Unavailable("the selector memory (Redis) is unavailable; the edit was not trained",
                                  code="memory_unavailable") from exc
            raise

    def _edit_request(self, req: EditInput) -> methods.EditRequest:
        return methods.EditRequest(
            prompt=req.prompt, target=req.target, subject=req.subject,
            paraphrases=list(req.paraphrases), locality_prompts=list(req.locality_prompts),
        )

    def _replay(self, key: str, req: EditInput) -> Edit | None:
        with self.db.session() as s:
            existing = EditRepo(s).by_idempotency_key(key)
        if existing is None:
            return None
        if existing.request_hash != req.request_hash():
            raise Conflict("this Idempotency-Key was used with a different request", code="idempotency_key_reused")
        return existing

    def _refuse_no_op(self, req: EditInput, method) -> bool:
        """Refuse (422) an edit whose target the served model already writes after the prompt.
        Returns whether that was checked here: when the prompt routes to no edit, the base model
        serves it, and a method that reports ``base_holds`` sees it in the fit's first forward, so
        the check waits for the fit instead of costing a forward of its own."""
        if method.reports_base_holds and self.answers.route([req.prompt])[0].edit_id is None:
            return False
        self._refuse_if_served(req)
        return True

    def _refuse_if_served(self, req: EditInput) -> None:
        served = self.answers.score([req.prompt], [req.target], mode="completion")[0]
        if served.all_correct:
            raise _already_holds()

    def _superseded_by(self, req: EditInput) -> Edit | None:
        route = self.answers.route([req.prompt])[0]
        if route.edit_id is None:
            return None
        with self.db.session() as s:
            old = EditRepo(s).get(route.edit_id)
        if old is None or old.status != "active":
            return None
        return old if old.target.strip() != req.target.strip() else None

    def _measure(self, req: EditInput, record, delta: Delta, superseded: Edit | None,
                 prompt_holds: dict[str, bool] | None = None) -> dict[str, Any]:
        """Success on the prompt and paraphrases, locality on unrelated prompts, through the served
        path on a staging copy of the selector (the new keys in, the superseded edit's out) with
        the new delta beside the cache: the live selector and cache, which answer requests meanwhile,
        never hold an edit that is not committed.

        ``prompt_holds``: the fit's own check of the prompt per form with exactly this delta (and the
        global deltas); when the prompt is routed to the new edit unchanged, that check is what the
        served path would compute, so the prompt is not scored again."""
        answers = AnswerService(
            self.lm, self._staging_selector(record, superseded.id if superseded else None),
            _StagedDeltas(self.deltas, record.edit_id, delta.to(self.lm.device, self.lm.dtype)),
        )
        forms = ["completion"] + (["chat"] if self.lm.has_chat_template else [])
        prompt_held: list[bool] | None = None
        if prompt_holds and all(f in prompt_holds for f in forms):
            route = answers.route([req.prompt])[0]
            if route.edit_id == record.edit_id and head_text(req.prompt, route) == req.prompt:
                prompt_held = [prompt_holds[f] for f in forms]
        # The prompt in every form (unless the fit checked it) and the paraphrases in completion
        # form: one scoring batch.
        asked = forms if prompt_held is None else []
        prompts = [req.prompt] * len(asked) + list(req.paraphrases)
        modes = asked + ["completion"] * len(req.paraphrases)
        held = [s.all_correct and s.edit_id == record.edit_id
                for s in (answers.score(prompts, [req.target] * len(prompts), modes=modes) if prompts else [])]
        if prompt_held is not None:
            held = prompt_held + held
        success = _mean(held[: len(forms)])
        para = _mean(held[len(forms):]) if req.paraphrases else None
        locality = None
        if req.locality_prompts:
            routes = answers.route(req.locality_prompts)
            hit = [p for p, r in zip(req.locality_prompts, routes) if r.edit_id == record.edit_id]
            changed = 0
            if hit:
                base = self.lm.generate(hit, max_new_tokens=8, mode="completion")
                new = self.lm.generate(hit, max_new_tokens=8, mode="completion", deltas=[delta])
                changed = sum(a.token_ids != b.token_ids for a, b in zip(base, new))
            locality = 1.0 - changed / len(req.locality_prompts)
        return {"success": success, "paraphrase_success": para, "locality": locality}

    def _staging_selector(self, record, without: str | None):
        """A throwaway copy of the live selector holding its keys plus ``record``, less ``without``
        (it shares the encoder and the immutable key snapshots; changes to it stay in it)."""
        live = self.selector
        staged = copy.copy(live)
        staged._lock = threading.Lock()
        records = dict(getattr(live, "_records", {}))
        if without:
            records.pop(without, None)
        records[record.edit_id] = record
        staged.replace_all(list(records.values()))
        return staged

    def _commit_new(self, edit: Edit, delta: Delta, record, superseded: Edit | None, actor: str | None) -> None:
        stored = self.sync.to_stored(record, self.selector.encoder.name)
        change = self._change()
        try:
            with self.db.transaction() as s:
                self.db.lock_visibility(s)
                repo, audit = EditRepo(s), AuditRepo(s)
                repo.add(
                    edit, delta_kind=delta.kind, delta_bytes=delta.to_bytes(), encoder=stored.encoder,
                    key_texts=list(stored.texts), key_vectors=stored.vectors,
                )
                audit.record(actor=actor, action="edit.create", entity_type="edit", entity_id=edit.id,
                             method=edit.method, target=edit.target)
                if superseded is not None:
                    # Another replica may have reverted or superseded it since this one routed the
                    # prompt (its mirror lags by a pub/sub message): the row lock decides.
                    old = repo.get(superseded.id, for_update=True)
                    if old is None or old.status != "active":
                        raise Conflict(
                            f"edit {superseded.id} that this edit would supersede is no longer active "
                            f"({old.status if old else 'gone'}); nothing was stored, retry the request",
                            code="edit_conflict",
                        )
                    repo.set_status(old, "superseded")
                    audit.record(actor=actor, action="edit.supersede", entity_type="edit", entity_id=old.id,
                                 superseded_by=edit.id)
                change.show(stored, record=record, delta=delta)
                if superseded is not None:
                    change.hide(superseded.id)
        except IntegrityError as exc:
            change.undo()
            if edit.idempotency_key:
                raise Conflict("a request with this Idempotency-Key is in progress or done", code="idempotency_conflict") from exc
            raise
        except Exception as exc:
            change.undo_and_raise(exc, "the edit was not stored")
        change.apply()

    def _change(self) -> VisibilityChange:
        return VisibilityChange(self.sync, self.selector, self.deltas, self.globals)

    # -- revert --------------------------------------------------------------------------------
    def revert(self, edit_id: str, *, actor: str | None) -> Edit:
        with self._lock:
            with self.db.session() as s:
                edit = EditRepo(s).get(edit_id)
            if edit is None:
                raise NotFound(f"no edit {edit_id}", code="edit_not_found")
            if edit.status == "reverted":
                return edit
            change = self._change()
            try:
                with self.db.transaction() as s:
                    self.db.lock_visibility(s)
                    repo, audit = EditRepo(s), AuditRepo(s)
                    # The locked row, not the read above, says what to undo: another replica may
                    # have superseded or reverted it in between.
                    row = repo.get(edit_id, with_delta=True, for_update=True)
                    if row.status == "reverted":
                        return self.get(edit_id)
                    was_active = row.status == "active"
                    repo.set_status(row, "reverted")
                    audit.record(actor=actor, action="edit.revert", entity_type="edit", entity_id=row.id,
                                 previous_status="active" if was_active else "superseded")
                    reinstated: Edit | None = None
                    if was_active and row.supersedes_id:
                        older = repo.get(row.supersedes_id, with_delta=True)
                        if older is not None and older.status == "superseded":
                            repo.set_status(older, "active")
                            audit.record(actor=actor, action="edit.reinstate", entity_type="edit",
                                         entity_id=older.id, after_revert_of=row.id)
                            reinstated = older
                    if was_active:
                        change.hide(row.id)
                    if reinstated is not None:
                        change.show(stored_from_edit(reinstated))
            except Exception as exc:
                change.undo_and_raise(exc, "nothing was reverted")
            change.apply()
            self.selector.remove(edit_id)  # also when it was superseded: never left in this mirror
            self.deltas.drop(edit_id)
            set_global_edit(self.globals, edit_id, None)
            return self.get(edit_id)

    def reinstate(self, edit_id: str, *, actor: str | None, reason: str) -> Edit:
        """Make a reverted edit active again (a repair's revert undoing its own revert of the edit).
        Refused with 409 when another active edit superseded it or supersedes what it superseded."""
        with self._lock:
            change = self._change()
            try:
                with self.db.transaction() as s:
                    self.db.lock_visibility(s)
                    repo = EditRepo(s)
                    row = repo.get(edit_id, with_delta=True, for_update=True)
                    if row is None:
                        raise NotFound(f"no edit {edit_id}", code="edit_not_found")
                    if row.status == "active":
                        return self.get(edit_id)
                    if row.status != "reverted":
                        raise Conflict(f"edit {edit_id} is {row.status}", code="edit_not_reverted")
                    if repo.active_superseding(edit_id) is not None:
                        raise Conflict(f"edit {edit_id} was superseded", code="edit_superseded")
                    repo.set_status(row, "active")
                    AuditRepo(s).record(actor=actor, action="edit.reinstate", entity_type="edit", entity_id=row.id,
                                        reason=reason)
                    change.show(stored_from_edit(row))
            except Exception as exc:
                change.undo_and_raise(exc, "nothing was reinstated")
            change.apply()
            return self.get(edit_id)


class _StagedDeltas:
    """The delta cache as the answer path reads it, plus one delta not stored yet."""

    def __init__(self, cache: DeltaCache, edit_id: str, delta: Delta):
        self.cache, self.edit_id, self.delta = cache, edit_id, delta

    def get(self, edit_id: str) -> Delta | None:
        return self.delta if edit_id == self.edit_id else self.cache.get(edit_id)

    def get_cached(self, edit_id: str) -> Delta | None:
        return self.delta if edit_id == self.edit_id else self.cache.get_cached(edit_id)


def _already_holds() -> Unprocessable:
    return Unprocessable(
        "the model already continues this prompt with the target; nothing to edit", code="target_already_holds",
    )


def _mean(values) -> float:
    values = list(values)
    return sum(bool(v) for v in values) / len(values) if values else 0.0


def _new_id() -> str:
    from app.store.models import new_id

    return new_id()


def _is_redis_error(exc: BaseException) -> bool:
    try:
        import redis

        return isinstance(exc, redis.RedisError)
    except ImportError:  # pragma: no cover
        return False


def _is_db_error(exc: BaseException) -> bool:
    return is_unavailable(exc)
