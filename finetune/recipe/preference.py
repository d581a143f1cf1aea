"""The `dpo:` and `kto:` sections: TRL's preference settings, with the values TRL accepts checked before loading."""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from finetune.recipe.errors import closest
from finetune.recipe.sections import Strict

DpoLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
DPO_LOSSES = typing.get_args(DpoLoss)
# Losses built on the chosen-rejected reward difference: the only ones TRL lets a non-default f-divergence change.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
INIT_ADAPTER_TEXT = (
    "Start from this adapter (an SFT run's folder or its adapter/ folder): the reference is base + this adapter, "
    "frozen, while a trainable copy of it learns; none = a fresh adapter, so the reference is the base"
)
PRECOMPUTE_TEXT = (
    "Compute the reference log-probabilities in one extra pass over the data before training, instead of a "
    "reference forward pass every step"
)


class DpoSettings(Strict):
    """`dpo:`, read when method is dpo. Field names are trl.DPOConfig's, so the builder passes them as they are."""

    beta: float = Field(
        0.1, gt=0, le=100, description="How far the policy may move from the reference: higher = stays closer"
    )
    loss_type: list[DpoLoss] = Field(
        default_factory=lambda: ["sigmoid"],
        description="DPO loss: one name or a list of names whose losses are added (weighted by loss_weights)",
    )
    loss_weights: list[float] | None = Field(
        None, description="One weight (>= 0) per loss_type entry when combining losses; none = 1.0 each"
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed chance a preference label is flipped (sigmoid, robust); EXO's epsilon, > 0 for exo_pair",
    )
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl", description="Divergence that keeps the policy near the reference (f-DPO); reverse_kl = DPO"
    )
    f_alpha_divergence_coef: float = Field(
        0.5, gt=0, le=10, description="Alpha of the alpha-divergence; used only with f_divergence_type alpha_divergence"
    )
    use_weighting: bool = Field(False, description="Weight pairs by the policy's probability of them (WPO)")
    ld_alpha: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Weight of the tokens beyond the shorter answer's length (LD-DPO); none = no length weighting",
    )
    discopop_tau: float = Field(0.05, gt=0, le=100, description="Temperature of the discopop loss; used only by it")
    precompute_ref_log_probs: bool = Field(False, description=PRECOMPUTE_TEXT)
    init_adapter: str | None = Field(None, description=INIT_ADAPTER_TEXT)

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list):
            return value  # the type check says what is wrong
        if not names:
            raise ValueError(f"is empty; give a loss name or a list of them: {', '.join(DPO_LOSSES)}")
        for name in names:
            if isinstance(name, str) and name not in DPO_LOSSES:
                hint = closest(name, list(DPO_LOSSES))
                guess = f"did you mean {hint[0]}? " if hint else ""
                raise ValueError(f"unknown loss {name!r}; {guess}accepted: {', '.join(DPO_LOSSES)}")
        return names

    @field_validator("loss_weights")
    @classmethod
    def _weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(w < 0 for w in value):
            raise ValueError(f"got {value}; every weight must be >= 0")
        return value

    @model_validator(mode="after")
    def _as_trl_checks(self) -> DpoSettings:
        """TRL's own refusals, which would otherwise come as a traceback after the model has loaded."""
        losses = self.loss_type
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(
                f"dpo.loss_weights: has {len(self.loss_weights)} weight(s) for {len(losses)} loss_type(s) "
                f"{losses}; give one weight per loss"
            )
        if "exo_pair" in losses and self.label_smoothing == 0:
            raise ValueError("dpo.label_smoothing: must be > 0 for the exo_pair loss (the EXO paper suggests 0.001)")
        odd = [name for name in losses if name not in F_DIVERGENCE_LOSSES]
        if self.f_divergence_type != "reverse_kl" and odd:
            raise ValueError(
                f"dpo.f_divergence_type: {self.f_divergence_type} does not apply to loss {', '.join(odd)}; "
                f"use reverse_kl, or losses among {', '.join(F_DIVERGENCE_LOSSES)}"
            )
        if self.use_weighting and {"aot", "aot_unpaired"} & set(losses):
            raise ValueError("dpo.use_weighting: does not work with the aot/aot_unpaired losses; set it to false")
        unused = {
            "f_alpha_divergence_coef": (
                self.f_divergence_type == "alpha_divergence",
                "f_divergence_type is alpha_divergence",
            ),
            "discopop_tau": ("discopop" in losses, "loss_type includes discopop"),
        }
        for name, (used, condition) in unused.items():
            value = getattr(self, name)
            if not used and value != type(self).model_fields[name].default:
                raise ValueError(f"dpo.{name}: {value} has no effect unless {condition}; remove it")
        return self


class KtoSettings(Strict):
    """`kto:`, read when method is kto. Field names are trl.KTOConfig's."""

    beta: float = Field(
        0.1, gt=0, le=100, description="How far the policy may move from the reference: higher = stays closer"
    )
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto (needs training.batch_size >= 2 for its KL estimate) or apo_zero_unpaired"
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Weight of desirable examples' loss, to balance unequal desirable/undesirable counts",
    )
    undesirable_weight: float = Field(
        1.0, gt=0, le=100, description="Weight of undesirable examples' loss (see desirable_weight)"
    )
    precompute_ref_log_probs: bool = Field(False, description=PRECOMPUTE_TEXT)
    init_adapter: str | None = Field(None, description=INIT_ADAPTER_TEXT)
