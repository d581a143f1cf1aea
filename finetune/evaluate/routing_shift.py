"""What the fine-tune did to the router, on the evaluation tokens: per-layer expert load of base and adapter, the
KL divergence between them, and the share of tokens whose top-1 expert changed.

The load is the training panels' own statistic (`finetune.moe.routing.ExpertLoadTracker`: top-k assignment shares,
padding left out). The top-1 comparison needs the same tokens under both columns, so `RoutingRecorder` also keeps
each real token's top-1 expert per layer, in the order the forwards saw them; the perplexity pass feeds both
columns the same batches in the same order. An adapter whose B factors are zero computes exactly the base, so its
shift is exactly 0.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from finetune.moe.routing import ExpertLoadTracker

_LAYER = re.compile(r"layers\.(\d+)\.")
SMOOTHING = 1e-6  # added to every expert's share, so an expert no token reaches keeps the divergence finite


class RoutingRecorder:
    """Hooks on every router (found by type, so a trainable router's PEFT copy too) that record one column at a time.

    Use `with recorder.column("base"): ...forwards...`; afterwards `recorder.columns[name]` holds
    `(layers, load [L, E], {layer: top-1 ids of the real tokens})`. Create it just before the forwards to record
    and `remove()` it after them: every forward in between counts.
    """

    def __init__(self, model: nn.Module):
        self.load = ExpertLoadTracker(model)
        self.columns: dict[str, tuple[list[int], torch.Tensor, dict[int, torch.Tensor]]] = {}
        self._top1: dict[int, list[torch.Tensor]] | None = None
        self._keep: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._remember_mask, with_kwargs=True)]
        for name, module in model.named_modules():
            if isinstance(module, MixtralTopKRouter):
                match = _LAYER.search(name)
                self._handles.append(module.register_forward_hook(self._hook(int(match.group(1)) if match else 0)))

    def _remember_mask(self, _module, _args, kwargs):
        mask = kwargs.get("attention_mask")
        self._keep = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            if self._top1 is None:
                return
            top1 = output[2][:, 0].detach()  # topk is sorted: column 0 is the top-1 expert
            if self._keep is not None and self._keep.numel() == top1.numel():
                top1 = top1[self._keep.to(top1.device)]
            self._top1.setdefault(layer, []).append(top1.to("cpu", torch.int16))

        return hook

    @contextlib.contextmanager
    def column(self, name: str):
        self.load.reset()
        self._top1 = {}
        try:
            yield
        finally:
            layers, load, _entropy, _tokens = self.load.load()
            top1 = {layer: torch.cat(parts) for layer, parts in self._top1.items()}
            self.columns[name] = (layers, load, top1)
            self._top1 = None

    def remove(self) -> None:
        self.load.remove()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row in nats, both rows smoothed by SMOOTHING; identical rows give exactly 0."""
    p = (p + SMOOTHING) / (1 + SMOOTHING * p.shape[-1])
    q = (q + SMOOTHING) / (1 + SMOOTHING * q.shape[-1])
    return (p * (p.log() - q.log())).sum(-1)


def shift(recorder: RoutingRecorder, base: str = "base", adapter: str = "adapter") -> dict[str, Any]:
    """The routing-shift figures of two recorded columns (same tokens in the same order)."""
    base_layers, base_load, base_top1 = recorder.columns[base]
    layers, adapter_load, adapter_top1 = recorder.columns[adapter]
    if base_layers != layers:
        raise ValueError(f"the columns routed different layers: {base_layers} and {layers}")
    kl = kl_divergence(adapter_load, base_load)
    changed = []
    for layer in layers:
        a, b = adapter_top1[layer], base_top1[layer]
        if a.shape != b.shape:
            raise ValueError(f"layer {layer}: the columns routed {b.numel()} and {a.numel()} tokens")
        changed.append((a != b).double().mean().item() if a.numel() else 0.0)
    tokens = int(base_top1[layers[0]].numel()) if layers else 0
    return {
        "layers": layers,
        "tokens": tokens,
        "base": {"load": base_load.tolist()},
        "adapter": {"load": adapter_load.tolist()},
        "kl": kl.tolist(),
        "kl_mean": kl.mean().item() if layers else 0.0,
        "top1_changed": changed,
        "top1_changed_mean": sum(changed) / len(changed) if changed else 0.0,
        "kl_direction": "KL(adapter || base), nats, over top-k assignment shares",
    }
