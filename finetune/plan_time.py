"""Time part of `finetune plan`: FLOPs per token from the active parameters, utilisation (measured or assumed),
and tokens per epoch from a tokenised sample of the data."""

from __future__ import annotations

import json
import math
from pathlib import Path

GPU_CHECK_RESULT = Path(__file__).resolve().parent.parent / "bench" / "results" / "gpu_check.json"
ASSUMED_HFU = 0.20  # hardware FLOPs utilisation when bench/results/gpu_check.json holds no measurement


# ---- time -------------------------------------------------------------------------------------------------------


def active_params(config) -> int:
    """Parameters one token passes through: attention projections, router, top-k experts, lm_head (no embedding)."""
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    attention = h * heads * d * 2 + 2 * h * kv * d
    moe = config.num_local_experts * h + config.num_experts_per_tok * 3 * h * config.intermediate_size
    return config.num_hidden_layers * (attention + moe) + config.vocab_size * h


def flops_per_token(config, seq: int, checkpointing: bool) -> float:
    """Forward 2x active params, backward 2x (input gradients through frozen weights), recompute 2x more with
    checkpointing; causal attention scores 2*seq*heads*head_dim per layer forward, twice that backward."""
    heads = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    passes = 3 if checkpointing else 2
    scores = config.num_hidden_layers * 2 * seq * heads * d
    return 2 * passes * active_params(config) + scores * (passes + 1)


def measured_hfu(path: Path = GPU_CHECK_RESULT) -> tuple[float, str] | None:
    """Hardware FLOPs utilisation of our variant in a gpu_check.json, recomputed with `flops_per_token`."""
    if not path.is_file():
        return None
    from finetune.tiny import TinySpec, mixtral_config

    data = json.loads(path.read_text())
    ours = next((r for r in data.get("results", []) if r.get("variant") == "ours" and r.get("tokens_per_s")), None)
    if ours is None:
        return None
    sh, run = data["shape"], data["settings"]["run"]
    spec = TinySpec(sh["hidden"], sh["ffn"], sh["layers"], sh["experts"], sh["top_k"], sh["heads"], sh["kv_heads"])
    config = mixtral_config(spec, vocab_size=sh["vocab"])
    peak = data["settings"]["cli"]["peak_tflops"] * 1e12
    hfu = ours["tokens_per_s"] * flops_per_token(config, run["seq"], run["grad_ckpt"]) / peak
    gpu = data.get("environment", {}).get("gpu") or data.get("environment", {}).get("device", "a GPU")
    return hfu, f"measured {hfu:.1%} on {gpu} ({path.name})"


def time_estimate(config, s, gpu, tokens_per_epoch: int | None, epochs: float, max_steps: int):
    hfu, source = measured_hfu() or (ASSUMED_HFU, f"assumed {ASSUMED_HFU:.0%} (no bench/results/gpu_check.json)")
    fpt = flops_per_token(config, s.max_length, s.gradient_checkpointing)
    tokens_per_s = s.num_gpus * hfu * gpu.bf16_tflops * 1e12 / fpt
    tokens_per_step = s.max_length * s.batch_size * s.sequences_per_record * s.grad_accum * s.num_gpus
    out = {"flops_per_token": fpt, "active_params": active_params(config), "hfu": hfu, "hfu_source": source,
           "tokens_per_second": tokens_per_s, "tokens_per_step": tokens_per_step, "gpu": gpu.name}  # fmt: skip
    if max_steps > 0:
        out["steps"] = max_steps
    elif tokens_per_epoch:
        out["steps"] = math.ceil(epochs * tokens_per_epoch / tokens_per_step)
        out["tokens_per_epoch"] = tokens_per_epoch
    if "steps" in out:
        out["seconds"] = out["steps"] * tokens_per_step / tokens_per_s
    return out


def data_tokens(recipe, folder: Path) -> tuple[int | None, str]:
    """Tokens per epoch from the data: tokenise a sample of up to 200 records per source and scale up."""
    import tempfile

    try:
        from data_tools.pipeline import check_pad_token, format_spec, tokenize_records
        from data_tools.validate import load_source
        from finetune.model import load_tokenizer

        tokenizer = load_tokenizer(folder)
        check_pad_token(tokenizer)
        spec = format_spec(recipe.data, tokenizer, folder)
        total = 0
        for src in recipe.data.train:
            records = load_source(src.path, src.format, src.split, kind="conversation").records
            sample = records[:200]
            with tempfile.TemporaryDirectory() as tmp:
                ds = tokenize_records(sample, spec, tokenizer, recipe.data.max_length, cache_dir=Path(tmp))
                mean = sum(min(n, recipe.data.max_length) for n in ds["length"]) / max(1, len(ds))
            n = src.samples or round(len(records) * (src.weight or 1.0))
            total += int(mean * n)
        return total, f"from a tokenised sample of up to 200 records per source ({len(recipe.data.train)} source(s))"
    except Exception as e:  # data offline or unreadable: the time estimate then gives tokens/s only
        return None, f"data not read ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
