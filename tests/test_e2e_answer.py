"""End to end with the real embedded model: the served answer is the model's greedy continuation."""

from __future__ import annotations

import pytest

from tests.conftest import READER, auth

pytestmark = pytest.mark.e2e


def test_capital_of_france_from_the_real_model(service, real_lm):
    client, _ = service(lm=real_lm)
    r = client.get("/answer", params={"q": "The capital of France is", "max_new_tokens": 8, "mode": "completion"},
                   headers=auth(READER))
    assert r.status_code == 200, r.text
    body = r.json()
    expected = real_lm.generate(["The capital of France is"], max_new_tokens=8, mode="completion")[0].text.strip()
    assert body["answer"] == expected
    assert "Paris" in body["answer"]
    assert body["model"] == "embedded:smollm2-135m-instruct"
    chat = client.get("/answer", params={"q": "What is the capital of France?", "max_new_tokens": 16},
                      headers=auth(READER)).json()
    assert "Paris" in chat["answer"]  # chat form is the default for a model with a chat template
