"""Mixtral's router, computed in float32 whatever the surrounding precision.

Routing is precision-sensitive: a top-2 choice between two close logits flips under bf16 rounding, and generation
(fp32 on CPU, no autocast) must route as training did. Two things would otherwise narrow it during training:
`torch.autocast(bfloat16)` (which the Trainer and accelerate wrap around the forward) runs `F.linear` in bf16, and
FSDP2's mixed precision (`MixedPrecisionPolicy(param_dtype=bf16)`) gathers the weight in bf16. So the router turns
autocast off for its own matmul and upcasts both operands itself. A weight gathered in bf16 from a bf16 checkpoint
is exact; only a trainable router's fp32 master weight is rounded by that gather (as every other FSDP2 weight is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter


class Float32Router(MixtralTopKRouter):
    """`MixtralTopKRouter` with fp32 logits under autocast and mixed precision.

    A subclass, so transformers' router-logit recorder (aux loss) and our `ExpertLoadTracker` still find it by type.
    """

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            router_logits = F.linear(hidden_states.float(), self.weight.float())  # (tokens, num_experts)
        router_probs = torch.softmax(router_logits, dim=-1)
        router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
        router_top_value = router_top_value / router_top_value.sum(dim=-1, keepdim=True)
        return router_logits, router_top_value, router_indices
