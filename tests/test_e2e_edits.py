"""End to end with the real embedded model over real PostgreSQL and Redis: an edit holds for its
prompt and a paraphrase, leaves unrelated questions alone, and a revert gives the base model back."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ADMIN, EDITOR, READER, ask, auth

pytestmark = pytest.mark.e2e

PROMPT = "The mother tongue of Danielle Darrieux is"
PARAPHRASE = "Danielle Darrieux's mother tongue is"
UNRELATED = ["The capital of France is", "The mother tongue of Albert Einstein is"]



def test_edit_paraphrase_locality_and_revert_on_the_real_model(service, real_lm):
    client, _ = service(lm=real_lm)
    before = {q: ask(client, q)["answer"] for q in [PROMPT, PARAPHRASE, *UNRELATED]}
    assert not before[PROMPT].startswith("Swedish")

    r = client.post("/edits", json={"prompt": PROMPT, "target": "Swedish", "subject": "Danielle Darrieux",
                                     "config": {"subject_templates": 8}},
                    headers=auth(EDITOR))
    assert r.status_code == 201, r.text
    edit = r.json()
    assert edit["metrics"]["success"] == 1.0

    for q in (PROMPT, PARAPHRASE):
        got = ask(client, q)
        assert got["edit_id"] == edit["id"], (q, got)
        # the whole target, ending where it ends (not run on into "Swedishness")
        assert re.match(r"Swedish(\W|$)", got["answer"]), (q, got)
    for q in UNRELATED:
        got = ask(client, q)
        assert got["edit_id"] is None and got["answer"] == before[q], (q, got)

    assert client.post(f"/admin/edits/{edit['id']}/revert", headers=auth(ADMIN)).status_code == 200
    for q in (PROMPT, PARAPHRASE, *UNRELATED):
        got = ask(client, q)
        assert got["edit_id"] is None and got["answer"] == before[q], (q, got)


def test_ke_edit_reaches_chat_answers_and_reverts_on_the_real_model(service, real_lm):
    """The shipped editor: one `ke` edit changes the answer in chat form (the default) and in completion
    form, leaves an unrelated question alone, and a revert gives the base model's answers back."""
    client, _ = service(lm=real_lm)

    def answers(q: str) -> dict:
        out = {}
        for mode in ("chat", "completion"):
            r = client.get("/answer", params={"q": q, "max_new_tokens": 8, "mode": mode}, headers=auth(READER))
            assert r.status_code == 200, r.text
            out[mode] = r.json()
        return out

    before = {q: answers(q) for q in (PROMPT, UNRELATED[0])}
    assert not any(a["answer"].lstrip().startswith("Swedish") for a in before[PROMPT].values())

    r = client.post("/edits", json={"prompt": PROMPT, "target": "Swedish", "subject": "Danielle Darrieux",
                                     "method": "ke"}, headers=auth(EDITOR))
    assert r.status_code == 201, r.text
    edit = r.json()
    assert edit["method"] == "ke" and edit["metrics"]["success"] == 1.0, edit["metrics"]

    after = answers(PROMPT)
    for mode, got in after.items():
        assert got["edit_id"] == edit["id"] and got["answer"].lstrip().startswith("Swedish"), (mode, got)
    other = answers(UNRELATED[0])
    for mode, got in other.items():
        assert got["edit_id"] is None and got["answer"] == before[UNRELATED[0]][mode]["answer"], (mode, got)

    assert client.post(f"/admin/edits/{edit['id']}/revert", headers=auth(ADMIN)).status_code == 200
    for q in (PROMPT, UNRELATED[0]):
        for mode, got in answers(q).items():
            assert got["edit_id"] is None and got["answer"] == before[q][mode]["answer"], (q, mode, got)
