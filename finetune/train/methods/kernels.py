"""What TRL's trainers compile on a GPU, checked before anything loads.

Every method (SFT, DPO, KTO) scores tokens through TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head` ->
`trl/kernels/chunked_logprob.py`), which projects the hidden states in tiles and folds each tile with a Triton kernel
on CUDA. No TRL config option selects or avoids it: the trainers always patch the fused head in, and the kernel file
takes its torch fallback only when Triton cannot be imported at all (`_use_triton`: Triton importable and a CUDA or
XPU device). Triton JIT-compiles a small C launcher at the first kernel launch, with `$CC` or else gcc or clang, and
Python's headers (`Python.h`); many GPU runtime images ship neither, and the run would then die at its first step,
after the model has loaded. So `fused_lm_head_problems` refuses such a setup before loading, naming what to install.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import torch


def c_compiler() -> str | None:
    """The C compiler Triton's build would use: $CC, else gcc, else clang (as triton/runtime/build.py picks it)."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def python_headers() -> Path:
    """Where Python.h must be for Triton's launcher build (the interpreter's include directory)."""
    return Path(sysconfig.get_paths()["include"]) / "Python.h"


def triton_available() -> bool:
    from transformers.utils import is_triton_available

    return bool(is_triton_available())


def fused_lm_head_problems(device_setting: str) -> list[str]:
    """The reason a CUDA run would fail at its first step compiling TRL's Triton kernel, if there is one."""
    cuda = device_setting != "cpu" and torch.cuda.is_available()
    if not cuda or not triton_available():  # CPU, or no Triton: TRL folds the tiles with torch ops
        return []
    missing = []
    if c_compiler() is None:
        missing.append("a C compiler ($CC is unset and neither gcc nor clang is on PATH)")
    headers = python_headers()
    if not headers.is_file():
        missing.append(f"Python's development headers ({headers} is missing)")
    if not missing:
        return []
    return [
        f"model.device: on CUDA, TRL's fused LM head (trl/kernels/chunked_logprob.py) compiles a Triton kernel at the "
        f"first training step, which needs {' and '.join(missing)}; install them (e.g. `apt-get install gcc "
        "python3-dev`, or the python3.X-dev that matches this Python), or point CC at a C compiler"
    ]
