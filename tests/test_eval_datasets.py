"""Dataset loaders on small temporary files in the public formats; bad records counted."""

from __future__ import annotations

import hashlib
import json

import pytest

from app.eval.datasets import DatasetError, load_dataset, select


def _write(tmp_path, name, records, lines=False):
    p = tmp_path / name
    if lines:
        p.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        p.write_text(json.dumps(records))
    return p


ZSRE = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
     "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
     "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak"},
    {"subject": "Michaela", "src": "What gender is Michaela?", "rephrase": "Which sex is Michaela?", "alt": "",
     "answers": ["female"], "loc": "nq question: who plays the cat in the hat movie", "loc_ans": "Mike Myers"},
    {"subject": "X", "src": "  ", "alt": "y", "answers": ["z"], "loc": "nq question: q", "loc_ans": "a"},
    {"subject": "WEFS", "src": "When was WEFS established?", "alt": " 1997 ", "answers": [],
     "loc": "nq question: who sang it", "loc_ans": "Someone"},
]

COUNTERFACT = [
    {"case_id": 10, "prompt": "BBC One, by", "target_new": "Sega", "subject": "BBC One", "ground_truth": "BBC",
     "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
     "locality_prompt": "BBC Radio, by", "locality_ground_truth": "BBC"},
    {"case_id": 11, "prompt": "Paris is the capital of", "target_new": "   ", "subject": "Paris",
     "ground_truth": "France", "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "g"},
    "not a record",
]


def test_zsre_fields_and_skips(tmp_path):
    p = _write(tmp_path, "z.json", ZSRE)
    ds = load_dataset("zsre", p)
    assert len(ds.cases) == 2 and ds.skipped == 2 and ds.total == 4
    assert ds.skip_reasons == {"empty target": 1, "empty prompt": 1}
    c = ds.cases[0]
    assert c.prompt == "What is the product made by UniFirst?" and c.target == "unmanned aircraft"
    assert c.paraphrase == "What will be the product of UniFirst?"
    assert c.locality_prompt == "john goodman's character in the big lebowski"  # "nq question: " stripped
    assert c.locality_answer == "Walter Sobchak" and c.truth == "uniform" and c.subject == "UniFirst"
    assert ds.cases[1].target == "1997" and ds.cases[1].truth is None
    assert ds.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_counterfact_fields_and_skips(tmp_path):
    p = _write(tmp_path, "c.json", COUNTERFACT)
    ds = load_dataset("counterfact", p)
    assert ds.skipped == 2 and ds.skip_reasons == {"empty target": 1, "not an object": 1}
    (c,) = ds.cases
    assert (c.case_id, c.prompt, c.target, c.subject, c.truth) == ("10", "BBC One, by", "Sega", "BBC One", "BBC")
    assert c.paraphrase.startswith("BBC One is my favorite")
    assert (c.locality_prompt, c.locality_answer) == ("BBC Radio, by", "BBC")


def test_json_lines_accepted(tmp_path):
    p = _write(tmp_path, "c.jsonl", COUNTERFACT[:1], lines=True)
    assert len(load_dataset("counterfact", p).cases) == 1


def test_unusable_files_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("squad", _write(tmp_path, "a.json", ZSRE))
    with pytest.raises(DatasetError, match="no usable"):
        load_dataset("counterfact", _write(tmp_path, "b.json", ZSRE))  # wrong format: nothing usable
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError):
        load_dataset("zsre", bad)


def test_select_first_or_seeded_sample(tmp_path):
    cases = load_dataset("counterfact", _write(tmp_path, "c.json", [
        dict(COUNTERFACT[0], case_id=i, prompt=f"P{i} by") for i in range(20)
    ])).cases
    edit, rest = select(cases, 5)
    assert [c.case_id for c in edit] == ["0", "1", "2", "3", "4"] and len(rest) == 15
    a, _ = select(cases, 5, shuffle=True, seed=1)
    b, _ = select(cases, 5, shuffle=True, seed=1)
    c, _ = select(cases, 5, shuffle=True, seed=2)
    assert a == b and a != c
    assert not {x.case_id for x in a} & {x.case_id for x in select(cases, 5, shuffle=True, seed=1)[1]}


def test_shared_data_files_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not root.exists():
        pytest.skip("shared data not present")
    z = load_dataset("zsre", root / "zsre/zsre_train_1k.json")
    assert z.total == 1000 and z.skipped == z.skip_reasons["empty target"] >= 1
    c = load_dataset("counterfact", root / "counterfact/counterfact_val.json")
    assert c.total == 1919 and all(x.paraphrase and x.locality_prompt for x in c.cases)
