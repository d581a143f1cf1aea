"""Reading a Mixtral safetensors checkpoint: its config, its shard files, its keys, and the check that the keys
fill the model exactly (every missing and unexpected key reported at once).

Both checkpoint layouts are understood: per-expert `block_sparse_moe.experts.E.w1/w2/w3` (Mixtral on the hub) and
the fused `mlp.experts.gate_up_proj` / `down_proj` stacks transformers v5 writes.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from safetensors import safe_open
from transformers import MixtralConfig, MixtralForCausalLM

from finetune.errors import UserError

PER_EXPERT_KEY = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
FUSED_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
PIECE_OF = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def _read_config(path: Path) -> MixtralConfig:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"no config.json in model folder {path}")
    raw = json.loads(config_file.read_text())
    model_type, archs = raw.get("model_type"), raw.get("architectures") or []
    if model_type != "mixtral":
        raise UserError(
            f"{path} is not a Mixtral model: found model_type={model_type!r}, architectures={archs}",
            ["finetune trains Mixtral-architecture MoE models (model_type 'mixtral', MixtralForCausalLM)"],
        )
    return MixtralConfig.from_pretrained(str(path))


def shard_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, in order; a broken index or a missing shard is a UserError naming it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise UserError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return [path / name for name in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors weights in {path}")
    return files


def _layer_of(key: str) -> int:
    """The decoder layer a checkpoint key belongs to (-1 for embeddings, norm, lm_head)."""
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else -1


def keys_of(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def _check_keys(keys: list[str], model: MixtralForCausalLM, config: MixtralConfig) -> None:
    """Every parameter must be filled exactly: report all missing and unexpected checkpoint keys at once."""
    n_layers, n_experts = config.num_hidden_layers, config.num_local_experts
    plain = {
        n
        for n, _ in model.named_parameters()
        if ".mlp.experts." not in n and ".mlp.gate." not in n and not n.endswith(".mlp.experts")
    }
    if config.tie_word_embeddings:
        plain.discard("lm_head.weight")
    pieces: dict[tuple[int, int], set[str]] = defaultdict(set)
    seen_plain, routers, unexpected = set(), set(), []
    for key in keys:
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if m := PER_EXPERT_KEY.match(key):
            layer, expert = int(m.group(1)), int(m.group(2))
            if layer >= n_layers or expert >= n_experts:
                unexpected.append(key)
            pieces[(layer, expert)].add(PIECE_OF[m.group(3)])
        elif m := FUSED_KEY.match(key):
            layer = int(m.group(1))
            if layer >= n_layers:
                unexpected.append(key)
            for e in range(n_experts):
                pieces[(layer, e)].update(("gate", "up") if m.group(2) == "gate_up_proj" else ("down",))
        elif m := ROUTER_KEY.match(key):
            routers.add(int(m.group(1)))
        elif key in plain:
            seen_plain.add(key)
        else:
            unexpected.append(key)
    missing = sorted(plain - seen_plain)
    missing += [f"router of layer {layer}" for layer in range(n_layers) if layer not in routers]
    for layer in range(n_layers):
        for e in range(n_experts):
            lacking = {"gate", "up", "down"} - pieces.get((layer, e), set())
            if lacking:
                missing.append(f"layer {layer} expert {e}: {'/'.join(sorted(lacking))} weights")
    if missing or unexpected:
        problems = [f"missing: {k}" for k in missing[:20]] + [f"unexpected: {k}" for k in unexpected[:20]]
        raise UserError(
            f"checkpoint does not match the Mixtral config ({len(missing)} missing, {len(unexpected)} unexpected)",
            problems,
        )
