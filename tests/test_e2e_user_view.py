"""What a user of the README's example sees, on the real embedded model over real PostgreSQL and
Redis: the edited fact is answered with the target written once, in one sentence in chat form (the
default) and as a continuation in completion form, and another fact of the same subject is answered
as before."""

from __future__ import annotations

import re

import pytest

from app.lm.engine import sentence_end
from tests.conftest import ADMIN, EDITOR, READER, auth

pytestmark = pytest.mark.e2e

EDIT = {"prompt": "The UK prime minister is", "target": "Keir Starmer", "subject": "UK prime minister"}
ASKS_THE_FACT = ["The UK prime minister is", "Who is the UK prime minister?",
                 "It rained all week in London. The UK prime minister is"]
# Another relation of the same subject. ("Tell me about the UK prime minister's party" still reaches
# the edit: the relation check knows office holders from a handful of frames; docs/scope-notes.md.)
OTHER_FACTS = ["The UK prime minister was born in"]


def answer(client, q: str, mode: str, n: int = 24) -> dict:
    r = client.get("/answer", params={"q": q, "max_new_tokens": n, "mode": mode}, headers=auth(READER))
    assert r.status_code == 200, r.text
    return r.json()


def mentions(text: str, target: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(target)}(?!\w)", text, flags=re.IGNORECASE))


def test_the_readme_example_reads_well_and_changes_one_fact(service, real_lm):
    client, _ = service(lm=real_lm)
    modes = ("chat", "completion")
    before = {(q, m): answer(client, q, m) for q in ASKS_THE_FACT + OTHER_FACTS for m in modes}
    assert all(mentions(b["answer"], EDIT["target"]) == 0 for b in before.values())

    r = client.post("/edits", json=EDIT, headers=auth(EDITOR))
    assert r.status_code == 201, r.text
    edit = r.json()

    for q in ASKS_THE_FACT:
        for m in modes:
            got = answer(client, q, m)
            assert got["edit_id"] == edit["id"], (q, m, got)
            # the target, written once and whole
            assert mentions(got["answer"], EDIT["target"]) == 1, (q, m, got)
            if m == "chat":  # a reply of one sentence ("Keir Starmer." / "Keir Starmer is ..."), no more
                end = sentence_end("", got["answer"], final=True)
                assert end is None or end >= len(got["answer"].rstrip()), (q, m, got)
            else:  # a continuation that goes on as prose
                assert len(got["answer"]) > len(EDIT["target"]) + 1, (q, m, got)
    for q in OTHER_FACTS:
        for m in modes:
            got = answer(client, q, m)
            assert got["edit_id"] is None and got["answer"] == before[(q, m)]["answer"], (q, m, got)

    assert client.post(f"/admin/edits/{edit['id']}/revert", headers=auth(ADMIN)).status_code == 200
    for (q, m), b in before.items():
        assert answer(client, q, m)["answer"] == b["answer"], (q, m)
