"""The built-in tiny Mixtral: seeded random weights plus the real Mixtral v1 tokenizer, fully offline.

It lets a newcomer run the whole pipeline on a laptop, and tests build their models the same way.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TINY_MODEL_NAME = "tiny-random-mixtral"
# Bumped when what write_tiny_model writes changes; a cached built-in of another build is written again (same seed,
# same weights). 2: the tokenizer adds BOS, as Mixtral's does.
BUILD = "2"


@dataclass(frozen=True)
class TinySpec:
    """Dimensions of a tiny Mixtral. The defaults keep Mixtral's 8 experts with top-2 routing."""

    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    experts: int = 8
    top_k: int = 2
    heads: int = 4
    kv_heads: int = 2
    seed: int = 0
    max_position_embeddings: int = 4096
    # Wider than Mixtral's 0.02: with hidden 64 and a frozen final norm, 0.02 caps every logit near 1, so no
    # adapter could lower the loss much; at 0.1 LoRA has room to learn and the loss visibly drops.
    initializer_range: float = 0.1


def mistral_v1_tokenizer_file() -> Path:
    """Mixtral-8x7B's SentencePiece tokenizer, shipped inside the mistral-common package."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise FileNotFoundError(f"mistral-common does not ship {path}; reinstall mistral-common>=1.8")
    return path


def write_tokenizer(output: Path) -> None:
    """Write the Mixtral v1 tokenizer as a transformers tokenizer folder (tokenizer.model + tokenizer.json).

    BOS on every encode and no EOS, as Mixtral-8x7B's own tokenizer (and mistral-common, and llama.cpp reading the
    GGUF file) does; transformers v5's LlamaTokenizer built from a bare tokenizer.model adds neither."""
    from transformers import LlamaTokenizer

    output.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mistral_v1_tokenizer_file(), output / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(output), add_bos_token=True, add_eos_token=False)
    tokenizer.save_pretrained(str(output))


def mixtral_config(spec: TinySpec, vocab_size: int = 32000):
    """A `MixtralConfig` of the given dimensions with Mixtral's token ids (BOS 1, EOS 2), untied embeddings."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        num_local_experts=spec.experts,
        num_experts_per_tok=spec.top_k,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=spec.initializer_range,
    )


def write_tiny_model(output: str | Path, spec: TinySpec = TinySpec(), *, dtype: torch.dtype = torch.float32) -> Path:
    """Write a seeded random `MixtralForCausalLM` and the Mixtral v1 tokenizer to `output` (safetensors)."""
    from transformers import MixtralForCausalLM

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config = mixtral_config(spec)
    torch.manual_seed(spec.seed)
    model = MixtralForCausalLM(config).to(dtype)
    model.save_pretrained(str(output), safe_serialization=True)
    write_tokenizer(output)
    (output / "tiny_spec.txt").write_text(repr(asdict(spec)) + "\n")
    (output / "tiny_build.txt").write_text(BUILD + "\n")
    return output


def cache_root() -> Path:
    """Where built-in models are materialised: $FINETUNE_CACHE, else ~/.cache/finetune."""
    env = os.environ.get("FINETUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "finetune"


def materialize_builtin(name: str = TINY_MODEL_NAME) -> Path:
    """Return the folder of a built-in model, writing it on first use (atomically, via a temp folder)."""
    if name != TINY_MODEL_NAME:
        raise ValueError(f"unknown built-in model {name!r}; the built-in model is {TINY_MODEL_NAME!r}")
    target = cache_root() / name
    build = target / "tiny_build.txt"
    if (target / "config.json").exists() and build.exists() and build.read_text().strip() == BUILD:
        return target
    tmp = target.with_name(f"{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_tiny_model(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target
