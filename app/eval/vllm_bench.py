"""`factpatch vllm-bench`: the vLLM engine against the local engine, side by side in one run.

One runtime over a PostgreSQL schema and Redis prefix of its own, with FACTPATCH_ENGINE=vllm
against a running server (scripts/vllm.sh). First it stores ``--edits`` CounterFact edits. Then it
answers the same queries (each edit's prompt in both forms, its paraphrase, and other facts'
prompts that route to no edit) with the vLLM engine and with the local one, greedy, and counts
identical texts. Last, ``--clients`` concurrent HTTP clients send `GET /answer` to the app (served
by uvicorn in this process) for ``--seconds`` per engine, and their answers per second are compared.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import typer


def vllm_bench_command(
    vllm_url: str = typer.Option(..., help="The running vLLM server (scripts/vllm.sh)."),
    edits: int = typer.Option(100, help="Active edits (CounterFact val records, in file order)."),
    queries: int = typer.Option(100, help="Queries compared between the engines."),
    clients: int = typer.Option(8, help="Concurrent clients in the throughput run."),
    seconds: float = typer.Option(30.0, help="Length of each engine's throughput run."),
    max_new_tokens: int = typer.Option(16, help="Tokens per answer."),
    data: Path = typer.Option(Path("/work/shared/data/counterfact/counterfact_val.json"), help="CounterFact file."),
    database_url: str = typer.Option("postgresql+psycopg://postgres@127.0.0.1:5432/test", help="PostgreSQL URL."),
    redis_url: str = typer.Option("redis://127.0.0.1:6379/0", help="Redis URL."),
    threads: int = typer.Option(1, help="torch threads of the local model."),
    out: Optional[Path] = typer.Option(None, help="Folder for results.json and report.md."),
) -> None:
    """vLLM engine vs local engine: same text on edited and unedited queries, /answer throughput."""
    import torch

    from app.eval.datasets import load_dataset
    from app.runtime import Runtime
    from app.services.answers import AnswerService
    from app.services.edits import EditInput
    from app.settings import Settings
    from app.store import Database

    torch.set_num_threads(threads)
    run = uuid.uuid4().hex[:8]
    schema, prefix = f"vllmbench_{run}", f"fpvllmbench:{run}"
    settings = Settings(home=Path("~/.factpatch").expanduser(), database_url=database_url, database_schema=schema,
                        redis_url=redis_url, redis_prefix=prefix, engine="vllm", vllm_url=vllm_url,
                        admin_key=f"fp_bench_admin_{run}", reader_key=f"fp_bench_reader_{run}")
    rt = Runtime.build(settings)
    try:
        cases = load_dataset("counterfact", data).cases[:edits + queries]
        stored, t0 = [], time.monotonic()
        for case in cases[:edits]:
            req = EditInput(prompt=case.prompt, target=case.target, subject=case.subject)
            try:
                stored.append((case, rt.edits.create(req, actor="bench").edit.id))
            except Exception as exc:  # noqa: BLE001 - e.g. target_already_holds: counted, not fatal
                print(f"edit {case.case_id} not stored: {getattr(exc, 'code', type(exc).__name__)}")
        edit_s = time.monotonic() - t0
        print(f"{len(stored)} edits stored in {edit_s:.0f} s")
        qs: list[tuple[str, str, str]] = []  # (query, mode, kind)
        for case, _ in stored:
            qs.append((case.prompt, "completion", "edited"))
            qs.append((case.prompt, "chat", "edited"))
            if case.paraphrase:
                qs.append((case.paraphrase, "completion", "paraphrase"))
        others = [c for c in cases[edits:]] + [c for c, _ in stored]
        for case in others:
            if case.locality_prompt:
                qs.append((case.locality_prompt, "completion", "unedited"))
        # Half edited (prompt, chat, paraphrase), half unedited, ``queries`` in all.
        edited = [q for q in qs if q[2] != "unedited"][: queries // 2]
        unedited = [q for q in qs if q[2] == "unedited"][: queries - len(edited)]
        qs = edited + unedited
        local = AnswerService(rt.lm, rt.selector, rt.deltas)
        rows, same = [], 0
        for q, mode, kind in qs:
            v = rt.answers.answer([q], max_new_tokens=max_new_tokens, mode=mode)[0]
            lo = local.answer([q], max_new_tokens=max_new_tokens, mode=mode)[0]
            same += v.answer == lo.answer
            rows.append({"query": q, "mode": mode, "kind": kind, "edit_id": v.edit_id, "vllm": v.answer,
                         "local": lo.answer, "same": v.answer == lo.answer})
        by_kind = {}
        for kind in sorted({r["kind"] for r in rows}):
            ks = [r for r in rows if r["kind"] == kind]
            by_kind[kind] = {"n": len(ks), "same": sum(r["same"] for r in ks),
                             "routed_to_an_edit": sum(r["edit_id"] is not None for r in ks)}
        throughput = {}
        engine = rt.answers.engine
        for name in ("local", "vllm"):
            rt.answers.engine = engine if name == "vllm" else None
            throughput[name] = _throughput(rt, [(q, m) for q, m, _ in qs], clients, seconds, max_new_tokens,
                                           settings.reader_key.get_secret_value())
        rt.answers.engine = engine
        result = {
            "model": rt.lm.name, "vllm_url": vllm_url, "edits_active": len(stored), "edit_seconds": round(edit_s, 1),
            "queries": len(rows), "same_text": same, "same_rate": round(same / len(rows), 4) if rows else None,
            "by_kind": by_kind, "max_new_tokens": max_new_tokens, "throughput": throughput,
            "speedup": round(throughput["vllm"]["answers_per_s"] / throughput["local"]["answers_per_s"], 2)
            if throughput["local"]["answers_per_s"] else None,
            "differences": [r for r in rows if not r["same"]][:20],
        }
    finally:
        rt.close()
        Database(database_url, schema).drop_schema()
        import redis

        r = redis.Redis.from_url(redis_url)
        left = list(r.scan_iter(f"{prefix}:*"))
        if left:
            r.delete(*left)
        r.close()
    print(json.dumps({k: v for k, v in result.items() if k != "differences"}, indent=2))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "report.md").write_text(_report(result, edits, queries, clients, seconds, max_new_tokens))


def _throughput(rt, queries, clients: int, seconds: float, max_new_tokens: int, key: str) -> dict:
    """``clients`` threads sending `GET /answer` to the app served by uvicorn in this process."""
    import httpx
    import uvicorn

    from app.eval.replicas import free_port
    from app.main import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime=rt), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        with httpx.Client(timeout=120) as http:
            i = k
            while time.monotonic() < stop_at:
                q, mode = queries[i % len(queries)]
                t = time.monotonic()
                r = http.get(f"http://127.0.0.1:{port}/answer", params={"q": q, "mode": mode,
                             "max_new_tokens": max_new_tokens}, headers={"Authorization": f"Bearer {key}"})
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.monotonic() - t)
                    else:
                        errors[0] += 1
                i += clients

    t0 = time.monotonic()
    workers = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - t0
    server.should_exit = True
    thread.join(10)
    return {"answers": len(latencies), "errors": errors[0], "seconds": round(elapsed, 1),
            "answers_per_s": round(len(latencies) / elapsed, 3),
            "latency_s_median": round(statistics.median(latencies), 3) if latencies else None}


def _report(r: dict, edits: int, queries: int, clients: int, seconds: float, max_new_tokens: int) -> str:
    cmd = (f"PYTHONPATH=$PWD python -m app.cli vllm-bench --vllm-url {r['vllm_url']} --edits {edits} "
           f"--queries {queries} --clients {clients} --seconds {seconds:g} --max-new-tokens {max_new_tokens} "
           f"--out results/vllm-engine")
    t = r["throughput"]
    lines = [
        "# vLLM engine vs local engine", "",
        f"Command (vLLM started with `scripts/vllm.sh`): `{cmd}`", "",
        f"Model {r['model']}; {r['edits_active']} active edits (CounterFact val, in file order, stored in "
        f"{r['edit_seconds']} s); greedy, {r['max_new_tokens']} new tokens.", "",
        "| what | vLLM engine | local engine | target |", "|---|---|---|---|",
        f"| same text as the local engine | {r['same_text']} of {r['queries']} ({100 * r['same_rate']:.1f}%) | | ≥ 95% of 100 queries with 100 active edits |",
        f"| `/answer` answers/s, {clients} concurrent clients, {seconds:g} s | {t['vllm']['answers_per_s']} "
        f"(median {t['vllm']['latency_s_median']} s) | {t['local']['answers_per_s']} (median {t['local']['latency_s_median']} s) "
        f"| vLLM ≥ 3× local (here {r['speedup']}×) |",
        "", "| queries | n | same text | routed to an edit |", "|---|---|---|---|",
    ]
    for kind, k in r["by_kind"].items():
        lines.append(f"| {kind} | {k['n']} | {k['same']} | {k['routed_to_an_edit']} |")
    lines += ["", "Differences (first 20) are in results.json.", ""]
    return "\n".join(lines)
