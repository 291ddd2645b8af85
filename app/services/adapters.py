"""An edit's delta as a PEFT LoRA adapter, for engines and libraries that load PEFT adapters
(``PeftModel.from_pretrained``, vLLM's ``--enable-lora``): the files, or one zip/tar of them.

Next to PEFT's two files the export carries ``factpatch_edit.json``: the edit's id, prompt,
target and paraphrases, and the sha256 of the stored delta, so a caller can reproduce factpatch's
answer path (adapter until the target is written, base model after it) and trace the adapter back.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from dataclasses import dataclass
from typing import Literal

from app.delta import Delta, DeltaError
from app.errors import Conflict, NotFound
from app.lm.peft_adapter import AdapterError, to_peft
from app.store import Database, EditRepo

Format = Literal["zip", "tar"]
INFO_FILE = "factpatch_edit.json"
MEDIA_TYPES = {"zip": "application/zip", "tar": "application/x-tar"}


@dataclass
class AdapterArchive:
    filename: str
    media_type: str
    data: bytes
    edit_id: str
    status: str


class AdapterService:
    def __init__(self, db: Database, lm):
        self.db = db
        self.lm = lm

    def files(self, edit_id: str, *, base_model: str | None = None) -> tuple[dict[str, bytes], str]:
        """(file name -> bytes, the edit's status) of one edit's adapter; 404 ``edit_not_found``,
        409 ``delta_not_lora`` / ``adapter_model_mismatch`` / ``delta_missing``."""
        with self.db.session() as s:
            edit = EditRepo(s).get(edit_id, with_delta=True)
            if edit is None:
                raise NotFound(f"no edit {edit_id}", code="edit_not_found")
            if edit.delta is None:
                raise Conflict(f"edit {edit_id} has no stored delta", code="delta_missing")
            blob, sha, method, status = edit.delta.data, edit.delta.sha256, edit.method, edit.status
            info = {
                "edit_id": edit.id, "method": edit.method, "status": edit.status, "prompt": edit.prompt,
                "target": edit.target.strip(), "subject": edit.subject, "paraphrases": list(edit.paraphrases or []),
                "delta_sha256": sha, "model": self.lm.name,
            }
        try:
            delta = Delta.from_bytes(blob)
        except DeltaError as exc:
            raise Conflict(f"the stored delta of edit {edit_id} cannot be read: {exc}", code="delta_unreadable") from None
        try:
            adapter = to_peft(delta, self.lm, base_model=base_model)
        except AdapterError as exc:
            raise Conflict(f"edit {edit_id} (method {method}): {exc}", code=exc.code) from None
        files = adapter.files()
        files[INFO_FILE] = (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode()
        return files, status

    def archive(self, edit_id: str, fmt: Format = "zip") -> AdapterArchive:
        files, status = self.files(edit_id)
        stamp = time.time()
        buf = io.BytesIO()
        if fmt == "zip":
            with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
                for name, data in sorted(files.items()):
                    info = zipfile.ZipInfo(name, date_time=time.gmtime(stamp)[:6])
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    z.writestr(info, data)
        elif fmt == "tar":
            with tarfile.open(fileobj=buf, mode="w") as t:
                for name, data in sorted(files.items()):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), int(stamp), 0o644
                    t.addfile(info, io.BytesIO(data))
        else:  # pragma: no cover - the HTTP layer and the CLI only pass the two formats
            raise ValueError(fmt)
        return AdapterArchive(f"factpatch-edit-{edit_id}-adapter.{fmt}", MEDIA_TYPES[fmt], buf.getvalue(), edit_id, status)
