"""Edits as PEFT LoRA adapters: the exported adapter, loaded by ``peft.PeftModel.from_pretrained``
into a separate copy of the base model, gives the same outputs as factpatch's own hooks; the
endpoint's archive formats, auth and errors; a delta that is not a LoRA is refused with a code."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import ADMIN, EDITOR, READER, auth

peft = pytest.importorskip("peft", reason="peft is in the test extra: pip install -e '.[test]'")

FAST = {"max_steps": 60, "kl_weight": 0.0, "locality_prompts": 0}
EDIT = {"prompt": "The favourite colour of Zorblax Quint is", "target": "ultraviolet",
        "subject": "Zorblax Quint", "config": FAST}


def _random_lora(lm, ranks: dict[str, int], scale: float, seed: int = 1):
    from app.delta import Delta
    from app.lm.arch import linear_dims

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, r in ranks.items():
        d_in, d_out = linear_dims(lm.arch.module(path))
        tensors[f"{path}::A"] = torch.randn(r, d_in, generator=gen) * 0.3
        tensors[f"{path}::B"] = torch.randn(d_out, r, generator=gen) * 0.3
    return Delta("lora", tensors, {"scale": repr(scale)})


def _write(files: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _peft_model(arch: str, folder: Path):
    from app.lm.testing import tiny_model, tiny_tokenizer

    base = tiny_model(arch, len(tiny_tokenizer()))  # the same seed: the same weights as the tiny LM
    return peft.PeftModel.from_pretrained(base, str(folder)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_lora_gives_the_hooks_outputs_in_peft(arch, tmp_path, tiny_llama, tiny_gpt2):
    from app.lm.peft_adapter import to_peft

    lm = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    blocks = lm.arch.blocks
    # Two ranks (rank_pattern), out and in projections, a scale that is not 1.
    ranks = {blocks[1].mlp_out: 4, blocks[2].mlp_out: 4, blocks[2].mlp_linears[0]: 2}
    delta = _random_lora(lm, ranks, scale=2.5)
    adapter = to_peft(delta, lm)
    assert adapter.config["fan_in_fan_out"] is (arch == "gpt2")
    model = _peft_model(arch, _write(adapter.files(), tmp_path / "adapter"))

    ids = torch.tensor([lm.tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        with lm.active([delta]):
            ours = lm.model(input_ids=ids).logits
        theirs = model(input_ids=ids).logits
        with model.disable_adapter():
            theirs_off = model(input_ids=ids).logits
    assert not torch.allclose(ours, plain, atol=1e-3)  # the delta does change the output
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs_off, plain, atol=1e-6, rtol=1e-6)


def test_a_delta_that_is_not_lora_or_not_of_this_model_is_refused(tiny_llama, tiny_gpt2):
    from app.delta import Delta
    from app.lm.peft_adapter import AdapterError, to_peft

    path = tiny_llama.arch.blocks[0].mlp_out
    dense = Delta("dense", {f"{path}::W": torch.zeros(64, 128)})
    with pytest.raises(AdapterError) as exc:
        to_peft(dense, tiny_llama)
    assert exc.value.code == "delta_not_lora"
    slots = Delta("ffn_slots", {f"{tiny_llama.arch.blocks[0].mlp}::K": torch.zeros(2, 64),
                                f"{tiny_llama.arch.blocks[0].mlp}::V": torch.zeros(2, 64)})
    with pytest.raises(AdapterError) as exc:
        to_peft(slots, tiny_llama)
    assert exc.value.code == "delta_not_lora"
    llama_delta = _random_lora(tiny_llama, {path: 2}, 1.0)
    with pytest.raises(AdapterError) as exc:
        to_peft(llama_delta, tiny_gpt2)  # no such module in GPT-2
    assert exc.value.code == "adapter_model_mismatch"
    wrong_shape = _random_lora(tiny_llama, {tiny_llama.arch.blocks[0].mlp_linears[0]: 2}, 1.0)
    renamed = Delta("lora", {k.replace(tiny_llama.arch.blocks[0].mlp_linears[0], path): v
                             for k, v in wrong_shape.tensors.items()}, wrong_shape.meta)
    with pytest.raises(AdapterError) as exc:
        to_peft(renamed, tiny_llama)  # A is 64 wide, the output projection takes 128
    assert exc.value.code == "adapter_model_mismatch"


def test_adapter_endpoint_round_trip_errors_and_non_lora_edit(service, tiny_llama, tmp_path):
    client, rt = service()
    r = client.post("/edits", json=EDIT, headers=auth(EDITOR))
    assert r.status_code == 201, r.text
    edit = r.json()

    r = client.get(f"/edits/{edit['id']}/adapter", headers=auth(READER))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert f"factpatch-edit-{edit['id']}-adapter.zip" in r.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == ["adapter_config.json", "adapter_model.safetensors", "factpatch_edit.json"]
        z.extractall(tmp_path / "zip")
    r_tar = client.get(f"/edits/{edit['id']}/adapter", params={"format": "tar"}, headers=auth(READER))
    assert r_tar.status_code == 200 and r_tar.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r_tar.content)) as t:
        t.extractall(tmp_path / "tar", filter="data")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "zip" / name).read_bytes() == (tmp_path / "tar" / name).read_bytes()

    # PEFT's greedy answer with the adapter is factpatch's answer with the edit's delta.
    model = _peft_model("llama", tmp_path / "zip")
    ids = tiny_llama.prompt_ids(EDIT["prompt"], "completion")
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             pad_token_id=tiny_llama.tokenizer.pad_token_id)
    peft_text = tiny_llama.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    delta = rt.deltas.get(edit["id"])
    [ours] = tiny_llama.generate([EDIT["prompt"]], max_new_tokens=6, mode="completion", deltas=[delta])
    assert peft_text == ours.text
    served = client.get("/answer", params={"q": EDIT["prompt"], "max_new_tokens": 6, "mode": "completion"},
                        headers=auth(READER)).json()
    assert served["edit_id"] == edit["id"] and served["answer"].startswith("ultraviolet")
    assert peft_text.strip().startswith("ultraviolet")

    # Auth and input errors.
    assert client.get(f"/edits/{edit['id']}/adapter").status_code == 401
    bad = client.get(f"/edits/{edit['id']}/adapter", params={"format": "rar"}, headers=auth(READER))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    missing = client.get("/edits/00000000-0000-4000-8000-000000000000/adapter", headers=auth(READER))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "edit_not_found"
    assert client.get("/edits/not-a-uuid/adapter", headers=auth(READER)).status_code == 422

    # A reverted edit's adapter can still be exported; its status says it is not served.
    assert client.post(f"/admin/edits/{edit['id']}/revert", headers=auth(ADMIN)).status_code == 200
    again = client.get(f"/edits/{edit['id']}/adapter", headers=auth(READER))
    assert again.status_code == 200 and again.headers["x-factpatch-edit-status"] == "reverted"

    # An edit whose delta is not low-rank (stored by a method with dense deltas) is refused, with a code.
    from app.delta import Delta
    from app.store import EditRepo
    from app.store.models import Edit

    path = tiny_llama.arch.blocks[0].mlp_out
    dense = Delta("dense", {f"{path}::W": torch.zeros(64, 128)})
    with rt.db.transaction() as s:
        row = Edit(method="dense-test", prompt="p", target="t", status="reverted", paraphrases=[],
                   locality_prompts=[], config={}, metrics={})
        EditRepo(s).add(row, delta_kind="dense", delta_bytes=dense.to_bytes(), encoder="x", key_texts=["p"],
                        key_vectors=b"")
        s.flush()
        dense_id = row.id
    r = client.get(f"/edits/{dense_id}/adapter", headers=auth(READER))
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "delta_not_lora" and "dense" in r.json()["error"]["message"]


@pytest.mark.e2e
def test_real_model_edit_exported_to_peft_answers_like_factpatch(service, real_lm, tmp_path, monkeypatch,
                                                                 pg_url, schema):
    """The embedded model: an edit's adapter, fetched over HTTP (and written by ``factpatch export``,
    the same files) and loaded by PeftModel.from_pretrained into a fresh copy of the base model,
    writes factpatch's greedy answer on the prompt and a paraphrase."""
    from transformers import AutoModelForCausalLM

    prompt, paraphrase = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux's mother tongue is"
    client, rt = service(lm=real_lm)
    r = client.post("/edits", json={"prompt": prompt, "target": "Swedish", "subject": "Danielle Darrieux"},
                    headers=auth(EDITOR))
    assert r.status_code == 201, r.text
    edit = r.json()
    r = client.get(f"/edits/{edit['id']}/adapter", headers=auth(READER))
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        z.extractall(tmp_path / "adapter")
    _cli_export_writes_the_same_files(edit["id"], tmp_path, monkeypatch, pg_url, schema)
    base = AutoModelForCausalLM.from_pretrained(real_lm.model.config._name_or_path, dtype=real_lm.dtype).eval()
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    delta = rt.deltas.get(edit["id"])
    for q in (prompt, paraphrase):
        for mode in ("completion", "chat"):
            ids = real_lm.prompt_ids(q, mode)
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                     pad_token_id=real_lm.tokenizer.pad_token_id)
            row = out[0, len(ids):].tolist()
            [own] = real_lm.generate([q], max_new_tokens=12, mode=mode, deltas=[delta])
            n = len(own.token_ids)
            assert row[:n] == own.token_ids, (q, mode)  # the same tokens (factpatch stops at the end of text)
            served = client.get("/answer", params={"q": q, "mode": mode, "max_new_tokens": 12},
                                headers=auth(READER)).json()
            assert served["edit_id"] == edit["id"], (q, mode, served)
            text = real_lm.tokenizer.decode(row, skip_special_tokens=True).strip()
            # factpatch's answer uses the adapter until the target is written: the same text up to there.
            assert served["answer"].startswith("Swedish") and text.startswith("Swedish"), (q, mode, served, text)


def _cli_export_writes_the_same_files(edit_id: str, tmp_path: Path, monkeypatch, pg_url: str, schema: str) -> None:
    from typer.testing import CliRunner

    from app.cli import app as cli
    from app.settings import get_settings

    runner = CliRunner()
    try:
        with monkeypatch.context() as env:
            env.setenv("FACTPATCH_DATABASE_URL", pg_url)
            env.setenv("FACTPATCH_DATABASE_SCHEMA", schema)
            get_settings.cache_clear()
            done = runner.invoke(cli, ["export", "--edit", edit_id, "--out", str(tmp_path / "cli")])
            missing = runner.invoke(cli, ["export", "--edit", "00000000-0000-4000-8000-000000000000",
                                          "--out", str(tmp_path / "none")])
            bad = runner.invoke(cli, ["export", "--edit", "nope", "--out", str(tmp_path / "none")])
    finally:
        get_settings.cache_clear()  # the environment is back: later calls read it again
    assert done.exit_code == 0, done.output
    for name in ("adapter_config.json", "adapter_model.safetensors", "factpatch_edit.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes(), name
    assert missing.exit_code == 1 and "edit_not_found" in missing.output
    assert not (tmp_path / "none").exists()
    assert bad.exit_code == 2
