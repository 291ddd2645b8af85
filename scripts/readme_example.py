"""The README's example, as a user sees it: one edit, then whole answers in chat and completion
form to the edited fact and to other facts of its subject, before and after.

    .venv/bin/python scripts/readme_example.py            # in-process service, temporary home
"""

from __future__ import annotations

import json

from app.eval.backends import InProcessBackend

EDIT = {"prompt": "The UK prime minister is", "target": "Keir Starmer", "subject": "UK prime minister"}
QUERIES = [
    "The UK prime minister is",
    "Who is the UK prime minister?",
    "The UK prime minister was born in",
    "Tell me about the UK prime minister's party",
]


def main() -> None:
    backend = InProcessBackend()
    client, headers = backend.client, backend.headers
    try:
        def ask(q: str, mode: str) -> dict:
            r = client.get("/answer", params={"q": q, "mode": mode, "max_new_tokens": 40}, headers=headers)
            r.raise_for_status()
            return r.json()

        before = {(q, m): ask(q, m) for q in QUERIES for m in ("chat", "completion")}
        r = client.post("/edits", json=EDIT, headers=headers)
        r.raise_for_status()
        print("POST /edits", json.dumps(EDIT))
        for (q, m), b in before.items():
            a = ask(q, m)
            print(json.dumps({"q": q, "mode": m, "before": b["answer"], "after": a["answer"],
                              "edit_id": a["edit_id"] and "routed"}, ensure_ascii=False))
    finally:
        backend.close()


if __name__ == "__main__":
    main()
