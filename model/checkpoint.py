"""Tuned upper layers on disk, and the identity of the lower part (whose vectors the memory stores).

A GGUF-loaded model cannot ``save_pretrained``; the tuned part (layers L+1..N + final norm, + the LM
head only when it is not tied to the embeddings) is saved by ``save_upper`` as safetensors + JSON and
applied on top of the base model by ``load_upper``. ``fingerprint`` changes whenever stored memory
vectors would: the config, the vocabulary, the lower weights, L or the dtype.
"""
from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import torch

UPPER_FORMAT = "automr-upper/1"
UPPER_WEIGHTS = "upper.safetensors"
UPPER_CONFIG = "upper.json"

# per model: (the lower tensors' storage, version counters and shapes) -> the digest
_FINGERPRINTS: "weakref.WeakKeyDictionary[object, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def fingerprint(lm) -> str:
    """Hex digest that changes when the model config, the tokenizer vocabulary, the embedding or
    lower-layer weights (all their bytes), L or the dtype change. Upper layers are excluded: tuning
    them keeps stored memory vectors valid. Hashes ~20 layers (~0.2 s for SmolLM2); cached until a
    lower parameter is modified in place (torch version counters)."""
    tensors = [t for m in lm.lower_modules() for t in m.state_dict().values()]
    key = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)
    cached = _FINGERPRINTS.get(lm)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.blake2b(digest_size=16)
    cfg = lm.model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "quantization_config", "dtype", "torch_dtype",
              "architectures", "use_cache", "_commit_hash"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    vocab = sorted(lm.tokenizer.get_vocab().items())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(f"cut={lm.cut};dtype={lm.dtype}".encode())
    for m in lm.lower_modules():
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(_tensor_bytes(t))
    digest = h.hexdigest()
    _FINGERPRINTS[lm] = (key, digest)
    return digest


def upper_state_dict(lm) -> dict[str, torch.Tensor]:
    """The tunable part: ``layers.{i}.*`` for i in L..N-1 (0-based), ``norm.weight``, and
    ``lm_head.weight`` only when it is not tied to the (frozen) embeddings."""
    state = {}
    for i in range(lm.cut, lm.n_layers):
        for k, v in lm.model.model.layers[i].state_dict().items():
            state[f"layers.{i}.{k}"] = v
    for k, v in lm.model.model.norm.state_dict().items():
        state[f"norm.{k}"] = v
    if not head_tied(lm):
        state["lm_head.weight"] = lm.model.lm_head.weight
    return state


def head_tied(lm) -> bool:
    return lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()


def save_upper(lm, path: str | Path, extra: dict | None = None,
               state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``path/upper.safetensors`` + ``path/upper.json``, in the live dtype of the parameters.

    ``state`` overrides the live parameters (same keys as ``upper_state_dict``), e.g. a best
    checkpoint kept in memory or LoRA-merged weights during training.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = upper_state_dict(lm) if state is None else state
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(path / UPPER_WEIGHTS))
    meta = {
        "format": UPPER_FORMAT,
        "cut": lm.cut,
        "n_layers": lm.n_layers,
        "hidden_size": lm.hidden_size,
        "vocab_size": int(lm.model.config.vocab_size),
        "model_type": getattr(lm.model.config, "model_type", None),
        "base_fingerprint": fingerprint(lm),
        "dtype": str(next(iter(state.values())).dtype).replace("torch.", ""),
        "keys": sorted(state),
        "extra": extra or {},
    }
    (path / UPPER_CONFIG).write_text(json.dumps(meta, indent=2))


def load_upper(lm, path: str | Path, check_fingerprint: bool = True) -> dict:
    """Apply tuned upper layers saved by ``save_upper`` on top of this (base) model; returns the
    JSON config. Refuses files made for another cut, model shape, or (unless
    ``check_fingerprint=False``) another lower part."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / UPPER_CONFIG, path / UPPER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"{path} does not hold {UPPER_CONFIG} and {UPPER_WEIGHTS}")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if meta.get("format") != UPPER_FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {UPPER_FORMAT!r}")
    for k, mine in (("cut", lm.cut), ("n_layers", lm.n_layers), ("hidden_size", lm.hidden_size)):
        if meta.get(k) != mine:
            raise ValueError(f"{cfg_path}: {k}={meta.get(k)} but this model has {k}={mine}")
    if check_fingerprint and meta.get("base_fingerprint") != fingerprint(lm):
        raise ValueError(
            f"{cfg_path}: saved for a lower part with fingerprint {meta.get('base_fingerprint')}, this model "
            f"has {fingerprint(lm)} (other base weights, tokenizer or dtype)"
        )
    state = load_file(str(w_path))
    mine = upper_state_dict(lm)
    if set(state) != set(mine):
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        raise ValueError(f"{w_path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(mine[k].shape):
            raise ValueError(f"{w_path}: {k} has shape {tuple(v.shape)}, expected {tuple(mine[k].shape)}")
    lm.snapshot_base_upper()
    with torch.no_grad():
        for k, v in state.items():
            mine[k].copy_(v.to(mine[k].dtype))
    return meta
