"""Per-layer router statistics from the router, for W&B panels, metrics.jsonl and `finetune report`.

`ExpertLoadTracker` hooks every `MixtralTopKRouter` (found by type, so also our `Float32Router` and the copies PEFT
makes for a trainable router) and accumulates top-k assignment counts, token counts and router entropy as tensors
on the device: the hooks never sync with the host; `compute()` reads everything once per logging step. The
load-balancing aux loss itself is transformers' `load_balancing_loss_func` (enabled with
`output_router_logits=True`), which works on our model unchanged, so there is no copy of it here.

Router drift needs the same tokens twice: `drift(model, input_ids)` routes a fixed probe batch and compares each
token's top-1 expert with the previous probe's.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

_LAYER = re.compile(r"layers\.(\d+)\.")


def _in_backward() -> bool:
    """True while autograd runs a backward pass (gradient-checkpointing recomputes routers there: don't recount)."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


def load_metric_names(layer: int) -> tuple[str, str]:
    """W&B groups panels by the first '/' segment: one section per statistic, one line per layer."""
    return f"moe_imbalance/layer{layer}", f"moe_entropy/layer{layer}"


class ExpertLoadTracker:
    """Accumulates per-layer expert assignment counts and router entropy over any number of forward passes.

    Padding is left out: a pre-hook on the model remembers the forward's 2-D `attention_mask`, and routers weight
    the masked positions by zero (packed, padding-free batches have no mask and no padding). With
    `train_only=True`, forwards in eval mode (evaluation, sample generation) are not counted.
    """

    def __init__(self, model: nn.Module, *, train_only: bool = False):
        self._counts: dict[int, torch.Tensor] = {}
        self._entropy_sum: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, torch.Tensor] = {}
        self._handles = []
        self._keep: torch.Tensor | None = None
        self._paused = False
        self._probe: dict[int, torch.Tensor] | None = None  # top-1 per token, filled while probing
        self._last_probe: dict[int, torch.Tensor] = {}
        self.train_only = train_only
        self.num_experts = 0
        for name, module in model.named_modules():
            if isinstance(module, MixtralTopKRouter):
                match = _LAYER.search(name)
                layer = int(match.group(1)) if match else len(self._handles)
                self.num_experts = module.num_experts
                self._handles.append(module.register_forward_hook(self._hook(layer, module.num_experts)))
        if not self._handles:
            raise ValueError("ExpertLoadTracker found no MixtralTopKRouter in the model")
        self._handles.append(model.register_forward_pre_hook(self._remember_mask, with_kwargs=True))

    def _remember_mask(self, _module, _args, kwargs):
        mask = kwargs.get("attention_mask")
        self._keep = mask.reshape(-1) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _hook(self, layer: int, num_experts: int):
        def hook(module, _inputs, output):
            if _in_backward():
                return
            router_logits, _scores, top_k_index = output
            if self._probe is not None:
                self._probe[layer] = top_k_index[:, 0].detach()  # topk is sorted: column 0 is the top-1 expert
                return
            if self._paused or (self.train_only and not module.training):
                return
            with torch.no_grad():
                n, k = top_k_index.shape
                keep = self._keep
                if keep is None or keep.numel() != n:
                    weight = torch.ones(n, dtype=torch.long, device=top_k_index.device)
                else:
                    weight = keep.to(device=top_k_index.device, dtype=torch.long)
                counts = torch.zeros(num_experts, dtype=torch.long, device=top_k_index.device)
                counts.index_add_(0, top_k_index.reshape(-1), weight.repeat_interleave(k))
                logp = torch.log_softmax(router_logits.detach().float(), dim=-1)
                entropy = (-(logp.exp() * logp).sum(-1) * weight).sum()
                tokens = weight.sum()
                if layer in self._counts:
                    self._counts[layer] += counts
                    self._entropy_sum[layer] += entropy
                    self._tokens[layer] += tokens
                else:
                    self._counts[layer], self._entropy_sum[layer], self._tokens[layer] = counts, entropy, tokens

        return hook

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside the block (samples, probes) are not counted."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def load(self) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(layers, load [L, E] fractions, entropy [L], tokens [L]) in one host read; layers with no tokens left out."""
        layers = sorted(self._counts)
        if not layers:
            empty = torch.zeros(0, dtype=torch.float64)
            return [], empty.reshape(0, 0), empty, empty
        counts = torch.stack([self._counts[i] for i in layers]).double().cpu()
        entropy = torch.stack([self._entropy_sum[i].double() for i in layers]).cpu()
        tokens = torch.stack([self._tokens[i].double() for i in layers]).cpu()
        kept = [j for j in range(len(layers)) if counts[j].sum() > 0]
        layers = [layers[j] for j in kept]
        counts, entropy, tokens = counts[kept], entropy[kept], tokens[kept]
        return layers, counts / counts.sum(-1, keepdim=True), entropy / tokens, tokens

    def compute(self, reset: bool = True) -> dict[str, float | list[list[float]]]:
        """Metrics: moe_imbalance/layer{L} (max/mean load), moe_entropy/layer{L} (nats), their means, and
        `moe/load`, the layer x expert load matrix (rows in layer order, for the heatmap)."""
        layers, load, entropy, tokens = self.load()
        if reset:
            self.reset()
        if not layers:
            return {}
        imbalance = load.max(-1).values / load.mean(-1)
        metrics: dict[str, float | list[list[float]]] = {}
        for j, layer in enumerate(layers):
            imbalance_name, entropy_name = load_metric_names(layer)
            metrics[imbalance_name] = imbalance[j].item()
            metrics[entropy_name] = entropy[j].item()
        metrics["moe_imbalance/mean"] = imbalance.mean().item()
        metrics["moe_entropy/mean"] = entropy.mean().item()
        metrics["moe/routed_tokens"] = tokens[0].item()
        metrics["moe/load"] = load.tolist()
        return metrics

    @torch.no_grad()
    def drift(self, model: nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
        """Route `input_ids` (a fixed probe) and return the fraction of tokens per layer whose top-1 expert
        changed since the previous call: moe_drift/layer{L}, moe_drift/mean. The first call only sets the baseline."""
        self._probe = {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(input_ids=input_ids.to(next(model.parameters()).device))
        finally:
            model.train(was_training)
            probe, self._probe = self._probe, None
        previous, self._last_probe = self._last_probe, probe
        common = [layer for layer in sorted(probe) if layer in previous and previous[layer].shape == probe[layer].shape]
        if not common:
            return {}
        changed = torch.stack([(probe[i] != previous[i]).double().mean() for i in common]).cpu()
        metrics = {f"moe_drift/layer{layer}": changed[j].item() for j, layer in enumerate(common)}
        metrics["moe_drift/mean"] = changed.mean().item()
        return metrics

    def reset(self) -> None:
        self._counts.clear()
        self._entropy_sum.clear()
        self._tokens.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
