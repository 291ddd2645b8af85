"""The KnowledgeEditor network (De Cao, Aziz, Titov, EMNLP 2021) and what it needs from the model.

g(x, y, a; φ): a bidirectional LSTM reads the (frozen) input embeddings of "x y >> a" (the
question, the model's current first answer token, the new answer) and conditions, per edited
weight matrix W (out x in), five vectors α, β ∈ R^out, γ, δ ∈ R^in and η ∈ R. The update is

    ΔW = σ(η) · (α̂ ⊙ ∇W L(W; x, a) + β̂),   α̂ = softmax(α) γᵀ,  β̂ = softmax(β) δᵀ.

For a linear layer ∇W = Σ_t g_t x_tᵀ (g_t the loss gradient at the layer's output at position t,
x_t its input), so α̂ ⊙ ∇W = Σ_t (softmax(α) ⊙ g_t)(γ ⊙ x_t)ᵀ: ΔW is exactly the product of
two thin matrices, stored as a ``lora`` delta (B = σ(η)[softmax(α) ⊙ g_1 … g_T, softmax(β)],
A = [γ ⊙ x_1; …; γ ⊙ x_T; δ]) and applied by the same forward hooks as every delta.

Gradients are read with persistent, thread-local capture hooks on the edited modules (nothing is
installed or removed while other threads run the model); base weights are never written.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from app.delta import Delta
from app.lm.arch import linear_dims
from app.lm.engine import LM
from app.lm.replay import Prefix

FORMAT = "factpatch-ke-editor/1"


# -- the model's identity ------------------------------------------------------------------------
def model_hash(lm: LM) -> str:
    """A fingerprint of the loaded weights (names, shapes, dtypes and a strided sample of every
    tensor): an editor is trained for these weights and is refused for any other. Once per model."""
    cached = getattr(lm, "_ke_model_hash", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    for name, p in sorted(lm.model.state_dict().items()):
        flat = p.detach().reshape(-1).float().cpu()
        stride = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[::stride][:4096].numpy().tobytes())
        h.update(flat[:64].numpy().tobytes())
    digest = h.hexdigest()
    lm._ke_model_hash = digest  # type: ignore[attr-defined]
    return digest


def edited_modules(lm: LM, layers: Sequence[int]) -> list[str]:
    """The MLP output projection of each block in ``layers`` (negative indices count from the top)."""
    return [lm.arch.blocks[lm.arch.resolve_layer(i)].mlp_out for i in sorted({lm.arch.resolve_layer(i) for i in layers})]


def default_layers(lm: LM, count: int = 3, depth: float = 0.75) -> list[int]:
    n = lm.arch.num_layers
    count = max(1, min(count, n))
    start = max(0, min(round(depth * (n - 1) - (count - 1) / 2), n - count))
    return list(range(start, start + count))


# -- the network -----------------------------------------------------------------------------------
class KnowledgeEditor(nn.Module):
    """g(x, y, a; φ) for a fixed set of weight matrices (``dims``: path -> (in, out))."""

    def __init__(self, dims: dict[str, tuple[int, int]], embed_dim: int, hidden: int = 64, cond: int = 64):
        super().__init__()
        self.paths = list(dims)
        self.dims = dict(dims)
        self.embed_dim, self.hidden, self.cond_dim = embed_dim, hidden, cond
        self.inp = nn.Linear(embed_dim, 2 * hidden)
        self.lstm = nn.LSTM(2 * hidden, hidden, batch_first=True, bidirectional=True)
        self.cond = nn.Sequential(nn.Linear(2 * hidden, cond), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(cond, 2 * d_out + 2 * d_in + 1) for d_in, d_out in dims.values())
        # How large γ starts (set once before training by a line search, then fixed): the
        # gradients' scale differs by orders of magnitude between models and layers.
        self.register_buffer("gain", torch.ones(()))
        for head, (d_in, d_out) in zip(self.heads, dims.values()):
            nn.init.normal_(head.weight, std=1e-3)
            nn.init.zeros_(head.bias)
            with torch.no_grad():
                # γ starts at -1 (times ``gain``): a plain gradient-descent step before training.
                head.bias[2 * d_out : 2 * d_out + d_in] = -1.0
                head.bias[-1] = 0.0

    def forward(self, embeds: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """``embeds`` [1, L, E] -> per matrix (α [out], γ [in], β [out], δ [in], η [])."""
        h = torch.tanh(self.inp(embeds))
        _, (hn, _) = self.lstm(h)
        c = self.cond(torch.cat([hn[0], hn[1]], dim=-1))[0]
        out = []
        for head, (d_in, d_out) in zip(self.heads, self.dims.values()):
            v = head(c)
            alpha, gamma = v[:d_out], v[d_out : d_out + d_in] * self.gain
            beta, delta, eta = v[d_out + d_in : 2 * d_out + d_in], v[2 * d_out + d_in : -1], v[-1]
            out.append((alpha, gamma, beta, delta, eta))
        return out


@dataclass
class Factors:
    """What ∇W L(W; x, a) is made of for one module: inputs X [T, in] and output gradients G [T, out]."""

    x: torch.Tensor
    g: torch.Tensor


def update_factors(params: tuple[torch.Tensor, ...], f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [(T+1), in], B [out, (T+1)]) with B A = σ(η)(softmax(α)γᵀ ⊙ Σ_t g_t x_tᵀ + softmax(β)δᵀ)."""
    alpha, gamma, beta, delta, eta = params
    a, b = torch.softmax(alpha, -1), torch.softmax(beta, -1)
    big_a = torch.cat([f.x * gamma, delta[None]], dim=0)
    big_b = torch.cat([(f.g * a).T, b[:, None]], dim=1) * torch.sigmoid(eta)
    return big_a, big_b


def editor_delta(editor: KnowledgeEditor, embeds: torch.Tensor, factors: dict[str, Factors],
                 previous: Delta | None = None) -> Delta:
    """The editor's update as a ``lora`` delta; with ``previous``, the sum of both (factors joined)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, params in zip(editor.paths, editor(embeds)):
        a, b = update_factors(params, factors[path])
        if previous is not None:
            a = torch.cat([previous.get(path, "A"), a], dim=0)
            b = torch.cat([previous.get(path, "B"), b], dim=1)
        tensors[f"{path}::A"], tensors[f"{path}::B"] = a, b
    return Delta("lora", tensors, {"scale": "1.0", "method": "ke"})


# -- reading ∇W through capture hooks --------------------------------------------------------------
class _Capture:
    """Persistent forward hooks on edited modules that, only in a thread that asks, record each
    module's input and make its output a tensor the loss can be differentiated against."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._installed: set[str] = set()
        self._lock = threading.Lock()

    def ensure(self, lm: LM, paths: Sequence[str]) -> None:
        with self._lock:
            for path in paths:
                if path not in self._installed:
                    lm.arch.module(path).register_forward_hook(self._hook(path))
                    self._installed.add(path)

    def _hook(self, path: str):
        local = self._local

        def hook(module, inputs, output):
            record = getattr(local, "record", None)
            if record is None:
                return None
            out = output[0] if isinstance(output, tuple) else output
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            record[path] = (inputs[0].detach(), out)
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

        return hook

    @contextmanager
    def recording(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        record: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._local.record = record
        try:
            yield record
        finally:
            self._local.record = None


_CAPTURES: "weakref.WeakKeyDictionary[nn.Module, _Capture]" = weakref.WeakKeyDictionary()
_CAPTURE_LOCK = threading.Lock()


def _capture(lm: LM) -> _Capture:
    with _CAPTURE_LOCK:
        cap = _CAPTURES.get(lm.model)
        if cap is None:
            cap = _CAPTURES[lm.model] = _Capture()
        return cap


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor  # [n_target]
    target_row: torch.Tensor  # [n_target]
    rows: int
    keep: torch.Tensor  # [rows, width] bool: the positions whose logits are used (targets, last prompt token)
    target_idx: torch.Tensor  # [n_target] index of each target's position among the kept ones (row-major)
    last_idx: torch.Tensor  # [rows] index of each row's last prompt position among the kept ones


def make_batch(lm: LM, examples: Sequence[tuple[list[int], list[int]]]) -> Batch:
    """Right-padded rows prompt + target (the last target token is never an input)."""
    rows = [p + t[:-1] for p, t in examples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    pos, tgt, trow, last = [], [], [], []
    for r, ((p, t), seq) in enumerate(zip(examples, rows)):
        ids[r, : len(seq)] = torch.tensor(seq)
        attn[r, : len(seq)] = 1
        last.append(len(p) - 1)
        for j, tok in enumerate(t):
            pos.append((r, len(p) - 1 + j))
            tgt.append(tok)
            trow.append(r)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, c in pos:
        keep[r, c] = True
    keep[torch.arange(len(rows)), torch.tensor(last)] = True
    order = keep.flatten().long().cumsum(0) - 1
    target_idx = order[torch.tensor([r * width + c for r, c in pos])]
    last_idx = order[torch.tensor([r * width + c for r, c in enumerate(last)])]
    dev = lm.device
    return Batch(ids.to(dev), attn.to(dev), torch.tensor(tgt, device=dev), torch.tensor(trow, device=dev), len(rows),
                 keep.to(dev), target_idx.to(dev), last_idx.to(dev))


def batch_logits(lm: LM, batch: Batch) -> torch.Tensor:
    """Float logits at the batch's kept positions only ([n_keep, vocab]): the vocabulary projection
    of every other position is skipped (a fifth of the forward pass of a small model)."""
    return lm.kept_logits(batch.input_ids, batch.attention_mask, batch.keep)


def target_nll(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over rows of each row's mean target NLL, [rows] bool: every target token is the argmax);
    ``logits`` as :func:`batch_logits` returns them."""
    at = logits[batch.target_idx]
    logp = torch.log_softmax(at, -1)
    nll = -logp.gather(-1, batch.targets[:, None]).squeeze(-1)
    per_row = torch.zeros(batch.rows, device=logits.device).index_add(0, batch.target_row, nll)
    count = torch.zeros(batch.rows, device=logits.device).index_add(0, batch.target_row, torch.ones_like(nll))
    hit = at.argmax(-1).eq(batch.targets).float()
    hits = torch.zeros(batch.rows, device=logits.device).index_add(0, batch.target_row, hit)
    return (per_row / count.clamp(min=1)).mean(), hits.eq(count)


def edit_gradients(lm: LM, paths: Sequence[str], batch: Batch, deltas: Sequence[Delta] = (),
                   prefix: Prefix | None = None) -> tuple[dict[str, Factors], torch.Tensor, torch.Tensor]:
    """∇W L(W; x, a) of each module in ``paths`` as its factors, on ``batch`` with ``deltas``
    active. Returns (factors, [rows] bool: the target already holds, first-token argmax per row).
    ``prefix``: the blocks below the edited ones, run once for this batch (``LM.prefix``)."""
    cap = _capture(lm)
    cap.ensure(lm, paths)
    mask = batch.attention_mask.bool()
    with torch.enable_grad(), lm.active(list(deltas)), cap.recording() as record, \
            (prefix.use() if prefix is not None else nullcontext()):
        logits = batch_logits(lm, batch)
        loss, holds = target_nll(logits, batch)
        outs = [record[p][1] for p in paths]
        grads = torch.autograd.grad(loss, outs)
    factors = {p: Factors(record[p][0][mask].float(), g[mask].float()) for p, g in zip(paths, grads)}
    first = logits[batch.last_idx].argmax(-1)
    return factors, holds.detach(), first.detach()


def condition_embeds(lm: LM, prompt: str, current: str, target: str) -> torch.Tensor:
    """Frozen input embeddings of "x y >> a" ([1, L, E]): what the editor is conditioned on."""
    text = f"{prompt.strip()} {current.strip()} >> {target.strip()}"
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids[:96]
    with torch.no_grad():
        return lm.model.get_input_embeddings()(torch.tensor([ids], device=lm.device)).detach().float()


# -- the editor file ---------------------------------------------------------------------------------
@dataclass
class EditorFile:
    editor: KnowledgeEditor
    meta: dict[str, str]


def build_editor(lm: LM, layers: Sequence[int], hidden: int = 64, cond: int = 64) -> KnowledgeEditor:
    paths = edited_modules(lm, layers)
    dims = {p: linear_dims(lm.arch.module(p)) for p in paths}
    embed_dim = lm.model.get_input_embeddings().weight.shape[1]
    return KnowledgeEditor(dims, embed_dim, hidden, cond).to(lm.device)


def save_editor(editor: KnowledgeEditor, path: Path, *, model_id: str, model_sha: str,
                extra: dict[str, str] | None = None, dtype: torch.dtype = torch.float16) -> None:
    """safetensors: the network's tensors plus what it takes to rebuild it and whom it is for."""
    meta = {
        "format": FORMAT, "model_id": model_id, "model_hash": model_sha,
        "dims": json.dumps({p: list(d) for p, d in editor.dims.items()}),
        "embed_dim": str(editor.embed_dim), "hidden": str(editor.hidden), "cond": str(editor.cond_dim),
        **(extra or {}),
    }
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in editor.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


class EditorError(ValueError):
    """An editor file that is malformed or made for other weights."""


def load_editor(path: Path, device: torch.device | str = "cpu") -> EditorFile:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise EditorError(f"{path}: not a safetensors editor file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise EditorError(f"{path}: not a {FORMAT} file")
    dims = {p: (int(d[0]), int(d[1])) for p, d in json.loads(meta["dims"]).items()}
    editor = KnowledgeEditor(dims, int(meta["embed_dim"]), int(meta["hidden"]), int(meta["cond"]))
    editor.load_state_dict({k: v.float() for k, v in tensors.items()})
    editor.to(device).eval()
    for p in editor.parameters():
        p.requires_grad_(False)
    return EditorFile(editor, meta)


SCOPES = ("routed", "global")  # the editor for routed edits (the default) and, optionally, one for global ones


def editor_filename(model_sha: str, scope: str = "routed") -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    return f"ke-editor-{'global-' if scope == 'global' else ''}{model_sha[:16]}.safetensors"


SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "editors"


def editor_paths(home: Path, model_sha: str, scope: str = "routed") -> list[Path]:
    """Where the editor for these weights is looked for: the home first, then the shipped ones."""
    name = editor_filename(model_sha, scope)
    return [Path(home) / "editors" / name, SHIPPED_DIR / name]


# -- which editor serves which model ---------------------------------------------------------------
# Per model and scope. A global edit (not routed) reaches every query, so it is best made by an editor
# trained to keep other answers as they are where they are written (``unrelated_continuation``); without
# one the routed editor makes it.
_ATTACHED: dict[str, "weakref.WeakKeyDictionary[nn.Module, EditorFile]"] = {
    s: weakref.WeakKeyDictionary() for s in SCOPES}
_LOOKED: "weakref.WeakKeyDictionary[nn.Module, Path]" = weakref.WeakKeyDictionary()


def attach(lm: LM, editor: EditorFile | None, scope: str = "routed") -> None:
    """Serve ``lm``'s ``scope`` edits with ``editor`` (None: detach it; detaching the routed editor
    detaches the global one too, as without it no `ke` edit can be made)."""
    if editor is None:
        _ATTACHED[scope].pop(lm.model, None)
        if scope == "routed":
            _ATTACHED["global"].pop(lm.model, None)
    else:
        editor.editor.to(lm.device)
        _ATTACHED[scope][lm.model] = editor


def attached(lm: LM, scope: str = "routed") -> EditorFile | None:
    """The editor for ``scope`` edits: the global one falls back to the routed one."""
    routed = _ATTACHED["routed"].get(lm.model)
    if scope == "global" and routed is not None:
        return _ATTACHED["global"].get(lm.model, routed)
    return routed


def load_checked(path: Path, lm: LM) -> EditorFile:
    """The editor in ``path``, refused (EditorError) unless it was trained for ``lm``'s weights."""
    ef = load_editor(path, lm.device)
    if ef.meta.get("model_hash") != model_hash(lm):
        raise EditorError(f"{path} was trained for other weights ({ef.meta.get('model_id')})")
    return ef


def load_for(lm: LM, home: Path) -> Path | None:
    """Attach the editors trained for ``lm``'s weights, if they exist; returns the routed one's path."""
    sha = model_hash(lm)
    found = None
    for scope in SCOPES:
        paths = editor_paths(home, sha, scope)
        if scope == "routed":
            _LOOKED[lm.model] = paths[0]
        path = next((p for p in paths if p.exists()), None)
        if path is None:
            continue
        attach(lm, load_checked(path, lm), scope)
        if scope == "routed":
            found = path
    return found


def expected_path(lm: LM) -> Path | None:
    return _LOOKED.get(lm.model)


def kl_all_positions(logits: torch.Tensor, base_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions of KL(base ‖ edited) of the next-token distributions."""
    logp = torch.log_softmax(logits, -1)
    kl = F.kl_div(logp, base_logp, log_target=True, reduction="none").sum(-1)
    m = mask.float()
    return (kl * m).sum() / m.sum().clamp(min=1)
