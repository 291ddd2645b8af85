"""Does an edit exported as a PEFT adapter answer like factpatch? (``factpatch export-parity``)

A throwaway in-process service (temporary SQLite home, no Redis) makes ``n`` edits of a dataset,
all kept active. Each edit's adapter is fetched through ``GET /edits/{id}/adapter``, unpacked and
loaded with ``peft.PeftModel.from_pretrained`` into a separate copy of the base model. For the
edit's prompt and its rephrase, in completion and chat form, greedy, it compares:

``adapter``
    PEFT's greedy answer against factpatch's own greedy answer with the edit's delta applied
    throughout (``LM.generate`` with the delta): the same tokens?
``target``
    PEFT's answer against the served ``/answer`` up to the end of the edit's target: factpatch
    applies the adapter until the target is written, so the two must agree up to there.
``two_step``
    PEFT with factpatch's answer rule (adapter until the target is written, then
    ``disable_adapter()`` with the target banned and a new word first) against ``/answer``, in full.
``plain``
    PEFT's plain greedy answer against ``/answer``, in full (differs where the adapter, left on,
    writes something else after the target than the base model does).

Queries the selector does not route to the edit are counted apart: ``/answer`` gives the base
model's answer there, which no adapter is meant to reproduce.
"""

from __future__ import annotations

import io
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from app.eval.datasets import EditCase

CHECKS = ("adapter", "target", "two_step", "plain")


@dataclass
class ParityConfig:
    n: int = 20
    max_new_tokens: int = 24
    modes: tuple[str, ...] = ("completion", "chat")
    method: str = "pnp"


def _peft_generate(model, lm, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=lm.device), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=lm.tokenizer.pad_token_id)
    return _until_eos(lm, out[0, len(ids):].tolist())


def _until_eos(lm, row: list[int]) -> list[int]:
    eos = lm._stop_ids()
    cut = next((i for i, t in enumerate(row) if t in eos), len(row))
    return row[:cut]


def _peft_two_step(model, lm, query: str, mode: str, target: str, max_new_tokens: int, slack: int = 8) -> list[int]:
    """factpatch's answer rule on a PEFT model: the adapter writes until the target is written (at
    most its length plus ``slack`` tokens), then the base model alone (``disable_adapter``) goes on,
    never writing the target again, starting a new word when the target ends in a letter or digit."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from app.lm.engine import _NewWord, _TargetWritten

    ids = lm.prompt_ids(query, mode)
    budget = min(max_new_tokens, len(lm.target_ids(query, target, mode)) + slack)
    x = torch.tensor([ids], device=lm.device)
    with torch.no_grad():
        out = model.generate(input_ids=x, max_new_tokens=budget, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=lm.tokenizer.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([_TargetWritten(lm, target, [len(ids)])]))
    row = _until_eos(lm, out[0, len(ids):].tolist())
    cut = lm._target_end(row, target)
    if cut is None or cut >= max_new_tokens:
        return row
    head = row[:cut]
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens - len(head), do_sample=False, temperature=None,
                                  top_p=None, top_k=None, pad_token_id=lm.tokenizer.pad_token_id,
                                  bad_words_ids=lm._target_forms(target))
    start = torch.tensor([ids + head], device=lm.device)
    if target[-1].isalnum():
        step = _NewWord(lm.word_boundary_mask())
        step.width = start.shape[1]
        kwargs["logits_processor"] = LogitsProcessorList([step])
    with torch.no_grad(), model.disable_adapter():
        out = model.generate(input_ids=start, **kwargs)
    return head + _until_eos(lm, out[0, start.shape[1]:].tolist())


def _upto_target(text: str, target: str) -> str | None:
    i = text.casefold().find(target.casefold())
    return None if i < 0 else text[: i + len(target)]


def run_parity(backend, cases: Sequence[EditCase], cfg: ParityConfig,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """``backend``: an :class:`~app.eval.backends.InProcessBackend` (its runtime gives factpatch's
    own adapter-only answer)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from app.eval.backends import BackendError

    rt = backend.app.state.runtime
    lm = rt.lm
    modes = [m for m in cfg.modes if m != "chat" or lm.has_chat_template]
    source = getattr(lm.model.config, "_name_or_path", None)
    base = AutoModelForCausalLM.from_pretrained(source, dtype=lm.dtype).to(lm.device).eval()
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="factpatch-parity-") as tmp:
        for k, case in enumerate(cases[: cfg.n]):
            row: dict[str, Any] = {"case_id": case.case_id, "prompt": case.prompt, "target": case.target,
                                   "rephrase": case.paraphrase, "edit_id": None, "edit_error": None, "queries": []}
            rows.append(row)
            try:
                edit_id = row["edit_id"] = backend.edit(case, cfg.method).id
            except BackendError as exc:
                row["edit_error"] = f"{exc.status} {exc.code}"
                log(f"[{k + 1}/{cfg.n}] edit refused: {row['edit_error']}")
                continue
            r = backend.client.get(f"/edits/{edit_id}/adapter", headers=backend.headers)
            r.raise_for_status()
            folder = Path(tmp) / edit_id
            with zipfile.ZipFile(io.BytesIO(r.content)) as z:
                z.extractall(folder)
            model = PeftModel.from_pretrained(base, str(folder)).eval()
            delta = rt.deltas.get(edit_id)
            target = case.target.strip()
            try:
                for kind, q in (("prompt", case.prompt), ("rephrase", case.paraphrase)):
                    if not q:
                        continue
                    for mode in modes:
                        served = backend.request("GET", "/answer", params={
                            "q": q, "mode": mode, "max_new_tokens": cfg.max_new_tokens})
                        ids = lm.prompt_ids(q, mode)
                        [own] = lm.generate([q], max_new_tokens=cfg.max_new_tokens, mode=mode, deltas=[delta])
                        plain = _peft_generate(model, lm, ids, cfg.max_new_tokens)
                        two = _peft_two_step(model, lm, q, mode, target, cfg.max_new_tokens)
                        plain_text = lm.tokenizer.decode(plain, skip_special_tokens=True).strip()
                        two_text = lm.tokenizer.decode(two, skip_special_tokens=True).strip()
                        routed = served.get("edit_id") == edit_id
                        head_served, head_peft = _upto_target(served["answer"], target), _upto_target(plain_text, target)
                        row["queries"].append({
                            "kind": kind, "mode": mode, "query": q, "routed": routed,
                            "served": served["answer"], "adapter_only": own.text.strip(),
                            "peft": plain_text, "peft_two_step": two_text,
                            "adapter": plain == own.token_ids,
                            "target": routed and head_served is not None and head_served == head_peft,
                            "two_step": routed and two_text == served["answer"],
                            "plain": routed and plain_text == served["answer"],
                        })
            finally:
                base = model.unload()  # the base model without the adapter's layers, for the next edit
            ok = {c: all(q[c] for q in row["queries"]) for c in CHECKS}
            log(f"[{k + 1}/{cfg.n}] {case.prompt[:50]!r} -> {target!r}: "
                + " ".join(f"{c}={'ok' if v else 'DIFF'}" for c, v in ok.items()))
    return summarise(rows, cfg, modes, time.perf_counter() - t0, lm.name)


def summarise(rows: list[dict[str, Any]], cfg: ParityConfig, modes: list[str], seconds: float, model: str) -> dict[str, Any]:
    edited = [r for r in rows if r["edit_id"]]
    queries = [q for r in edited for q in r["queries"]]
    routed = [q for q in queries if q["routed"]]
    summary: dict[str, Any] = {
        "model": model, "n": cfg.n, "edits_made": len(edited), "max_new_tokens": cfg.max_new_tokens,
        "modes": modes, "queries": len(queries), "routed": len(routed), "seconds": round(seconds, 1),
        "edits_all_same": {}, "queries_same": {}, "routed_queries_same": {},
    }
    for c in CHECKS:
        summary["edits_all_same"][c] = sum(all(q[c] for q in r["queries"]) and bool(r["queries"]) for r in edited)
        summary["queries_same"][c] = sum(q[c] for q in queries)
        summary["routed_queries_same"][c] = sum(q[c] for q in routed)
    for kind in ("prompt", "rephrase"):
        qs = [q for q in queries if q["kind"] == kind]
        summary[f"{kind}_adapter_same"] = f"{sum(q['adapter'] for q in qs)}/{len(qs)}"
        summary[f"{kind}_target_same"] = f"{sum(q['target'] for q in qs)}/{len(qs)}"
    return {"summary": summary, "edits": rows}


def report_markdown(data: dict[str, Any]) -> str:
    s, env = data["summary"], data.get("env", {})
    n_edits, nq = s["edits_made"], s["queries"]
    lines = [
        "# Edits exported as PEFT adapters: same greedy answers as factpatch?",
        "",
        f"Command: `{env.get('command', 'factpatch export-parity ...')}`",
        "",
        f"Model {s['model']}; {n_edits} edits of {s['n']} made (all kept active); prompt and rephrase in "
        f"{' and '.join(s['modes'])} form: {nq} queries, {s['routed']} routed by the selector to their edit; "
        f"greedy, {s['max_new_tokens']} new tokens; {s['seconds']} s. Date {env.get('date', '?')}, "
        f"commit {env.get('git', {}).get('commit', '?') if isinstance(env.get('git'), dict) else env.get('git', '?')}.",
        "",
        "| comparison (PEFT adapter in a separate base model vs factpatch) | edits with every query the same "
        "| queries the same | routed queries the same |",
        "|---|---|---|---|",
    ]
    names = {
        "adapter": "PEFT greedy vs factpatch greedy with the delta applied throughout (token ids)",
        "target": "PEFT greedy vs `/answer`, up to the end of the target",
        "two_step": "PEFT with factpatch's answer rule (adapter until the target, then `disable_adapter()`) vs `/answer`, whole text",
        "plain": "PEFT plain greedy vs `/answer`, whole text",
    }
    for c in CHECKS:
        lines.append(f"| {names[c]} | {s['edits_all_same'][c]}/{n_edits} | {s['queries_same'][c]}/{nq} "
                     f"| {s['routed_queries_same'][c]}/{s['routed']} |")
    lines += ["", "Queries not routed to their edit get the base model's answer from `/answer` (the selector "
              "turned them away), which no adapter is meant to give; they count as different in the last three "
              "rows, and the last column leaves them out.", "", "## Differences", ""]
    diffs = 0
    for r in data["edits"]:
        for q in r["queries"]:
            if not all(q[c] for c in CHECKS):
                diffs += 1
                if diffs <= 40:
                    lines.append(f"- {q['kind']} ({q['mode']}) `{q['query']}` -> `{r['target']}`, routed {q['routed']}: "
                                 f"served `{q['served']}` | PEFT `{q['peft']}` | PEFT two-step `{q['peft_two_step']}`")
    if not diffs:
        lines.append("None.")
    return "\n".join(lines) + "\n"
