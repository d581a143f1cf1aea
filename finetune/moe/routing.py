"""Per-layer expert-load statistics from the router, for W&B panels and metrics.jsonl.

`ExpertLoadTracker` hooks every `MixtralTopKRouter` (found by type, so also our `Float32Router` and the copies PEFT
makes for a trainable router) and accumulates top-k assignment counts and router entropy on the device; the only
host sync is in `compute()`. The load-balancing aux loss itself is transformers' `load_balancing_loss_func`
(enabled with `output_router_logits=True`), which works on our model unchanged, so there is no copy of it here.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

_LAYER = re.compile(r"layers\.(\d+)\.")


def _in_backward() -> bool:
    """True while autograd runs a backward pass (gradient-checkpointing recomputes routers there: don't recount)."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


class ExpertLoadTracker:
    """Accumulates per-layer expert assignment counts and router entropy over any number of forward passes.

    Padding is left out: a pre-hook on the model remembers the forward's 2-D `attention_mask`, and routers skip the
    masked positions (packed, padding-free batches have no mask and no padding).
    """

    def __init__(self, model: nn.Module):
        self._counts: dict[int, torch.Tensor] = {}
        self._entropy_sum: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, int] = {}
        self._handles = []
        self._keep: torch.Tensor | None = None
        for name, module in model.named_modules():
            if isinstance(module, MixtralTopKRouter):
                match = _LAYER.search(name)
                layer = int(match.group(1)) if match else len(self._handles)
                self._handles.append(module.register_forward_hook(self._hook(layer, module.num_experts)))
        if not self._handles:
            raise ValueError("ExpertLoadTracker found no MixtralTopKRouter in the model")
        self._handles.append(model.register_forward_pre_hook(self._remember_mask, with_kwargs=True))

    def _remember_mask(self, _module, _args, kwargs):
        mask = kwargs.get("attention_mask")
        padded = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all())  # one sync per forward
        self._keep = mask.reshape(-1).bool() if padded else None

    def _hook(self, layer: int, num_experts: int):
        def hook(_module, _inputs, output):
            if _in_backward():
                return
            router_logits, _scores, top_k_index = output
            keep = self._keep
            if keep is not None and keep.numel() == router_logits.shape[0]:
                router_logits, top_k_index = router_logits[keep], top_k_index[keep]
            with torch.no_grad():
                counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts)[:num_experts]
                logp = torch.log_softmax(router_logits.detach().float(), dim=-1)
                entropy = -(logp.exp() * logp).sum()
                if layer in self._counts:
                    self._counts[layer] += counts
                    self._entropy_sum[layer] += entropy
                    self._tokens[layer] += router_logits.shape[0]
                else:
                    self._counts[layer], self._entropy_sum[layer] = counts, entropy
                    self._tokens[layer] = router_logits.shape[0]

        return hook

    def compute(self, reset: bool = True) -> dict[str, float]:
        """Flat metrics: moe/layer{L}/expert{E}_load, moe/layer{L}/imbalance, moe/layer{L}/router_entropy, means."""
        metrics: dict[str, float] = {}
        imbalances, entropies = [], []
        for layer in sorted(self._counts):
            counts = self._counts[layer].double().cpu()
            total = counts.sum().item()
            if total == 0:
                continue
            load = counts / total
            for expert, value in enumerate(load.tolist()):
                metrics[f"moe/layer{layer}/expert{expert}_load"] = value
            imbalance = (load.max() / load.mean()).item()
            entropy = self._entropy_sum[layer].item() / self._tokens[layer]
            metrics[f"moe/layer{layer}/imbalance"] = imbalance
            metrics[f"moe/layer{layer}/router_entropy"] = entropy
            imbalances.append(imbalance)
            entropies.append(entropy)
        if imbalances:
            metrics["moe/imbalance_mean"] = sum(imbalances) / len(imbalances)
            metrics["moe/router_entropy_mean"] = sum(entropies) / len(entropies)
        if reset:
            self.reset()
        return metrics

    def reset(self) -> None:
        self._counts.clear()
        self._entropy_sum.clear()
        self._tokens.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
