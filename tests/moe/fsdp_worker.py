"""One rank of the FSDP2 check in test_fsdp_sharding.py (run by torchrun with two CPU processes over gloo).

Loads the tiny model as a sharded run would (4-bit attention packed into float32), attaches seeded random LoRA,
computes loss and LoRA gradients unsharded, then applies FSDP2's `fully_shard` to every decoder layer and the root
and computes them again. Rank 0 writes the local and full shapes of the expert storage and both results as JSON.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from finetune.distributed.sharding import local_bytes
from finetune.moe.loading import load_mixtral
from finetune.moe.lora import apply_lora


def main(model_dir: str, quantization: str, out: str) -> None:
    dist.init_process_group("gloo")
    storage = torch.float32 if quantization != "none" else torch.uint8
    base, report = load_mixtral(model_dir, quantization=quantization, dtype=torch.float32, quant_storage=storage)
    model = apply_lora(
        base,
        attention_targets=["q_proj", "v_proj"],
        r=4,
        alpha=8,
        dropout=0.0,
        expert_targets=["gate_up_proj", "down_proj"],
        expert_r=2,
        expert_alpha=4,
    )
    g = torch.Generator().manual_seed(0)  # the same LoRA on every rank
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=g) * 0.05
    model.train()
    ids = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(1))

    loss_ref = model(input_ids=ids, labels=ids).loss
    loss_ref.backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    experts = model.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    data = experts.gate_up_proj_data
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    diffs = {
        n: (p.grad.full_tensor() - grads_ref[n]).abs().max().item()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    result = {
        "is_dtensor": isinstance(data, DTensor),
        "local_shape": list(data.to_local().shape),
        "full_shape": list(data.shape),
        "loss_ref": loss_ref.item(),
        "loss": loss.item(),
        "max_grad_diff": max(diffs.values()),
        "grad_scale": max(g.abs().max().item() for g in grads_ref.values()),
        "expert_grads": sum(1 for n in diffs if ".experts." in n),
        "model_bytes": report.model_bytes,
        "local_bytes": local_bytes(model),
    }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
