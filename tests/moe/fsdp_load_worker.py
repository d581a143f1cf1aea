"""One rank of the sharded-load check in test_fsdp_load.py (run by `accelerate launch` with accelerate/cpu-fsdp2.yaml).

Loads the tiny model through `finetune.model.load.load_model` as a FSDP2 run does (each rank loads and quantises only its
own experts; the model is sharded at load), counting which experts this rank quantised. Then loads the whole model
unsharded as the reference, gives both the same seeded random LoRA, and compares loss and LoRA gradients. Each rank
writes what it holds (shapes, bytes, the experts it quantised, whether its shard equals the reference's rows).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from finetune.distributed.sharding import adapter_to_trl_dtype, local_bytes
from finetune.model.load import load_model
from finetune.moe.loading import load_mixtral
from finetune.moe.lora import apply_lora
from finetune.moe.quantized import QuantizedExperts
from finetune.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def seeded_lora(model) -> None:
    """The same random LoRA on both models and every rank (B is zero at init, which would hide expert gradients)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                full = torch.randn(param.shape, generator=g) * 0.05
                if isinstance(param, DTensor):
                    param.copy_(distribute_tensor(full, param.device_mesh, param.placements))
                else:
                    param.copy_(full)


def main(model_dir: str, quantization: str, out: str) -> None:
    state = PartialState(cpu=True)
    rank = state.process_index
    recipe = load_recipe(
        ROOT / "recipes" / "tiny-mixtral-sft.yaml",
        [f"model.path={model_dir}", f"model.quantization={quantization}", "model.dtype=float32",
         "model.device=cpu", "lora.dropout=0.0"],
    )  # fmt: skip
    quantised: list[tuple[int, str, int]] = []
    original = QuantizedExperts.set_expert

    def counting(self, proj, expert, weight):
        quantised.append((id(self), proj, expert))
        return original(self, proj, expert, weight)

    QuantizedExperts.set_expert = counting
    loaded = load_model(recipe.model, recipe.lora, Path(model_dir), train_aux=False)
    QuantizedExperts.set_expert = original
    model = loaded.model

    base, report = load_mixtral(model_dir, quantization=quantization, dtype=torch.float32, quant_storage=torch.float32)
    reference = apply_lora(
        base,
        attention_targets=list(recipe.lora.attention_targets),
        r=recipe.lora.r,
        alpha=recipe.lora.alpha,
        dropout=0.0,
        expert_targets=list(recipe.lora.expert_targets),
        expert_r=recipe.lora.expert_r,
        expert_alpha=recipe.lora.expert_alpha,
    )
    adapter_to_trl_dtype(reference)  # as shard_loaded did to the sharded adapter, and TRL's trainers do to both
    seeded_lora(model)
    seeded_lora(reference)
    model.train()
    reference.train()
    ids = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_ref = reference(input_ids=ids, labels=ids).loss
    loss_ref.backward()
    grads_ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    diffs = {
        n: (p.grad.full_tensor() - grads_ref[n]).abs().max().item()
        for n, p in model.named_parameters()
        if p.requires_grad
    }

    layers = model.base_model.model.model.layers
    ref_layers = reference.base_model.model.model.layers
    experts, shards_equal = [], True
    for layer, ref_layer in zip(layers, ref_layers, strict=True):
        module = layer.mlp.experts.get_base_layer()
        ref = ref_layer.mlp.experts.get_base_layer()
        for name, param in module.named_parameters(recurse=False):
            local = param.to_local()
            rows = ref._parameters[name].data
            if "quant_map" not in name:
                step = -(-rows.shape[0] // state.num_processes)
                rows = rows[rank * step : (rank + 1) * step]
                shards_equal &= torch.equal(local, rows)
        data = module.gate_up_proj_data
        experts.append(
            {
                "is_dtensor": isinstance(data, DTensor),
                "local_shape": list(data.to_local().shape),
                "full_shape": list(data.shape),
                "local_bytes": sum(p.to_local().numel() * p.element_size() for p in module.parameters(recurse=False)),
                "quantised": sorted({e for owner, _, e in quantised if owner == id(module)}),
            }
        )
    result = {
        "rank": rank,
        "world": state.num_processes,
        "experts": experts,
        "quantised_calls": len(quantised),
        "shards_equal_reference": shards_equal,
        "router_is_own_unit": all(isinstance(layer.mlp.gate, FSDPModule) for layer in layers),
        "router_weight_dtype": str(layers[0].mlp.gate.weight.dtype),
        "adapter_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        "adapter_local_dtypes": sorted({str(p.to_local().dtype) for p in model.parameters() if p.requires_grad}),
        "loss_ref": loss_ref.item(),
        "loss": loss.item(),
        "max_grad_diff": max(diffs.values()),
        "grad_scale": max(g.abs().max().item() for g in grads_ref.values()),
        "expert_grads": sum(1 for n in diffs if ".experts." in n),
        "model_bytes": loaded.report.model_bytes,
        "reference_model_bytes": report.model_bytes,
        "local_bytes": local_bytes(model),
        "load_memory_added": loaded.load_memory_added,
    }
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    state.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
