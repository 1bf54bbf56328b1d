"""LoRA on the upper layers for generator tuning (peft): inject, read back merged, remove."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from model.checkpoint import head_tied, upper_state_dict
from model.llm import SplitLM


def inject_lora(split: SplitLM, r: int, alpha: float, dropout: float, targets: Sequence[str]) -> list[nn.Parameter]:
    """LoRA adapters on ``targets`` of the upper layers only (the lower ones make the memory); the
    trainable parameters, in float32."""
    from peft import LoraConfig, inject_adapter_in_model

    lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), layers_to_transform=list(range(split.cut, split.n_layers)),
                      layers_pattern="layers", bias="none")
    inject_adapter_in_model(lcfg, split.model)
    params = []
    for name, p in split.model.named_parameters():
        if "lora_" in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            if layer < split.cut:
                raise RuntimeError(f"LoRA adapter landed in a frozen lower layer: {name}")
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
        else:
            p.requires_grad_(False)
    if not params:
        raise RuntimeError("no LoRA adapters were injected (check lora_targets)")
    return params


def _lora_layers(split: SplitLM) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, lora module) for every LoRA-wrapped linear in the upper layers."""
    from peft.tuners.lora import LoraLayer

    found = []
    for parent in split.upper_layers().modules():
        for name, child in parent.named_children():
            if isinstance(child, LoraLayer):
                found.append((parent, name, child))
    return found


def plain_upper_state(split: SplitLM) -> dict[str, torch.Tensor]:
    """Float32 CPU copy of the upper layers in the plain ``upper_state_dict`` layout (LoRA merged)."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for i in range(split.cut, split.n_layers):
        layer = split.model.model.layers[i]
        deltas = {f"{name}.weight": m.get_delta_weight("default").detach().float()
                  for name, m in layer.named_modules() if isinstance(m, LoraLayer)}
        for name, p in layer.named_parameters():
            if "lora_" in name:
                continue
            key = name.replace(".base_layer.", ".")
            w = p.detach().float()
            if key in deltas:
                w = w + deltas[key]
            state[f"layers.{i}.{key}"] = w.cpu().clone()
    for k, v in split.model.model.norm.state_dict().items():
        state[f"norm.{k}"] = v.detach().float().cpu().clone()
    if not head_tied(split):
        state["lm_head.weight"] = split.model.lm_head.weight.detach().float().cpu().clone()
    return state


def remove_lora(split: SplitLM) -> None:
    for parent, name, module in _lora_layers(split):
        setattr(parent, name, module.get_base_layer())


def load_plain_state(split: SplitLM, state: dict[str, torch.Tensor]) -> None:
    mine = upper_state_dict(split)
    if set(mine) != set(state):
        raise RuntimeError(f"upper state keys differ: {sorted(set(mine) ^ set(state))[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            mine[k].copy_(v.to(mine[k].dtype))
