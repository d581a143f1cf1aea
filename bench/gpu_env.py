"""The GPU job's first stage: what this machine is, each probe on its own, so one that fails hides none of the rest.

Python, where each library was imported from (the image or the carried wheels), torch and CUDA, the GPU with its
dense bf16 peak from finetune's GPU table (and one measured bf16 matmul beside it), a C compiler and Python's headers
(Triton needs both), a trivial Triton kernel, and bitsandbytes' own diagnostics (`python -m bitsandbytes`).

    python bench/gpu_env.py --out env.json     # anywhere; the CUDA probes say why they did not run on a CPU machine
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "mistral_common",
             "pyarrow", "pandas", "triton", "pydantic", "sentencepiece")  # fmt: skip
DISTRIBUTIONS = {"mistral_common": "mistral-common"}


def gpu_peak(name: str, memory_bytes: int | None = None) -> dict[str, Any] | None:
    """finetune's GPU-table entry for a CUDA device name ('NVIDIA H100 80GB HBM3' -> h100), or None.

    The longest table key found in the name wins (so an L40S is not an L4, an A100 not an A10); between entries of
    one model (A100 40/80 GB) the memory decides."""
    sys.path.insert(0, str(ROOT))
    from finetune.plan.gpus import GPUS

    flat = re.sub(r"[\s_-]+", "", name.lower())
    found = [(key.split("-")[0], key, gpu) for key, gpu in GPUS.items() if key.split("-")[0] in flat]
    if not found:
        return None
    longest = max(len(base) for base, _, _ in found)
    found = [f for f in found if len(f[0]) == longest]
    _, key, gpu = min(found, key=lambda f: abs(f[2].memory_bytes - (memory_bytes or f[2].memory_bytes)))
    return {"key": key, "name": gpu.name, "bf16_tflops": gpu.bf16_tflops, "memory_bytes": gpu.memory_bytes}


def libraries() -> dict[str, Any]:
    out = {}
    for module in LIBRARIES:
        try:
            mod = importlib.import_module(module)
            where = str(Path(mod.__file__).parent) if getattr(mod, "__file__", None) else None
            version = getattr(mod, "__version__", None)
            if version is None:
                version = importlib.metadata.version(DISTRIBUTIONS.get(module, module))
            out[module] = {"version": str(version), "from": where}
        except Exception as exc:
            out[module] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def torch_and_gpu() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "available": torch.cuda.is_available(),
    }
    if not out["available"]:
        return out
    props = torch.cuda.get_device_properties(0)
    out.update(
        gpu=props.name,
        gpus=torch.cuda.device_count(),
        capability=f"{props.major}.{props.minor}",
        memory_bytes=props.total_memory,
        multiprocessors=props.multi_processor_count,
        cudnn=torch.backends.cudnn.version(),
        table=gpu_peak(props.name, props.total_memory),
    )
    n = 8192  # one dense bf16 matmul, for the card's reachable peak beside the table's
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    out["measured_bf16_matmul_tflops"] = round(2 * n**3 * reps / (time.perf_counter() - start) / 1e12, 1)
    return out


def compiler() -> dict[str, Any]:
    cc = shutil.which("gcc") or shutil.which("cc")
    out: dict[str, Any] = {"cc": cc}
    if cc:
        proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=20)
        out["version"] = (proc.stdout.splitlines() or [""])[0]
    include = sysconfig.get_paths().get("include", "")
    out["python_h"] = str(Path(include) / "Python.h") if (Path(include) / "Python.h").exists() else None
    return out


def triton_kernel() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"ok": None, "reason": "needs CUDA"}
    import triton
    import triton.language as tl

    @triton.jit
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(
            out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask), mask=mask
        )

    x = torch.randn(4096, device="cuda")
    y = torch.randn(4096, device="cuda")
    out = torch.empty_like(x)
    start = time.perf_counter()
    add[(4,)](x, y, out, 4096, BLOCK=1024)
    torch.cuda.synchronize()
    return {"ok": bool(torch.equal(out, x + y)), "triton": triton.__version__, "compile_s": time.perf_counter() - start}


PROJECT_MODULES = ("finetune.cli", "finetune.train.run", "finetune.plan.estimate", "finetune.distributed.sharding", "finetune.moe.loading",
                   "data_tools.pipeline", "trl.trainer.sft_trainer", "mistral_common.protocol.instruct.request",
                   "bitsandbytes.optim", "torch.distributed.fsdp")  # fmt: skip
BNB_OK = ("SUCCESS!", "CPU library loaded successfully")  # its CUDA check, or its CPU-only verdict


def project_imports() -> dict[str, Any]:
    """Every module the later stages import, each on its own: the install-and-import check."""
    sys.path.insert(0, str(ROOT))
    failed = {}
    for module in PROJECT_MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:
            failed[module] = f"{type(exc).__name__}: {exc}"[:300]
    return {"ok": not failed, "modules": list(PROJECT_MODULES), "failed": failed}


def start_bnb_diagnostics() -> subprocess.Popen:
    """`python -m bitsandbytes`, started first so it runs beside the other probes."""
    cmd = [sys.executable, "-m", "bitsandbytes"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def bnb_diagnostics(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"ok": False, "reason": f"python -m bitsandbytes ran past {timeout}s"}
    print(text[-6000:], flush=True)  # the whole report goes to the job's log
    ok = proc.returncode == 0 and any(marker in text for marker in BNB_OK)
    return {"ok": ok, "returncode": proc.returncode, "tail": text[-1500:]}


def probe(fn, *args) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as exc:
        return {
            "ok": False,
            "reason": f"{type(exc).__name__}: {exc}"[:500],
            "traceback": traceback.format_exc()[-2000:],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bnb-timeout", type=float, default=60)
    args = p.parse_args(argv)
    env: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    env["machine"] = platform.machine()
    bnb = start_bnb_diagnostics()
    steps = [("libraries", libraries, ()), ("project_imports", project_imports, ()), ("torch", torch_and_gpu, ()),
             ("compiler", compiler, ()), ("triton_kernel", triton_kernel, ()),
             ("bitsandbytes_diagnostics", bnb_diagnostics, (bnb, args.bnb_timeout))]  # fmt: skip
    for key, fn, fn_args in steps:
        env[key] = probe(fn, *fn_args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(env, indent=2) + "\n")
    t, libs = env["torch"], env["libraries"]
    print(f"python {env['python']} ({env['executable']}); torch {t.get('torch')} CUDA {t.get('cuda')}")
    print(
        f"gpu: {t.get('gpu', 'none')}; table: {t.get('table')}; measured bf16 matmul {t.get('measured_bf16_matmul_tflops')}"
    )
    print(f"compiler: {env['compiler']}; triton: {env['triton_kernel']}")
    print("libraries: " + ", ".join(f"{k} {v.get('version', 'MISSING')}" for k, v in libs.items()))
    print(f"bitsandbytes diagnostics: {'ok' if env['bitsandbytes_diagnostics'].get('ok') else 'FAILED'}")
    imports = env["project_imports"]
    print(f"project imports: {'ok' if imports.get('ok') else 'FAILED'} {imports.get('failed') or ''}")
    needed = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "mistral_common")
    return 1 if any("error" in libs[m] for m in needed) or not imports.get("ok") else 0


if __name__ == "__main__":
    sys.exit(main())
