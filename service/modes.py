"""The request modes and the recommenders that serve them: the one registry of the service's modes.

    automr         memory in the slot, picked by the server's memory policy (learned: the retriever)
    bigrec         no memory: the slot keeps its placeholder's state
    full-history   every title of the user's window in the prompt, no slot

The model worker holds one recommender per key (a slot policy, or "full-history"); ``choose`` maps a
request's mode to the key that serves it under the server's slot policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from service.errors import ApiError

Mode = Literal["automr", "bigrec", "full-history"]
SlotPolicy = Literal["none", "learned", "random", "semantic"]
MODES: tuple[str, ...] = get_args(Mode)
SLOT_POLICIES: tuple[str, ...] = get_args(SlotPolicy)
MEMORY_POLICIES: tuple[str, ...] = SLOT_POLICIES[1:]
# the worker's recommenders that may serve each mode (``choose``)
MODE_RECOMMENDERS: dict[str, tuple[str, ...]] = {"automr": MEMORY_POLICIES, "bigrec": ("none",),
                                                 "full-history": ("full-history",)}


@dataclass(frozen=True)
class ModeChoice:
    mode: str  # automr | bigrec | full-history
    policy: str  # the slot policy used
    recommender: str  # key into the worker's recommenders


def build_recommenders(pipeline, **config) -> dict:
    """Every recommender the modes need, keyed as ``MODE_RECOMMENDERS`` names them ("learned" only
    with a trained retriever); ``config``: the generation settings (``Settings.generation``)."""
    recs = {policy: pipeline.recommender(policy, **config) for policy in ("none", "random", "semantic")}
    if pipeline.retriever is not None:
        recs["learned"] = pipeline.recommender("learned", **config)
    recs["full-history"] = pipeline.recommender("none", full_history=True, **config)
    return recs


def recommender_keys(modes, available) -> list[str]:
    """The keys of ``available`` recommenders that serve any of ``modes``."""
    return [k for m in modes for k in MODE_RECOMMENDERS[m] if k in available]


def choose(mode: str | None, slot_policy: str, has_retriever: bool) -> ModeChoice:
    """A request's ``mode`` (None: the server's default) -> the slot policy and recommender serving it."""
    if mode is None:
        return ModeChoice("bigrec" if slot_policy == "none" else "automr", slot_policy, slot_policy)
    if mode == "bigrec":
        return ModeChoice("bigrec", "none", "none")
    if mode == "full-history":
        return ModeChoice("full-history", "none", "full-history")
    # automr: memory in the slot, chosen by the server's policy (learned unless an ablation is configured)
    if slot_policy in MEMORY_POLICIES:
        return ModeChoice("automr", slot_policy, slot_policy)
    if has_retriever:
        return ModeChoice("automr", "learned", "learned")
    raise ApiError(422, "mode_unavailable",
                   "mode 'automr' needs a trained retriever or AUTOMR_SLOT_POLICY=random|semantic; "
                   "this server runs with slot policy 'none'")
