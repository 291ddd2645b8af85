"""Synthetic active edits for benchmarks: many edits at once without training each one.

Each gets keys embedded like a real edit's and a random LoRA delta of the ``pnp`` shape, written
through the same tables and memory as real edits (one transaction for the batch), so that the
answer path with N active edits is measured as it would run.
"""

from __future__ import annotations

import torch

from app.delta import Delta
from app.services.memory_sync import stored_from_edit, vectors_to_bytes
from app.store import AuditRepo, EditRepo
from app.store.models import Edit, new_id


def synthetic_case(i: int) -> tuple[str, str, str]:
    subject = f"Entity {i:05d} Zq"
    return f"The favourite instrument of {subject} is", f"tuba {i}", subject


def import_synthetic(rt, n: int, *, seed: int = 0, batch: int = 512) -> list[str]:
    """Add ``n`` active synthetic edits; returns their ids."""
    from app.methods.pnp.config import PnPConfig
    from app.methods.pnp.method import init_delta

    if n <= 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    template = init_delta(rt.lm, PnPConfig())
    ids: list[str] = []
    start = len(rt.selector)
    for lo in range(0, n, batch):
        cases = [synthetic_case(start + i) for i in range(lo, min(n, lo + batch))]
        vectors = rt.selector.encoder.encode([p for p, _, _ in cases])
        edits = []
        with rt.db.transaction() as s:
            repo = EditRepo(s)
            for (prompt, target, subject), vec in zip(cases, vectors):
                tensors = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in template.tensors.items()}
                delta = Delta(template.kind, tensors, dict(template.meta))
                edit = Edit(id=new_id(), method="pnp", prompt=prompt, target=target, subject=subject, paraphrases=[],
                            locality_prompts=[], config={"synthetic": True}, status="active", metrics={})
                repo.add(edit, delta_kind=delta.kind, delta_bytes=delta.to_bytes(), encoder=rt.selector.encoder.name,
                         key_texts=[prompt], key_vectors=vectors_to_bytes(vec[None, :]))
                AuditRepo(s).record(actor="system", action="edit.create", entity_type="edit", entity_id=edit.id,
                                    synthetic=True)
                edits.append(edit)
        records = []
        for edit in edits:
            stored = stored_from_edit(edit)
            rt.sync.note_local_version(rt.memory.put(stored))
            records.append(rt.sync.to_record(stored))
            ids.append(edit.id)
        rt.selector.add_many(records)
    return ids
