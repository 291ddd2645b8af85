"""``factpatch eval`` / ``bench`` through typer's CliRunner: usage errors and one small real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.eval.cli import parse_config, standalone

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
