"""``factpatch eval`` / ``bench`` through typer's CliRunner: usage errors and one small real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli.common import parse_config
from app.cli.evaluate import standalone

runner = CliRunner()


def _cf_file(tmp_path: Path, n: int = 12) -> Path:
    records = [
        {"case_id": i, "prompt": f"The mother tongue of Person{i} is", "target_new": "French",
         "subject": f"Person{i}", "ground_truth": "English",
         "rephrase_prompt": f"Person{i} was born speaking", "locality_prompt": f"The capital of Country{i} is",
         "locality_ground_truth": "Town"}
        for i in range(n)
    ]
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(records))
    return p


def _usage_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.output.lower()
    for f in fragments:
        assert f.lower() in text, result.output


def test_missing_file_is_usage_error(tmp_path):
    res = runner.invoke(standalone(), ["eval", "--dataset", "zsre", "--file", str(tmp_path / "nope.json")])
    _usage_error(res, "nope.json", "does not exist")


def test_unknown_dataset_is_usage_error(tmp_path):
    res = runner.invoke(standalone(), ["eval", "--dataset", "squad", "--file", str(_cf_file(tmp_path))])
    _usage_error(res, "squad", "zsre", "counterfact")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_non_positive_n_is_usage_error(tmp_path, n):
    res = runner.invoke(standalone(), ["eval", "--dataset", "counterfact", "--file", str(_cf_file(tmp_path)), "--n", n])
    _usage_error(res, "--n")


def test_file_in_wrong_format_is_usage_error(tmp_path):
    res = runner.invoke(standalone(), ["eval", "--dataset", "zsre", "--file", str(_cf_file(tmp_path))])
    _usage_error(res, "no usable zsre record")


def test_bad_config_entry_is_usage_error(tmp_path):
    res = runner.invoke(standalone(), ["eval", "--dataset", "counterfact", "--file", str(_cf_file(tmp_path)),
                                       "--config", "steps"])
    _usage_error(res, "key=value")


def test_bench_bad_lists_are_usage_errors(tmp_path):
    _usage_error(runner.invoke(standalone(), ["bench", "--edits", "0,ten", "--out", str(tmp_path)]), "--edits")
    _usage_error(runner.invoke(standalone(), ["bench", "--keys", "0", "--out", str(tmp_path)]), "--keys")


def test_parse_config_reads_json_values():
    assert parse_config(["steps=20", "lr=0.01", "layers=[3,4]", "name=abc", "flag=true"]) == {
        "steps": 20, "lr": 0.01, "layers": [3, 4], "name": "abc", "flag": True,
    }


def _tiny_model_dir(tmp_path: Path) -> Path:
    from app.lm.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", len(tok))
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_small_real_run_writes_files_with_numbers_in_range(tmp_path):
    model_dir = _tiny_model_dir(tmp_path)
    out = tmp_path / "out"
    res = runner.invoke(standalone(), [
        "eval", "--dataset", "counterfact", "--file", str(_cf_file(tmp_path)), "--n", "5", "--method", "pnp",
        "--config", "max_steps=3", "--curve-every", "2", "--held", "3", "--latency-probe", "1", "--model", str(model_dir), "--out", str(out),
    ])
    assert res.exit_code == 0, res.output + repr(res.exception)
    for name in ("results.json", "report.md", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["base (no edits)", "pnp"]
    assert data["rows"][1]["n"] == 5 and len(data["cases"]) == 5
    for row in data["rows"]:
        for key in ("rel_tf", "rel_em", "gen_tf", "gen_em", "loc_tf", "loc_em"):
            stat = row[key]
            assert stat["n"] > 0 and 0.0 <= stat["low"] <= stat["mean"] <= stat["high"] <= 1.0, (row["name"], key)
    assert [p["edits"] for p in data["curves"]] == [2, 4, 5]
    assert 0.0 <= data["routing"]["accuracy"] <= 1.0
    assert data["dataset"]["sha256"] and data["model_id"] and data["env"]["git"]["commit"]
    assert data["timing"]["edit_wall_ms"]["n"] + sum(data["extra"]["edit_errors"].values()) == 5
    assert data["timing"]["answer_ms_base"]["n"] == 1
    md = (out / "report.md").read_text()
    assert "reliability (greedy EM)" in md and data["dataset"]["sha256"] in md


# -- bench parts that need no model ----------------------------------------------------------------
def test_bench_selector_lookup_points(tmp_path):
    pytest.importorskip("app.selector.router")
    from app.eval.bench import BenchConfig, bench_selector

    cfg = BenchConfig(keys=[100, 400], lookups=20, repeats=2, encoder_timing=False)
    res = bench_selector(cfg)
    assert [(p["keys"], p["rule"]) for p in res["points"]] == [
        (100, "subject"), (100, "similarity"), (100, "subjectless"),
        (400, "subject"), (400, "similarity"), (400, "subjectless")]
    for p in res["points"]:
        assert p["lookup_ms"]["n"] == 2 and 0 < p["lookup_ms"]["min"] <= p["lookup_ms"]["median"]
    assert res["peak_rss_mib"] > 0


def test_load_run_counts_latencies_and_errors():
    import http.server
    import threading

    from app.eval.bench import load_run

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # every third query fails
            bad = "fail" in self.path
            self.send_response(500 if bad else 200)
            self.end_headers()
            self.wfile.write(b'{"answer": "x"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        res = load_run(url, "k", ["a", "b", "fail"], clients=3, requests=12, seconds=30, max_new_tokens=2)
    finally:
        server.shutdown()
    assert res["sent"] == 12 and res["ok"] == 8 and res["errors"] == 4
    assert res["error_kinds"] == ["HTTP 500"]
    assert res["p50"] <= res["p95"] <= res["p99"]


def test_bench_report_files(tmp_path):
    from app.eval.report import environment, write_bench

    s = {"n": 2, "median": 10.0, "min": 9.0, "max": 11.0, "iqr": 1.0}
    results = {
        "kind": "bench", "model_id": "m", "env": environment(["bench"]), "elapsed_s": 1.0, "peak_rss_mib": 100.0,
        "config": {"repeats": 2, "max_new_tokens": 4, "prompts": 2},
        "answer": {"synthetic": "selector-only", "points": [
            {"edits": 0, "served_ms": s, "plain_ms": s, "ratio": s, "served_rps": s, "same_text": 1.0},
            {"edits": 100, "skipped": "no importer"}]},
        "selector": {"encode_ms": s, "points": [{"rule": "subject", "keys": 1000, "edits": 500, "lookup_ms": s,
                                                  "lookup_p95_ms": 0.2, "build_ms": 3.0}]},
        "edits": {"pnp": {"edit_wall_ms": s, "fit_ms": s, "errors": []}},
        "load": {"skipped": "--requests 0"},
    }
    files = write_bench(results, tmp_path)
    assert set(files) == {"json", "md", "png"} and all(p.stat().st_size > 0 for p in files.values())
    md = files["md"].read_text()
    assert "| 0 | 10.0 (9.0..11.0)" in md and "no importer" in md and "load: skipped" in md


# -- the HTTP backend against a mock transport ---------------------------------------------------------
def test_api_backend_speaks_the_contract():
    import httpx

    from app.eval.backends import ApiBackend, BackendError
    from app.eval.datasets import EditCase

    seen: list[tuple[str, str, dict | None, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body, request.headers.get("authorization")))
        path = request.url.path
        if path == "/edits" and request.method == "POST":
            if body["target"] == "bad":
                return httpx.Response(422, json={"error": {"code": "target_already_holds", "message": "no-op"}})
            return httpx.Response(201, json={"id": "e1", "status": "active", "metrics": {"train_ms": 12.5}})
        if path == "/score":
            return httpx.Response(200, json={"results": [
                {"logprob": -1.0, "token_accuracy": 0.5, "all_correct": False, "edit_id": None, "similarity": None}
                for _ in body["items"]]})
        if path == "/answer":
            return httpx.Response(200, json={"results": [
                {"answer": q.upper(), "edit_id": "e1", "similarity": 0.9, "model": "m", "latency_ms": 3.0}
                for q in body["queries"]]})
        if path == "/edits" and request.method == "GET":
            page = request.url.params.get("cursor")
            return httpx.Response(200, json={"items": [{"id": "b"}] if page else [{"id": "a"}],
                                             "next_cursor": None if page else "c2"})
        if path == "/health":
            return httpx.Response(200, json={"status": "ok", "model": "tiny"})
        if path == "/admin/edits/e1/revert":
            return httpx.Response(200, json={"id": "e1", "status": "reverted"})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    client = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://svc")
    b = ApiBackend(client, "k3y", batch=2)
    case = EditCase("1", "P is", "T", "P", "old", "paraphrase of P", "unrelated", "u")
    out = b.edit(case, "pnp", {"max_steps": 3})
    assert (out.id, out.fit_ms) == ("e1", 12.5) and out.wall_ms >= 0
    method, path, body, auth = seen[-1]
    assert body == {"prompt": "P is", "target": "T", "subject": "P", "method": "pnp", "config": {"max_steps": 3}}
    assert auth == "Bearer k3y"
    with pytest.raises(BackendError) as err:
        b.edit(EditCase("2", "Q is", "bad"), "pnp")
    assert err.value.status == 422 and err.value.code == "target_already_holds"
    scores = b.score([("a", "b")] * 5, "completion")
    assert len(scores) == 5 and scores[0].token_accuracy == 0.5
    assert sum(1 for s in seen if s[1] == "/score") == 3  # chunked by the batch size
    answers = b.answer(["x", "y", "z"], "completion", 4)
    assert [a.answer for a in answers] == ["X", "Y", "Z"] and answers[0].edit_id == "e1"
    assert b.active_edit_ids() == ["a", "b"]
    assert b.model_id() == "tiny"
    b.revert("e1")
    assert seen[-1][:2] == ("POST", "/admin/edits/e1/revert")


def test_unreachable_service_is_a_clear_error(tmp_path):
    from app.eval.bench import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = runner.invoke(standalone(), ["eval", "--dataset", "counterfact", "--file", str(_cf_file(tmp_path)),
                                       "--n", "2", "--url", url, "--key", "k", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1, res.output
    assert "eval stopped" in res.output and not (tmp_path / "o").exists()


def test_mode_both_reports_rows_per_form_with_user_view(tmp_path):
    model_dir = _tiny_model_dir(tmp_path)
    out = tmp_path / "out"
    res = runner.invoke(standalone(), [
        "eval", "--dataset", "counterfact", "--file", str(_cf_file(tmp_path, 5)), "--n", "3", "--start", "1",
        "--method", "pnp", "--config", "max_steps=2", "--held", "0", "--latency-probe", "0", "--mode", "both",
        "--fluency-n", "2",
        "--model", str(model_dir), "--out", str(out),
    ])
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["base (no edits) (completion)", "pnp (completion)",
                                                  "base (no edits) (chat)", "pnp (chat)"]
    assert [r["mode"] for r in data["rows"]] == ["completion", "completion", "chat", "chat"]
    for row in data["rows"]:
        assert row["subject_locality"]["n"] == 3 and 0.0 <= row["subject_locality"]["mean"] <= 1.0
        assert row["fluency"]["ge"]["n"] == 2 and row["fluency"]["ge"]["mean"] >= 0.0
        assert row["repeat_rate"]["n"] == 4
    assert data["rows"][3]["rel_free"]["n"] == 2 and data["rows"][1]["rel_free"]["n"] == 0
    assert data["user_view"]["fluency_cases"] == 2 and data["config"]["mode"] == "both"
    md = (out / "report.md").read_text()
    assert "subject locality (greedy EM)" in md and "pnp (chat)" in md and "Cases each metric covers" in md
    # --start 1: records 1-3 are edited, in file order
    assert [c["case_id"] for c in data["cases"][:3]] == ["1", "2", "3"]
    assert set(data["timing"]["stages_s"]) >= {"editing", "final measurement (chat)", "base model (completion)"}

    # A subset over every case reproduces the run's own rows; a smaller one covers only its cases.
    res = runner.invoke(standalone(), ["eval-subset", str(out), "--cases", "0-9", "--name", "all"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = runner.invoke(standalone(), ["eval-subset", str(out), "--cases", "2", "--name", "one"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    data2 = json.loads((out / "results.json").read_text())
    whole, one = (s["rows"] for s in data2["subsets"])
    for a, b in zip(data2["rows"], whole):
        assert {k: v for k, v in a.items() if k not in ("name", "held_accuracy", "performance_deterioration", "fu_ratio")} \
            == {k: v for k, v in b.items() if k != "name"}
    assert [r["n"] for r in one] == [1, 1, 1, 1] and data2["subsets"][1]["n"] == 1
    assert "## Subset: one" in (out / "report.md").read_text()
    _usage_error(runner.invoke(standalone(), ["eval-subset", str(out), "--cases", "7-9", "--name", "x"]), "no case")
    _usage_error(runner.invoke(standalone(), ["eval-subset", str(out), "--cases", "a-b", "--name", "x"]), "range")


def test_base_from_reuses_a_base_run_and_reports_the_same_rows(tmp_path):
    """A pnp run that takes its base-model measurements from a `--method none` run on the same cases
    reports the rows of a run that measured everything itself; another run's settings are refused."""
    model_dir = _tiny_model_dir(tmp_path)
    data_file = _cf_file(tmp_path, 6)
    common = ["--dataset", "counterfact", "--file", str(data_file), "--n", "4", "--config", "max_steps=2",
              "--held", "2", "--latency-probe", "0", "--mode", "both", "--fluency-n", "2", "--model", str(model_dir)]
    outs = {name: tmp_path / name for name in ("full", "base", "reuse", "bad")}
    res = runner.invoke(standalone(), ["eval", *common, "--method", "pnp", "--out", str(outs["full"])])
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = runner.invoke(standalone(), ["eval", *common, "--method", "none", "--out", str(outs["base"])])
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = runner.invoke(standalone(), ["eval", *common, "--method", "pnp", "--out", str(outs["reuse"]),
                                       "--base-from", str(outs["base"] / "results.json")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    full = json.loads((outs["full"] / "results.json").read_text())
    reuse = json.loads((outs["reuse"] / "results.json").read_text())
    assert reuse["extra"]["base_from"]["file"].endswith("results.json")
    assert "base model (completion)" not in reuse["timing"]["stages_s"]
    assert [r["name"] for r in reuse["rows"]] == [r["name"] for r in full["rows"]]
    for a, b in zip(full["rows"], reuse["rows"]):
        assert a == b, a["name"]
    assert reuse["held"]["case_ids"] == full["held"]["case_ids"]
    # A base run of other cases is refused, and nothing is written.
    res = runner.invoke(standalone(), ["eval", *common[:4], "--n", "3", *common[6:], "--method", "pnp",
                                       "--out", str(outs["bad"]), "--base-from", str(outs["base"] / "results.json")])
    assert res.exit_code == 1 and "other settings" in res.output, res.output
    assert not (outs["bad"] / "results.json").exists()
    # A base run that asked other subject questions is refused before the first edit, not after the last.
    tampered = json.loads((outs["base"] / "results.json").read_text())
    for case in tampered["base_cases"]:
        if case["case_id"] == tampered["base_cases"][0]["case_id"]:
            case["subj_queries"] = ["What colour is the sky?"]
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    res = runner.invoke(standalone(), ["eval", *common, "--method", "pnp", "--out", str(outs["bad"]),
                                       "--base-from", str(tmp_path / "tampered.json")])
    assert res.exit_code == 1 and "other subject-locality questions" in res.output, res.output
    assert "editing" not in res.output and not (outs["bad"] / "results.json").exists(), res.output
    # With --base-reask the base model answers this run's subject questions before the first edit: the
    # rows are those of the run that measured everything itself.
    reask = tmp_path / "reask"
    res = runner.invoke(standalone(), ["eval", *common, "--method", "pnp", "--out", str(reask),
                                       "--base-from", str(tmp_path / "tampered.json"), "--base-reask"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    again = json.loads((reask / "results.json").read_text())
    assert again["extra"]["base_from"]["subject_questions_asked_here"] == 1
    for a, b in zip(full["rows"], again["rows"]):
        assert a == b, a["name"]
    first = [c for c in again["base_cases"] if c["case_id"] == tampered["base_cases"][0]["case_id"]]
    assert first and all(c["subj_queries"] != ["What colour is the sky?"] for c in first)
    # A file that did not record its questions cannot show they are the same: every case is asked again.
    unrecorded = json.loads((outs["base"] / "results.json").read_text())
    for case in unrecorded["base_cases"]:
        case["subj_queries"] = None
    (tmp_path / "unrecorded.json").write_text(json.dumps(unrecorded))
    res = runner.invoke(standalone(), ["eval", *common, "--method", "pnp", "--out", str(tmp_path / "unrec"),
                                       "--base-from", str(tmp_path / "unrecorded.json"), "--base-reask"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    asked = json.loads((tmp_path / "unrec" / "results.json").read_text())["extra"]["base_from"]
    assert asked["subject_questions_asked_here"] == 4
