"""Per-expert LoRA on quantised experts, saved as a standard PEFT `target_parameters` adapter.

Attention LoRA (and a trainable router) go through stock PEFT. Expert LoRA is our `ExpertLoraLayer`: it has exactly
the module structure, parameter names and shapes of PEFT's `lora.ParamWrapper` (lora_A (E*r, in) expert-slowest,
lora_B (out, r*E) expert-fastest, gate_up wrapped innermost), so PEFT's own `save_pretrained` writes the keys stock
PEFT expects, and `disable_adapter()` (DPO's reference model) switches it off. Unlike ParamWrapper it never folds
B·A into the expert stack: `QuantizedExperts` computes (x·A_e)·B_e·scaling inside the routed forward.

Expert LoRA has no dropout (ParamWrapper can't express it either), and the saved config records `lora_dropout=0`
because stock PEFT refuses to load `target_parameters` with dropout; attention dropout is a training-time setting.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper, set_peft_model_state_dict
from peft.utils.constants import DUMMY_TARGET_MODULES
from safetensors.torch import load_file
from torch import nn

from finetune.errors import UserError
from finetune.moe.expert_layer import ExpertLoraLayer
from finetune.moe.peft_model import MixtralPeftModel, write_expert_ranks
from finetune.moe.quantized import PROJECTIONS, QuantizedExperts

EXPERT_PREFIX = "mlp.experts."
ROUTER_MODULE = "mlp.gate"


def _normalise_expert_targets(expert_targets: list[str]) -> list[str]:
    names = []
    for target in expert_targets:
        short = target.removeprefix(EXPERT_PREFIX)
        if short not in PROJECTIONS:
            raise UserError(
                f"expert LoRA target {target!r} matches nothing",
                [f"expert targets are {', '.join(PROJECTIONS)} (optionally prefixed by {EXPERT_PREFIX!r})"],
            )
        names.append(short)
    return [p for p in PROJECTIONS if p in names]  # gate_up innermost, as PEFT nests them


def _check_attention_targets(model: nn.Module, targets: list[str]) -> None:
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        raise UserError(
            f"LoRA target module(s) {', '.join(map(repr, unmatched))} match nothing in the model",
            ["Mixtral attention projections are q_proj, k_proj, v_proj, o_proj"],
        )


def _build(
    model: nn.Module,
    *,
    attention_targets: list[str] | str,
    r: int,
    alpha: float,
    dropout: float,
    experts: dict[str, tuple[int, float]],
    modules_to_save: list[str] | None,
    use_rslora: bool,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Stock PEFT for attention (+ modules_to_save), then ExpertLoraLayer on every QuantizedExperts."""
    if not attention_targets and not experts:
        raise UserError("LoRA needs at least one target: attention modules or expert projections")
    if isinstance(attention_targets, list):
        _check_attention_targets(model, attention_targets)
    if experts and not any(isinstance(m, QuantizedExperts) for m in model.modules()):
        raise UserError("expert LoRA needs a model from finetune.moe.load_mixtral (no QuantizedExperts found)")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=attention_targets or DUMMY_TARGET_MODULES,
        modules_to_save=modules_to_save,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        bias="none",
        task_type="CAUSAL_LM",
    )
    config.base_model_name_or_path = model.__dict__.get("name_or_path") or None
    # as get_peft_model would build it, but with add_adapter/set_adapter that reach the expert layers (TRL's ref)
    peft_model = MixtralPeftModel(model, config, adapter_name=adapter_name)

    for name, module in list(peft_model.named_modules()):
        if not isinstance(module, QuantizedExperts):
            continue
        parent_name, _, child = name.rpartition(".")
        wrapped: nn.Module = module
        for proj in PROJECTIONS:
            if proj in experts:
                expert_r, expert_alpha = experts[proj]
                wrapped = ExpertLoraLayer(wrapped, proj, adapter_name, expert_r, expert_alpha, use_rslora=use_rslora)
        setattr(peft_model.get_submodule(parent_name), child, wrapped)

    # Record the expert targets where stock PEFT looks for them, so PeftModel.save_pretrained (ours, TRL's
    # checkpoints) writes a standard target_parameters adapter.
    saved = peft_model.peft_config[adapter_name]
    if not attention_targets:
        saved.target_modules = set()
    if experts:
        saved.target_parameters = [EXPERT_PREFIX + p for p in PROJECTIONS if p in experts]
        saved.lora_dropout = 0.0
        write_expert_ranks(saved, {p: experts[p] for p in PROJECTIONS if p in experts})
    return peft_model


def apply_lora(
    model,
    *,
    attention_targets: list[str],
    r: int,
    alpha: float,
    dropout: float,
    expert_targets: list[str],
    expert_r: int,
    expert_alpha: float,
    train_router: bool = False,
    use_rslora: bool = False,
    adapter_name: str = "default",
) -> PeftModel:
    """Attach attention LoRA (stock PEFT), per-expert LoRA (split-style) and optionally a trainable router."""
    projections = _normalise_expert_targets(list(expert_targets))
    return _build(
        model,
        attention_targets=list(attention_targets),
        r=r,
        alpha=alpha,
        dropout=dropout,
        experts={p: (expert_r, expert_alpha) for p in projections},
        modules_to_save=[ROUTER_MODULE] if train_router else None,
        use_rslora=use_rslora,
        adapter_name=adapter_name,
    )


def save_adapter(model: PeftModel, output_dir, state_dict: dict | None = None) -> None:
    """Write a standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    `state_dict`: the adapter weights gathered whole, for a model whose own are FSDP shards (`finetune.distributed.sharding`).
    """
    model.save_pretrained(str(output_dir), save_embedding_layers=False, state_dict=state_dict)


def load_adapter(model, adapter_dir, *, is_trainable: bool = False, dropout: float = 0.0) -> PeftModel:
    """Our model (from load_mixtral) + a saved adapter, checking that every adapter key lands on a model weight.

    `dropout` re-applies attention LoRA dropout when resuming training (the saved config carries 0, see module doc).
    """
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not (adapter_dir / "adapter_config.json").is_file() or not weights.is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    rank_pattern, alpha_pattern = dict(cfg.rank_pattern or {}), dict(cfg.alpha_pattern or {})
    experts = {}
    for target in cfg.target_parameters or []:
        proj = target.rpartition(".")[2]
        if target.removeprefix("model.") != EXPERT_PREFIX + proj or proj not in PROJECTIONS:
            raise UserError(f"adapter targets parameter {target!r}, which is not a Mixtral expert projection")
        experts[proj] = (rank_pattern.pop(target, cfg.r), alpha_pattern.pop(target, cfg.lora_alpha))
    attention = cfg.target_modules
    attention = sorted(attention) if isinstance(attention, (set, list, tuple)) else attention
    peft_model = _build(
        model,
        attention_targets=attention or [],
        r=cfg.r,
        alpha=cfg.lora_alpha,
        dropout=dropout,
        experts=experts,
        modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,
        use_rslora=cfg.use_rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    result = set_peft_model_state_dict(peft_model, load_file(str(weights)))
    missing = [k for k in result.missing_keys if ".lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:
        problems = [f"unexpected: {k}" for k in result.unexpected_keys[:10]] + [f"missing: {k}" for k in missing[:10]]
        raise UserError(f"adapter {adapter_dir} does not fit this model", problems)
    if not is_trainable:
        for p in peft_model.parameters():
            p.requires_grad_(False)
        peft_model.eval()
    return peft_model


def lora_summary(model: nn.Module) -> list[str]:
    """Human lines: what LoRA targets, with module and parameter counts."""
    attention, experts, router = {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertLoraLayer):
            key = (module.parameter_name, tuple(module.r.values()), tuple(module.lora_alpha.values()))
            n, p = experts.get(key, (0, 0))
            params = sum(x.numel() for x in list(module.lora_A.parameters()) + list(module.lora_B.parameters()))
            experts[key] = (n + 1, p + params)
        elif isinstance(module, LoraLayer):
            key = (name.rpartition(".")[2], tuple(module.r.values()), tuple(module.lora_alpha.values()))
            n, p = attention.get(key, (0, 0))
            params = sum(x.numel() for x in list(module.lora_A.parameters()) + list(module.lora_B.parameters()))
            attention[key] = (n + 1, p + params)
        elif isinstance(module, ModulesToSaveWrapper):
            key = name.rpartition(".")[2]
            n, p = router.get(key, (0, 0))
            router[key] = (n + 1, p + sum(x.numel() for x in module.modules_to_save.parameters()))
    lines = []
    for (target, rs, alphas), (n, p) in sorted(attention.items()):
        lines.append(f"attention LoRA {target}: {n} modules, r={rs[0]}, alpha={alphas[0]}, {p:,} params")
    for (target, rs, alphas), (n, p) in sorted(experts.items()):
        per = next(m for m in model.modules() if isinstance(m, ExpertLoraLayer)).num_experts
        lines.append(
            f"expert LoRA {target}: {n} layers x {per} experts, r={rs[0]}, alpha={alphas[0]}, {p:,} params "
            "(split-style on quantised experts)"
        )
    for target, (n, p) in sorted(router.items()):
        lines.append(f"fully trained (modules_to_save) {target}: {n} modules, {p:,} params")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"trainable parameters: {trainable:,}")
    return lines
