"""What would break on a GPU, shown on a CPU: the int8 kernel's input dtype and the router's precision.

bitsandbytes' CUDA `int8_vectorwise_quant` refuses anything but float16; its CPU kernel also takes float32, so the
CPU path alone cannot show the bug. The router must give float32 logits under bf16 autocast (as the Trainer and
accelerate run the forward) and with a bf16 weight (as FSDP2 mixed precision gathers it).
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig

from finetune.moe import Float32Router, QuantizedExperts, load_mixtral
from finetune.moe.quantized import int8_kernel_dtype, int8_quantize


@pytest.fixture
def int8_calls(monkeypatch):
    """Every dtype bitsandbytes' int8_vectorwise_quant is called with."""
    dtypes = []
    original = bnbf.int8_vectorwise_quant

    def spy(A, threshold=0.0):
        dtypes.append(A.dtype)
        return original(A, threshold)

    monkeypatch.setattr(bnbf, "int8_vectorwise_quant", spy)
    return dtypes


def test_int8_experts_call_the_kernel_with_float16_off_the_cpu(int8_calls):
    """On a device (here meta, which runs bitsandbytes' shape-only kernel) set_expert passes float16, as CUDA needs."""
    assert int8_kernel_dtype(torch.device("cuda")) == torch.float16
    experts = QuantizedExperts(2, 16, 24, quantization="int8", dtype=torch.bfloat16, device="meta")
    experts.set_expert("gate_up_proj", 0, torch.randn(48, 16, dtype=torch.bfloat16))
    experts.set_expert("down_proj", 1, torch.randn(16, 24))
    assert int8_calls == [torch.float16, torch.float16]


def _wide_rows(g: torch.Generator) -> torch.Tensor:
    """Rows at very different scales: one beyond float16's range (65504), one far below its normal range."""
    w = torch.randn(6, 64, generator=g)
    scales = torch.tensor([1.0, 0.02, 3e5, 1e-6, 40.0, 7e-3])
    return w * scales[:, None]


def test_float16_kernel_input_matches_the_float32_path_within_int8_error(int8_calls):
    w = _wide_rows(torch.Generator().manual_seed(0))
    data16, scale16 = int8_quantize(w, kernel_dtype=torch.float16)
    data32, scale32, _ = bnbf.int8_vectorwise_quant(w.clone())  # bitsandbytes' CPU kernel in float32
    assert int8_calls[0] == torch.float16
    assert torch.equal(scale16, scale32)  # the row scale is the row's exact absmax, as float32 computes it
    assert (data16.int() - data32.int()).abs().max() <= 1  # float16 rounding moves a code by one step at most
    back16 = bnbf.int8_vectorwise_dequant(data16, scale16)
    back32 = bnbf.int8_vectorwise_dequant(data32, scale32)
    assert torch.isfinite(back16).all()
    step = scale32[:, None] / 127  # one int8 step of each row
    assert ((back16 - back32).abs() <= step * 1.0001).all()
    # half a step of rounding, plus float16's own (2^-11 of a row scaled into [1, 2), i.e. 127 * 2^-11 steps)
    assert ((back16 - w).abs() <= step * (0.5 + 127 * 2**-11)).all()


def test_float32_kernel_input_is_the_unchanged_cpu_path():
    w = _wide_rows(torch.Generator().manual_seed(1))
    data, scale = int8_quantize(w)  # on the CPU: float32, exactly what bitsandbytes' own call gives
    reference, reference_scale, _ = bnbf.int8_vectorwise_quant(w.clone())
    assert torch.equal(data, reference) and torch.equal(scale, reference_scale)


def _router(dtype: torch.dtype = torch.float32) -> Float32Router:
    config = MixtralConfig(hidden_size=64, num_local_experts=8, num_experts_per_tok=2)
    router = Float32Router(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 64, generator=torch.Generator().manual_seed(2)))
    return router.to(dtype)


def test_router_logits_stay_float32_under_bf16_autocast():
    router = _router()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    reference = F.linear(x.float(), router.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, scores, index = router(x)
    assert logits.dtype == torch.float32 and scores.dtype == torch.float32
    assert torch.equal(logits, reference)
    assert torch.equal(index, torch.topk(torch.softmax(reference, -1), 2, dim=-1).indices)


def test_router_computes_in_float32_from_a_bf16_gathered_weight():
    """FSDP2 mixed precision hands the router its weight in bf16: the matmul still runs in float32."""
    router = _router(torch.bfloat16)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    logits, _, _ = router(x)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, F.linear(x.float(), router.weight.float()))


def test_loaded_model_routes_in_float32_under_autocast(tiny_dir):
    model, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.bfloat16)
    seen = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda module, args, out: seen.append((module, args[0], out[0])))
    ids = torch.randint(0, 32000, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    assert len(seen) == 2
    for gate, hidden, logits in seen:
        assert logits.dtype == torch.float32
        assert torch.equal(logits, F.linear(hidden.reshape(-1, gate.hidden_dim).float(), gate.weight.float()))
