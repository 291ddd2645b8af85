"""KnowledgeEditor (`ke`) and the fine-tuning baselines (`ft`, `ft_constrained`) on tiny random
models: a tiny editor trains in seconds and round-trips through safetensors; an edit changes the
answer and a revert restores it; a missing editor is a clear 409; a global edit (`"routed":
false`) applies to every query until reverted."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ADMIN, EDITOR, READER, auth, wait_until

FACTS = [
    ("The favourite colour of Zorblax Quint is", "ultraviolet"),
    ("The capital city of Vendoria is", "Brightwater"),
    ("The instrument Mela Trask plays is the", "bassoon"),
    ("The home team of Oskar Penn is", "Riverside"),
]
UNRELATED = ["The capital of Norway is", "I had breakfast at"]


@pytest.fixture(scope="module")
def lm():
    from app.lm.testing import tiny_lm

    return tiny_lm("llama", seed=7)  # its own model: an attached editor must not reach other tests


@pytest.fixture(scope="module")
def trained(lm, tmp_path_factory):
    from app.methods.ke.train import Record, TrainConfig, train_editor

    records = [Record(p, t, [f"Tell me: {p}"], UNRELATED) for p, t in FACTS]
    out = tmp_path_factory.mktemp("ke-run")
    cfg = TrainConfig(steps=6, val_every=3, checkpoint_every=3, gain=1e4)
    summary = train_editor(lm, records, records[:2], cfg, out)
    return out, summary


def _holds(lm, prompt, target, delta=None) -> bool:
    return lm.score([prompt], [target], mode="completion", deltas=[delta] if delta else None)[0].all_correct


def test_tiny_editor_trains_with_checkpoint_curve_and_resume(lm, trained):
    import json

    from app.methods.ke.train import TrainConfig, train_editor

    out, summary = trained
    assert summary["finished"] and summary["steps"] == 6
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in curve] == [0, 3, 6]
    assert all(0.0 <= p["success"] <= 1.0 and p["unrelated_kl"] >= 0.0 for p in curve)
    assert (out / "checkpoint.safetensors").exists() and (out / "editor.safetensors").exists()
    # Resuming a finished run to more steps continues from its checkpoint, not from scratch.
    from app.methods.ke.train import Record

    records = [Record(p, t, [], UNRELATED) for p, t in FACTS]
    more = train_editor(lm, records, records[:1], TrainConfig(steps=8, val_every=100, checkpoint_every=100),
                        out, resume=True)
    assert more["steps"] == 8 and more["finished"]


def test_unrelated_inputs_can_carry_the_base_models_own_continuation(lm, trained):
    """With ``unrelated_continuation`` the KL constraint also covers the positions where the base model
    writes its answer to an unrelated input: the greedy continuation of the model without the edit."""
    from app.methods.ke import editor as E
    from app.methods.ke.train import _unrelated_batch, _unrelated_kl

    text = UNRELATED[0]
    prompt = lm.prompt_ids(text, "completion")
    cont = lm.generate([text], max_new_tokens=5, mode="completion", deltas=[])[0].token_ids
    assert cont, "the tiny model writes something"
    ids, attn = _unrelated_batch(lm, [text], 5)
    assert ids[0, : int(attn[0].sum())].tolist() == prompt + cont
    plain_ids, _ = _unrelated_batch(lm, [text])
    assert plain_ids[0].tolist() == prompt
    # The KL reads every position of prompt and continuation: an edit moves it there too.
    from app.methods import EditRequest, get

    E.attach(lm, E.load_editor(trained[0] / "editor.safetensors"))
    try:
        method = get("ke")
        delta = method.fit(lm, EditRequest(prompt=FACTS[0][0], target=FACTS[0][1]),
                           method.parse_config({"loop": 5, "routed": False})).delta
    finally:
        E.attach(lm, None)
    with_cont = float(_unrelated_kl(lm, delta, (ids, attn)))
    prompt_only = float(_unrelated_kl(lm, delta, _unrelated_batch(lm, [text])))
    assert with_cont > 0.0 and prompt_only > 0.0 and with_cont != prompt_only


def test_training_can_start_from_a_trained_editor(lm, trained, tmp_path):
    """``init``: the run starts from the file's editor (its first validation point is that editor's),
    and a file for other weights is refused."""
    import json

    from app.lm.testing import tiny_lm
    from app.methods.ke import editor as E
    from app.methods.ke.train import Record, TrainConfig, train_editor, validate

    records = [Record(p, t, [f"Tell me: {p}"], UNRELATED) for p, t in FACTS]
    start = trained[0] / "editor.safetensors"
    expected = validate(lm, E.load_editor(start).editor, records[:2])
    out = tmp_path / "from-init"
    summary = train_editor(lm, records, records[:2], TrainConfig(steps=1, val_every=100, init=str(start),
                                                                 lambda_init=3.0), out)
    first = json.loads((out / "curve.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["lambda"] == 3.0
    assert (first["success"], first["generalization"]) == (expected["success"], expected["generalization"])
    assert abs(first["unrelated_kl"] - expected["unrelated_kl"]) < 1e-4
    assert summary["finished"]
    with pytest.raises(E.EditorError):
        train_editor(tiny_lm("llama", seed=8), records, records[:1], TrainConfig(steps=1, init=str(start)),
                     tmp_path / "other")


def test_editor_file_round_trips_through_safetensors(lm, trained, tmp_path):
    from app.methods.ke import editor as E

    out, summary = trained
    ef = E.load_editor(out / "editor.safetensors")
    assert ef.meta["model_hash"] == E.model_hash(lm) and ef.meta["model_id"] == lm.name
    path = tmp_path / "copy.safetensors"
    E.save_editor(ef.editor, path, model_id=lm.name, model_sha=E.model_hash(lm))
    again = E.load_editor(path)
    emb = E.condition_embeds(lm, FACTS[0][0], "the", FACTS[0][1])
    with torch.no_grad():
        for a, b in zip(ef.editor(emb), again.editor(emb)):
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    assert open(path, "rb").read(8) != b"\x80\x04\x95"  # not a pickle
    with pytest.raises(E.EditorError):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not an editor")
        E.load_editor(bad)


def test_ke_edit_changes_the_answer_and_nothing_when_inactive(lm, trained):
    from app.methods import EditRequest, get
    from app.methods.ke import editor as E

    out, _ = trained
    E.attach(lm, E.load_editor(out / "editor.safetensors"))
    try:
        method = get("ke")
        prompt, target = FACTS[0]
        assert not _holds(lm, prompt, target)
        fit = method.fit(lm, EditRequest(prompt=prompt, target=target), method.parse_config({"loop": 5}))
        assert fit.delta.kind == "lora" and fit.delta.meta["method"] == "ke" and fit.delta.meta["target"] == target
        assert fit.info["converged"] and _holds(lm, prompt, target, fit.delta)
        # The fit's own check of the prompt, per form, is what scoring with the returned delta gives.
        forms = ["completion"] + (["chat"] if lm.has_chat_template else [])
        assert fit.prompt_holds == {m: lm.score([prompt], [target], mode=m, deltas=[fit.delta])[0].all_correct
                                    for m in forms}
        assert set(fit.delta.modules()) == set(E.attached(lm).editor.paths)
        # "Revert" is not applying it: the base model is untouched.
        assert not _holds(lm, prompt, target)
        from app.delta import Delta

        assert _holds(lm, prompt, target, Delta.from_bytes(fit.delta.to_bytes()))
    finally:
        E.attach(lm, None)


def test_unset_scale_is_stronger_for_a_routed_edit_than_for_a_global_one(lm, trained):
    """Unset `scale`: a routed edit reads the gradient doubled (the selector guards other queries), a
    global one as trained; an explicit `scale` wins either way."""
    from app.methods import EditRequest, get
    from app.methods.ke import editor as E

    out, _ = trained
    E.attach(lm, E.load_editor(out / "editor.safetensors"))
    try:
        method = get("ke")
        req = EditRequest(prompt=FACTS[1][0], target=FACTS[1][1])

        def update(config: dict) -> dict:
            fit = method.fit(lm, req, method.parse_config({"loop": 1, "chat": False, **config}))
            return fit.delta.tensors

        def same(a: dict, b: dict) -> bool:
            return a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)

        routed, global_ = update({}), update({"routed": False})
        assert same(routed, update({"scale": 2.0})) and same(global_, update({"routed": False, "scale": 1.0}))
        assert not same(routed, global_)
        assert same(update({"routed": False, "scale": 2.0}), routed)
    finally:
        E.attach(lm, None)


def test_lead_in_sentences_and_relation_phrasings_join_the_gradient_and_not_the_stop_rule(lm, trained):
    """`context_sentences` / `relation_frames`: more completion-form prompts of the same fact in the
    editor's gradient (more positions in its low-rank update), weighed by `extra_weight`; the stop
    rule and the fit's per-form check still read the request's own prompt."""
    from app.methods import EditRequest, get
    from app.methods.augment import CONTEXT_SENTENCES, relation_phrasings
    from app.methods.ke import editor as E
    from app.methods.ke.method import extra_prompts

    out, _ = trained
    E.attach(lm, E.load_editor(out / "editor.safetensors"))
    try:
        method = get("ke")
        prompt, target = FACTS[1]
        req = EditRequest(prompt=prompt, target=target, subject="Vendoria")

        def fit(config: dict):
            return method.fit(lm, req, method.parse_config({"loop": 1, "chat": False, "relation_frames": 0, **config}))

        def rank(f) -> int:
            return int(f.delta.get(f.delta.modules()[0], "A").shape[0])

        plain, lead = fit({}), fit({"context_sentences": 2})
        leads = method.parse_config({"context_sentences": 2, "relation_frames": 0})
        assert extra_prompts(req, leads) == [f"{s} {prompt}" for s in CONTEXT_SENTENCES[:2]]
        n_extra = sum(len(lm.prompt_ids(p, "completion")) + len(lm.target_ids(p, target, "completion")) - 1
                      for p in extra_prompts(req, leads))
        assert rank(lead) == rank(plain) + n_extra  # one position per input token of each lead-in row
        path, k = plain.delta.modules()[0], rank(plain) - 1  # the last factor is the editor's bias term
        assert torch.allclose(lead.delta.get(path, "A")[:k], plain.delta.get(path, "A")[:k])
        assert lead.delta.get(path, "B")[:, k:-1].abs().sum() > 0  # the lead-ins' own gradient, not zero
        # weight 0: the lead-ins are left out, the update is the plain one
        off = fit({"context_sentences": 2, "extra_weight": 0})
        assert off.delta.tensors.keys() == plain.delta.tensors.keys()
        assert all(torch.allclose(off.delta.tensors[k], plain.delta.tensors[k]) for k in plain.delta.tensors)
        # the per-form check is the request's prompt's, whatever the lead-ins do
        assert set(lead.prompt_holds) <= {"completion"}
        # relation phrasings come from the selector's relation check, after the lead-ins
        frames = extra_prompts(req, method.parse_config({"relation_frames": 2, "context_sentences": 1}))
        assert frames == [f"{CONTEXT_SENTENCES[0]} {prompt}", *relation_phrasings(req, 2)]
        # by default two phrasings for a statement prompt, none for a question (unless asked for)
        assert relation_phrasings(req, 2), "the relation check found no phrasing of a capital-city edit"
        assert extra_prompts(req, method.parse_config({})) == relation_phrasings(req, 2)
        question = EditRequest(prompt="What is the capital city of Vendoria?", target=target, subject="Vendoria")
        assert relation_phrasings(question, 2)
        assert extra_prompts(question, method.parse_config({})) == []
        assert extra_prompts(question, method.parse_config({"frames_on_questions": True})) == \
            relation_phrasings(question, 2)
        assert extra_prompts(EditRequest(prompt=prompt, target=target), method.parse_config({"relation_frames": 2})) == []
        with pytest.raises(Exception):
            method.parse_config({"context_sentences": 9})
    finally:
        E.attach(lm, None)


def test_a_global_edit_is_made_by_the_global_editor_when_one_is_installed(lm, trained, tmp_path):
    """Editors per scope: ``load_for`` finds the routed and the global file under the home; a global
    edit is made by the global editor, a routed one by the routed editor; without a global editor the
    routed one makes both."""
    import shutil

    from app.methods import EditRequest, get
    from app.methods.ke import editor as E
    from app.methods.ke.train import Record, TrainConfig, train_editor

    out, _ = trained
    other = tmp_path / "other-run"  # a second editor: the same records, another seed, fewer steps
    records = [Record(p, t, [], UNRELATED) for p, t in FACTS]
    train_editor(lm, records, records[:1], TrainConfig(steps=2, val_every=100, gain=1e4, seed=3), other)
    sha = E.model_hash(lm)
    home = tmp_path / "home"
    (home / "editors").mkdir(parents=True)
    shutil.copyfile(out / "editor.safetensors", E.editor_paths(home, sha, "routed")[0])
    method = get("ke")
    req = EditRequest(prompt=FACTS[2][0], target=FACTS[2][1])

    def fit(routed: bool):
        return method.fit(lm, req, method.parse_config({"loop": 1, "chat": False, "routed": routed, "scale": 1.0}))

    def same(a, b) -> bool:
        return a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)

    try:
        assert E.load_for(lm, home) == E.editor_paths(home, sha, "routed")[0]
        only_routed = fit(False)
        assert only_routed.delta.meta["editor_scope"] == "routed"
        assert same(only_routed.delta.tensors, fit(True).delta.tensors)  # one editor: the same update
        shutil.copyfile(other / "editor.safetensors", E.editor_paths(home, sha, "global")[0])
        E.load_for(lm, home)
        glob, routed = fit(False), fit(True)
        assert glob.delta.meta["editor_scope"] == "global" and routed.delta.meta["editor_scope"] == "routed"
        assert same(routed.delta.tensors, only_routed.delta.tensors)
        assert not same(glob.delta.tensors, routed.delta.tensors)
    finally:
        E.attach(lm, None)
    assert E.attached(lm) is None and E.attached(lm, "global") is None


@pytest.mark.parametrize("name", ["ft", "ft_constrained"])
def test_fine_tuning_baselines_write_the_target_as_a_dense_delta(lm, name):
    from app.methods import EditRequest, get

    method = get(name)
    prompt, target = FACTS[1]
    before = [p.clone() for p in lm.model.parameters()]
    cfg = method.parse_config({"layers": -1, "max_steps": 40, "lr": 5e-2, **({"radius": 0.1} if name != "ft" else {})})
    fit = method.fit(lm, EditRequest(prompt=prompt, target=target), cfg)
    assert fit.delta.kind == "dense" and fit.info["converged"] and _holds(lm, prompt, target, fit.delta)
    # The chat form is trained too (the service's default form): the edit leads the chat answer.
    assert lm.has_chat_template
    assert not lm.score([prompt], [target], mode="chat")[0].all_correct
    assert lm.score([prompt], [target], mode="chat", deltas=[fit.delta])[0].all_correct
    assert fit.delta.modules() == [lm.arch.blocks[-1].mlp_out]
    if name == "ft_constrained":
        assert fit.info["max_abs"] <= 0.1 + 1e-7
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters()))
    assert not _holds(lm, prompt, target)
    from app.methods.ft.method import tuned_modules

    assert tuned_modules(lm, method.parse_config({"layers": "first"})) == [lm.arch.blocks[0].mlp_out]
    everything = tuned_modules(lm, method.parse_config({"layers": "all", "linears": "all"}))
    assert everything == [p for b in lm.arch.blocks for p in b.mlp_linears]
    with pytest.raises(Exception):
        method.parse_config({"layers": "middle"})


def _create(client, body):
    return client.post("/edits", json=body, headers=auth(EDITOR))


def _answer(client, q, n=4):
    r = client.get("/answer", params={"q": q, "max_new_tokens": n, "mode": "completion"}, headers=auth(READER))
    assert r.status_code == 200, r.text
    return r.json()


def test_ke_without_an_editor_is_a_409_that_names_the_command(service, lm):
    from app.methods.ke import editor as E

    E.attach(lm, None)
    client, rt = service(lm)
    r = _create(client, {"prompt": FACTS[0][0], "target": FACTS[0][1], "method": "ke"})
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "editor_not_trained" and "factpatch train-editor" in err["message"]
    assert client.get("/edits", headers=auth(READER)).json()["items"] == []


def test_ke_edit_over_http_changes_the_answer_and_revert_restores_it(service, lm, trained):
    from app.methods.ke import editor as E

    out, _ = trained
    home_editor = None
    client, rt = service(lm)
    # The service finds an editor installed in its home under the weights' hash.
    home_editor = E.editor_paths(rt.settings.home, E.model_hash(lm))[0]
    home_editor.parent.mkdir(parents=True, exist_ok=True)
    home_editor.write_bytes((out / "editor.safetensors").read_bytes())
    E.attach(lm, None)
    from app.methods import get

    get("ke").prepare(lm, rt.settings.home)
    try:
        assert E.attached(lm) is not None
        prompt, target = FACTS[2]
        before = _answer(client, prompt)
        other = _answer(client, UNRELATED[0])
        r = _create(client, {"prompt": prompt, "target": target, "method": "ke", "config": {"loop": 5}})
        assert r.status_code == 201, r.text
        edit = r.json()
        assert edit["method"] == "ke"
        after = _answer(client, prompt)
        assert after["edit_id"] == edit["id"] and after["answer"].startswith(target)
        # The stored success is what the served path gives now (the fit's check stands in for scoring the prompt).
        forms = ["completion"] + (["chat"] if lm.has_chat_template else [])
        served = rt.answers.score([prompt] * len(forms), [target] * len(forms), modes=forms)
        assert edit["metrics"]["success"] == sum(s.all_correct and s.edit_id == edit["id"] for s in served) / len(forms)
        unrelated = _answer(client, UNRELATED[0])
        assert unrelated["edit_id"] is None and unrelated["answer"] == other["answer"]
        r = client.post(f"/admin/edits/{edit['id']}/revert", headers=auth(ADMIN))
        assert r.status_code == 200
        restored = _answer(client, prompt)
        assert restored["edit_id"] is None and restored["answer"] == before["answer"]
    finally:
        E.attach(lm, None)


def test_global_ft_edit_applies_to_every_query_until_reverted(service, lm):
    client, rt = service(lm)
    prompt, target = FACTS[3]
    probe = UNRELATED[1]
    base = rt.lm.score([probe], ["the"], mode="completion")[0].logprob
    body = {"prompt": prompt, "target": target, "method": "ft",
            "config": {"layers": -1, "lr": 5e-2, "max_steps": 40, "routed": False}}
    r = _create(client, body)
    assert r.status_code == 201, r.text
    edit = r.json()
    assert f"edit:{edit['id']}" in rt.lm.global_keys()
    # An unrelated query, routed to no edit, is now computed with the delta.
    assert _answer(client, probe)["edit_id"] is None
    assert rt.lm.score([probe], ["the"], mode="completion")[0].logprob != pytest.approx(base, abs=1e-6)
    assert _answer(client, prompt)["answer"].startswith(target)
    client.post(f"/admin/edits/{edit['id']}/revert", headers=auth(ADMIN))
    assert f"edit:{edit['id']}" not in rt.lm.global_keys()
    assert rt.lm.score([probe], ["the"], mode="completion")[0].logprob == pytest.approx(base, abs=1e-6)


def test_global_edit_reaches_another_replica_and_so_does_its_revert(service, lm):
    """Replica A makes a global edit; replica B (its own model, same database and Redis) switches it
    on within the sync interval, and off again after A reverts it; B's restart is not needed."""
    from app.lm.testing import tiny_lm

    client_a, rt_a = service(lm)
    lm_b = tiny_lm("llama", seed=7)  # the same weights, a separate model object: replica B
    client_b, rt_b = service(lm_b)
    probe = UNRELATED[0]
    base_b = lm_b.score([probe], ["the"], mode="completion")[0].logprob
    prompt, target = FACTS[2]
    body = {"prompt": prompt, "target": target, "method": "ft",
            "config": {"layers": -1, "lr": 5e-2, "max_steps": 40, "routed": False}}
    r = _create(client_a, body)
    assert r.status_code == 201, r.text
    key = f"edit:{r.json()['id']}"
    assert wait_until(lambda: key in lm_b.global_keys())
    assert lm_b.score([probe], ["the"], mode="completion")[0].logprob != pytest.approx(base_b, abs=1e-6)
    assert _answer(client_b, prompt)["answer"].startswith(target)
    assert client_a.post(f"/admin/edits/{r.json()['id']}/revert", headers=auth(ADMIN)).status_code == 200
    assert wait_until(lambda: key not in lm_b.global_keys())
    assert lm_b.score([probe], ["the"], mode="completion")[0].logprob == pytest.approx(base_b, abs=1e-6)
    # Closing a replica takes its global deltas off its own model only.
    assert lm.global_keys() == []
