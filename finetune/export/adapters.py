"""Per-expert adapter export: the fused expert LoRA rewritten as one lora_A/lora_B pair per expert and per w1/w2/w3.

Serving engines (vLLM's Mixtral LoRA) name the experts as pre-v5 checkpoints do, `model.layers.L.block_sparse_moe.
experts.E.w1|w2|w3`. Our adapter is PEFT's `target_parameters` layout: one pair per layer and projection, lora_A
(E*r, in) with the expert index slowest and lora_B (out, r*E) with it fastest, and gate_up_proj rows are [w1 (gate);
w3 (up)]. So A_e = A[e*r:(e+1)*r] and B_e = B[:, e::E]; w1 and w3 share A_e and take B_e's gate and up rows.

Stock PEFT reads the result on a transformers-v5 Mixtral (peft/utils/transformers_weight_conversion.py): it maps
w1+w3 to gate_up_proj at rank 2r with a block-diagonal B and alpha doubled, and w2 to down_proj at rank r, alpha
from the config's `r`/`lora_alpha`. So the written config carries the expert rank and alpha there (attention gets
rank_pattern/alpha_pattern when it differs), and rsLoRA scaling is rewritten as plain alpha/r (alpha * sqrt(r)),
because the conversion's doubled rank would otherwise change it. Attention LoRA and a trained router copy unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from finetune.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")  # PEFT nests them in this order: gate_up innermost
LAYOUTS = ("per-expert",)
PER_EXPERT_NAMES = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.)mlp\.experts\.(?P<nest>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight$"
)


@dataclass(frozen=True)
class ExportSummary:
    output: Path
    layers: int
    experts: int
    expert_rank: int
    projections: tuple[str, ...]  # w1/w2/w3 written
    copied: int  # tensors copied unchanged (attention LoRA, router)
    router: bool  # the adapter carries a trained router (modules_to_save)
    copied_router: int = 0  # of `copied`, the router's tensors


def find_adapter(run_dir: Path) -> Path:
    """The adapter folder of a run (RUN/adapter), or `run_dir` itself when it is an adapter folder."""
    for candidate in (run_dir, run_dir / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file() and (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    if not run_dir.exists():
        raise UserError(f"{run_dir} does not exist; give a run folder (with adapter/) or an adapter folder")
    raise UserError(
        f"{run_dir} holds no adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} in it or in its adapter/ folder); "
        "is the run finished?"
    )


def _plain_alpha(alpha: float, r: int, rslora: bool) -> float:
    """The alpha that gives the same scale under plain alpha/r as `alpha` under `rslora`."""
    return alpha * math.sqrt(r) if rslora else alpha


def _expert_settings(config: dict, where: Path) -> dict[str, tuple[int, float]]:
    """(rank, alpha) per targeted expert projection, from target_parameters and the rank/alpha patterns."""
    experts = {}
    for target in config.get("target_parameters") or []:
        proj = target.rpartition(".")[2]
        if proj not in EXPERT_PROJECTIONS or not target.removeprefix("model.").startswith("mlp.experts."):
            raise UserError(f"{where}: target_parameters names {target!r}, which is not a Mixtral expert projection")
        r = (config.get("rank_pattern") or {}).get(target, config["r"])
        experts[proj] = (r, (config.get("alpha_pattern") or {}).get(target, config["lora_alpha"]))
    return {p: experts[p] for p in EXPERT_PROJECTIONS if p in experts}


def per_expert_config(config: dict, where: Path) -> dict:
    """The adapter_config.json of the per-expert layout (see module docstring for why r/alpha move around)."""
    experts = _expert_settings(config, where)
    attention = config.get("target_modules") or []
    if isinstance(attention, str):
        raise UserError(f"{where}: target_modules is the pattern {attention!r}; the per-expert export needs a list")
    if len(set(experts.values())) > 1:
        found = ", ".join(f"{p} r={r} alpha={a}" for p, (r, a) in experts.items())
        raise UserError(f"{where}: the per-expert layout needs one expert rank and alpha for w1/w2/w3, found {found}")
    rslora = bool(config.get("use_rslora"))
    r_att, alpha_att = config["r"], config["lora_alpha"]
    old_ranks = {k: v for k, v in (config.get("rank_pattern") or {}).items() if not k.endswith(EXPERT_PROJECTIONS)}
    old_alphas = {k: v for k, v in (config.get("alpha_pattern") or {}).items() if not k.endswith(EXPERT_PROJECTIONS)}
    rank_pattern = dict(old_ranks)
    alpha_pattern = {k: _plain_alpha(a, old_ranks.get(k, r_att), rslora) for k, a in old_alphas.items()}
    if rslora:  # a rank override without an alpha override was scaled alpha / sqrt(its rank)
        alpha_pattern.update({k: _plain_alpha(alpha_att, r, True) for k, r in old_ranks.items() if k not in old_alphas})
    out = dict(config)
    if experts:
        r_exp, alpha_exp = next(iter(experts.values()))
        out["r"], out["lora_alpha"] = r_exp, _plain_alpha(alpha_exp, r_exp, rslora)
        for target in attention:  # attention keeps its own rank and scale through patterns
            if r_att != out["r"]:
                rank_pattern.setdefault(target, r_att)
            if _plain_alpha(alpha_att, r_att, rslora) != out["lora_alpha"]:
                alpha_pattern.setdefault(target, _plain_alpha(alpha_att, r_att, rslora))
    else:
        out["lora_alpha"] = _plain_alpha(alpha_att, r_att, rslora)
    names = [w for p in experts for w in PER_EXPERT_NAMES[p]]
    out.update(
        target_modules=sorted(attention) + names,
        target_parameters=None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=False,
    )
    return out


def per_expert_tensors(tensors: dict[str, torch.Tensor], projections: list[str], rank: int, where: Path):
    """Split every fused expert lora_A/lora_B into per-expert w1/w2/w3 pairs; other tensors pass through.

    Returns (tensors, number of layers, number of experts, number copied unchanged).
    """
    depth_of = {len(projections) - 1 - i: p for i, p in enumerate(projections)}  # the last one is outermost
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    out, copied = {}, 0
    for key, tensor in tensors.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            out[key] = tensor
            copied += 1
            continue
        proj = depth_of.get(m.group("nest").count("base_layer."))
        if proj is None:
            raise UserError(f"{where}: tensor {key} does not fit the adapter's target_parameters {projections}")
        fused.setdefault((m.group("prefix"), proj), {})[m.group("ab")] = tensor
    experts_seen = set()
    for (prefix, proj), pair in fused.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"{where}: layer {prefix}mlp.experts has lora_{''.join(pair)} for {proj} but not both")
        a, b = pair["A"], pair["B"]
        if a.shape[0] % rank or b.shape[1] != a.shape[0]:
            raise UserError(
                f"{where}: {proj} LoRA of {prefix}mlp.experts has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"which is not (experts*{rank}, in) and (out, {rank}*experts)"
            )
        n = a.shape[0] // rank
        experts_seen.add(n)
        rows = b.shape[0] // len(PER_EXPERT_NAMES[proj])  # gate_up: gate rows first, then up
        for e in range(n):
            a_e, b_e = a[e * rank : (e + 1) * rank], b[:, e::n]
            for i, name in enumerate(PER_EXPERT_NAMES[proj]):
                base = f"{prefix}block_sparse_moe.experts.{e}.{name}"
                out[f"{base}.lora_A.weight"] = a_e.clone().contiguous()
                out[f"{base}.lora_B.weight"] = b_e[i * rows : (i + 1) * rows].contiguous()
    if len(experts_seen) > 1:
        raise UserError(f"{where}: layers disagree on the number of experts ({sorted(experts_seen)})")
    layers = len({prefix for prefix, _ in fused})
    return out, layers, next(iter(experts_seen), 0), copied


def _check_output(output: Path, run_dir: Path, adapter: Path, overwrite: bool) -> None:
    """Refuse an OUT that holds the source (replacing it would delete it) or lies inside the adapter folder."""
    out = output.resolve()
    for source in {run_dir.resolve(), adapter.resolve()}:
        if out == source or out in source.parents:
            raise UserError(f"-o {output} holds the run or adapter being exported; choose another folder")
    if adapter.resolve() in out.parents:
        raise UserError(f"-o {output} is inside the adapter folder being exported; choose another folder")
    if output.exists() and not overwrite:
        raise UserError(f"{output} already exists; pass --overwrite to replace it, or choose another folder")


def _replace(tmp: Path, output: Path) -> None:
    """Swap the finished temp folder in; an existing output is moved aside first and removed last."""
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def export_per_expert(run_dir, output, *, overwrite: bool = False) -> ExportSummary:
    """Write the run's adapter in the per-expert layout to `output` (a temp folder beside it, then renamed)."""
    run_dir, output = Path(run_dir), Path(output)
    adapter = find_adapter(run_dir)
    _check_output(output, run_dir, adapter, overwrite)
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    except Exception as e:  # bad JSON, truncated safetensors: the adapter folder is broken
        raise UserError(f"{adapter} is not a readable PEFT adapter ({type(e).__name__}: {e})") from None
    if config.get("peft_type") != "LORA" or "r" not in config:
        raise UserError(
            f"{adapter / ADAPTER_CONFIG} is not a LoRA adapter config (peft_type {config.get('peft_type')})"
        )
    new_config = per_expert_config(config, adapter)
    experts = _expert_settings(config, adapter)
    rank = next(iter(experts.values()))[0] if experts else config["r"]
    new_tensors, layers, n_experts, copied = per_expert_tensors(tensors, list(experts), rank, adapter)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for extra in adapter.iterdir():  # tokenizer files, model card
            if extra.is_file() and extra.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy2(extra, tmp / extra.name)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(new_tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        _replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = tuple(w for p in experts for w in PER_EXPERT_NAMES[p])
    router = bool(config.get("modules_to_save"))
    copied_router = sum(1 for key in new_tensors if ".mlp.gate." in key)  # the router is copied, never split
    return ExportSummary(output, layers, n_experts, rank, names, copied, router, copied_router)


def export_adapter(run_dir, output, *, layout: str = "per-expert", overwrite: bool = False) -> ExportSummary:
    """`finetune export-adapter`: the one layout today is per-expert."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout: {layout!r} is not a known layout; choose one of {', '.join(LAYOUTS)}")
    return export_per_expert(run_dir, output, overwrite=overwrite)


def copied_text(copied: int, router: int) -> str:
    """`16 attention LoRA tensors, 2 router tensors`: only what was copied."""
    parts = [f"{copied - router} attention LoRA tensors"] if copied - router else []
    parts += [f"{router} router tensors (trained, modules_to_save)"] if router else []
    return ", ".join(parts) or "nothing"


def summary_lines(summary: ExportSummary) -> list[str]:
    """What was written, and what a serving engine or stock PEFT will not take from it."""
    lines = [f"wrote {summary.output}"]
    if summary.projections:
        lines.append(
            f"experts: {summary.layers} layers x {summary.experts} experts x {'/'.join(summary.projections)}, "
            f"rank {summary.expert_rank} each (block_sparse_moe.experts.E.{'/'.join(summary.projections)})"
        )
    else:
        lines.append("experts: the adapter has no expert LoRA; written unchanged")
    lines.append(f"copied unchanged: {copied_text(summary.copied, summary.copied_router)}")
    if summary.router:
        lines.append(
            "note: the adapter trains the router (modules_to_save mlp.gate); vLLM refuses modules_to_save, "
            "so serve a merged model (finetune merge) to keep it"
        )
    if {"w1", "w3"} <= set(summary.projections):
        lines.append(
            "note: stock PEFT on transformers v5 loads this by fusing w1/w3 into gate_up_proj at rank 2r and alpha "
            "2x: the same scale, so the same model"
        )
    if set(summary.projections) == {"w1", "w3"}:
        lines.append(
            "note: stock PEFT (0.21, 0.22) loads w1/w3 expert LoRA only next to w2 (it targets experts.base_layer); "
            "this w1/w3-only adapter is for serving engines, PEFT would leave it unloaded"
        )
    return lines
