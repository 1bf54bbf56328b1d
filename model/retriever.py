"""The AutoMR memory retriever (Eq. 3): ``s = softmax(MLP(z_t)ᵀ M_{u,t})``.

``z_t`` (the query) and the memory elements ``z_m`` are layer-L hidden states of the generator
(``model/memory.py``). Such states have a few outlier dimensions whose magnitude is hundreds of
times that of the rest, which would dominate a raw dot product and make the initial scores huge.
The retriever therefore standardises both sides with fixed per-dimension statistics that are fitted
once on the training labels and stored in the artefact:

    score(z_t, z_m) = MLP(ẑ_t)ᵀ ẑ_m / sqrt(H),   ẑ_t = (z_t − μ_q) / σ_q,   ẑ_m = (z_m − μ_m) / σ_m.

This keeps Eq. 3's form: ``MLP(ẑ_t)ᵀ(z_m − μ_m)/σ_m = (MLP(ẑ_t)/σ_m)ᵀ z_m − c(z_t)`` where ``c`` does
not depend on ``m`` and cancels in the softmax over the memory, i.e. it is Eq. 3 with a linear map
folded into the MLP's output layer. The ``1/sqrt(H)`` is the usual dot-product temperature.
With untouched statistics (μ = 0, σ = 1) the retriever is exactly Eq. 3 up to that constant.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "retriever.json"
WEIGHTS_NAME = "retriever.safetensors"


@dataclass
class RetrieverConfig:
    hidden_size: int  # the generator's hidden size H (576 for SmolLM2-135M)
    mlp_hidden: int = 256  # the paper's hidden width
    activation: str = "relu"  # "relu" | "gelu" | "tanh"
    scale_scores: bool = True  # divide scores by sqrt(H)


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class Retriever(nn.Module):
    """Scores each memory element of a sample against the sample's query."""

    def __init__(self, config: RetrieverConfig):
        super().__init__()
        if config.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {config.activation!r}; use one of {sorted(_ACTIVATIONS)}")
        self.config = config
        H = config.hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(H, config.mlp_hidden),
            _ACTIVATIONS[config.activation](),
            nn.Linear(config.mlp_hidden, H),
        )
        # Fixed standardisation statistics (not trained; see the module docstring).
        self.register_buffer("query_mean", torch.zeros(H))
        self.register_buffer("query_std", torch.ones(H))
        self.register_buffer("memory_mean", torch.zeros(H))
        self.register_buffer("memory_std", torch.ones(H))

    # ---- normalisation -------------------------------------------------------------------------
    @torch.no_grad()
    def fit_normalization(self, queries: torch.Tensor, elements: torch.Tensor, eps: float = 1e-4) -> None:
        """Set μ/σ from a sample of queries [N, H] and memory elements [E, H] (the training set)."""
        for name, x in (("query", queries), ("memory", elements)):
            if x.ndim != 2 or x.shape[1] != self.config.hidden_size:
                raise ValueError(f"{name} statistics need a [n, {self.config.hidden_size}] tensor, got {tuple(x.shape)}")
            if x.shape[0] < 2:
                raise ValueError(f"{name} statistics need at least 2 vectors, got {x.shape[0]}")
            x = x.double()
            getattr(self, f"{name}_mean").copy_(x.mean(0).float())
            getattr(self, f"{name}_std").copy_(x.std(0).clamp_min(eps).float())

    # ---- Eq. 3 ---------------------------------------------------------------------------------
    def project_query(self, z_t: torch.Tensor) -> torch.Tensor:
        """MLP(ẑ_t) [B, H], already divided by σ_m (and sqrt(H)) so it can be dotted with raw z_m.

        Exposed so that a serving path can score a memory store without normalising it.
        """
        q = self.mlp((z_t.float() - self.query_mean) / self.query_std)  # [B, H]
        q = q / self.memory_std
        if self.config.scale_scores:
            q = q / math.sqrt(self.config.hidden_size)
        return q

    def scores(self, z_t: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Relevance scores (pre-softmax) [B, M]; masked-out (padding) elements get −inf.

        z_t: [B, H] queries; memory: [B, M, H] elements (padded); mask: [B, M] bool, True = real.
        """
        if z_t.ndim != 2 or memory.ndim != 3 or memory.shape[0] != z_t.shape[0]:
            raise ValueError(f"expected z_t [B, H] and memory [B, M, H], got {tuple(z_t.shape)} and {tuple(memory.shape)}")
        q = self.project_query(z_t)  # [B, H]
        m = memory.float() - self.memory_mean  # [B, M, H]; the −μ_m term only shifts each row
        s = torch.einsum("bh,bmh->bm", q, m)  # [B, M]
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s

    def forward(self, z_t: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """log s = log_softmax(scores) [B, M] (−inf at padding)."""
        return torch.log_softmax(self.scores(z_t, memory, mask), dim=-1)

    @torch.no_grad()
    def select(self, z_t: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None, k: int = 1) -> torch.Tensor:
        """Indices of the k highest-scoring elements per sample [B, k], best first.

        Where a sample has fewer than k real elements the trailing entries are −1 (no element).
        """
        s = self.scores(z_t, memory, mask)  # [B, M]
        k_eff = min(k, s.shape[1])
        top = torch.full((s.shape[0], k), -1, dtype=torch.long, device=s.device)
        if k_eff == 0:
            return top
        vals, idx = torch.topk(s, k_eff, dim=-1)  # [B, k_eff]
        top[:, :k_eff] = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
        return top

    # ---- artefact ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME), metadata={"format": "automr-retriever"})

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "Retriever":
        d = Path(directory)
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(f"{d}: a retriever directory needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            cfg = RetrieverConfig(**json.loads(cfg_path.read_text()))
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_path}: not a valid retriever config ({e})") from e
        model = cls(cfg)
        missing, unexpected = model.load_state_dict(load_file(str(w_path)), strict=False)
        if missing or unexpected:
            raise ValueError(f"{w_path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
        return model.to(device).eval()


@torch.no_grad()
def select_baseline(
    z_t: torch.Tensor,
    memory: torch.Tensor,
    mask: torch.Tensor | None = None,
    strategy: str = "random",
    k: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The non-learned selections compared against the retriever, same output as ``Retriever.select``.

    ``random`` (RQ2): k distinct real elements uniformly at random (seeded by ``generator``);
    ``semantic`` (ReLLa adapted): the k elements with the highest cosine similarity to ``z_t``.
    z_t [B, H], memory [B, M, H], mask [B, M] -> indices [B, k], −1 where there are fewer than k.
    """
    B, M = memory.shape[:2]
    mask = torch.ones(B, M, dtype=torch.bool, device=memory.device) if mask is None else mask
    if strategy == "random":
        s = torch.rand(B, M, generator=generator).to(memory.device)
    elif strategy == "semantic":
        s = torch.nn.functional.cosine_similarity(memory.float(), z_t.float()[:, None, :], dim=-1)  # [B, M]
    else:
        raise ValueError(f"unknown selection strategy {strategy!r}; use 'random' or 'semantic'")
    s = s.masked_fill(~mask, float("-inf"))
    top = torch.full((B, k), -1, dtype=torch.long, device=memory.device)
    k_eff = min(k, M)
    if k_eff:
        vals, idx = torch.topk(s, k_eff, dim=-1)
        top[:, :k_eff] = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
    return top
