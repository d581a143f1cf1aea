"""What travels to an offline GPU machine: pinned wheels, the tiny model's tokenizer, and how they install there.

    python bench/carry.py prepare [--carry bench/carry] [--pythons 3.10,3.11,3.12]   # here, where PyPI is reachable
    python3 bench/carry.py install --carry bench/carry --target DIR [--json FILE]     # there; standard library only
    python3 bench/carry.py tiny --carry bench/carry --cache DIR                       # there: the built-in tiny model

`prepare` downloads, with `pip download --no-deps --only-binary=:all:`, the versions installed in this environment of
what an image holding torch, transformers, peft and accelerate lacks, for each Python asked for (a package with no
wheel for one of them is reported, not fatal), writes the tiny model with `finetune tiny-model`, and keeps the whole
folder under BUDGET_MIB (the device tool carries 64 MiB, the working tree included). Two things are trimmed to fit and
said so in manifest.json: bitsandbytes' wheel keeps only its CPU and CUDA >= 12.6 libraries (ROCm, XPU and CUDA
11.8-12.4 builds are 18 of its 41 MiB), and the tiny model's random weights (17 MiB) stay behind when they do not
fit: `tiny` regenerates them there from the same seed in about a second.

`install` puts the wheels into a target folder for PYTHONPATH, bitsandbytes first and on its own, then the rest
(one at a time if that fails, so one that does not fit the image's Python is reported, not fatal). A support package
the image already has, at any version, is left to the image; a core package is installed unless the image has the
same version. It never asks an index.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_CARRY = HERE / "carry"
BUDGET_MIB = 62  # the device tool's 64 MiB minus room for the working tree (about 1.3 MiB)
PYTHONS = ("3.11", "3.12")  # the GPU image's 3.12 (KINDS.md), this dry run's 3.11; trl 1.16 and mistral-common
# 1.13 have no Python 3.10 wheel (they need 3.11+), so 3.10 wheels would be 6 MiB that cannot run: ask with --pythons

# What finetune needs beyond torch, transformers, peft and accelerate, in install order, and why.
CORE = ("bitsandbytes", "trl", "datasets", "mistral-common")  # ours at our pins, whatever the image has
SUPPORT = (
    "dill", "multiprocess", "xxhash",  # datasets
    "sentencepiece", "protobuf",  # the Mixtral v1 SentencePiece tokenizer and its conversion
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",  # finetune's recipe schema, mistral-common
    "pydantic-extra-types", "pycountry",  # mistral-common imports pydantic_extra_types.language_code
    "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "attrs",  # mistral-common
    "tiktoken", "requests", "urllib3", "certifi", "charset-normalizer", "idna",  # mistral-common
)  # fmt: skip
# Needed too, but too large to carry (MiB per Python: pyarrow 52.5, pandas 11.8, pillow 6.8): the image must hold them
# (the GPU image 'cuda' does, KINDS.md); the dry run installs them into its bare environment as the image would have.
ASSUMED_IN_IMAGE = ("pyarrow", "pandas", "pillow")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (28, 27, 24, 17, 12, 5)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]  # fmt: skip  (glibc 2.28+: this machine's Debian 12 and the GPU image alike)
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda12[6-9]|cuda1[3-9]\d)\.so$")
TINY = "tiny-random-mixtral"
WEIGHTS = "model.safetensors"


def mib(n: int) -> float:
    return round(n / 2**20, 2)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    return normalise(path.name.split("-")[0])


# --------------------------------------------------------------------------------------------- prepare (here)


def pip_download(specs: list[str], python: str, dest: Path) -> subprocess.CompletedProcess:
    short = python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           "--python-version", python, "--implementation", "cp",
           "--abi", f"cp{short}", "--abi", "abi3", "--abi", "none"]  # fmt: skip
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return subprocess.run(cmd + specs, capture_output=True, text=True)


def slim_bitsandbytes(wheel: Path) -> dict:
    """Drop the native libraries no CUDA >= 12.6 machine loads (bitsandbytes picks one by torch.version.cuda)."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    dropped = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        keep = {}
        for info in src.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and not BNB_KEEP.search(base):
                dropped.append(base)
                continue
            keep[info.filename] = info
        for name, info in keep.items():
            data = src.read(info)
            if name.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = (
                    "\n".join(x for x in lines if x.split(",")[0].rsplit("/", 1)[-1] not in dropped) + "\n"
                ).encode()
            dst.writestr(info, data)
    os.replace(tmp, wheel)
    return {"original_mib": mib(before), "slim_mib": mib(wheel.stat().st_size), "dropped": sorted(dropped)}


def installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = {}
    for name in names:
        try:
            pins[name] = version(name)
        except PackageNotFoundError:
            raise SystemExit(f"carry: {name} is not installed here; install the suite's environment first") from None
    return pins


def write_tiny(carry: Path) -> Path:
    """`finetune tiny-model` into the carry folder (the real tokenizer, converted here, where that is easy)."""
    target = carry / TINY
    shutil.rmtree(target, ignore_errors=True)
    cmd = [sys.executable, "-m", "finetune", "tiny-model", "--output", str(target)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"carry: finetune tiny-model failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return target


def prepare(carry: Path, pythons: list[str]) -> dict:
    started = time.perf_counter()
    pins = installed_versions(CORE + SUPPORT)
    specs = [f"{name}=={pins[name]}" for name in CORE + SUPPORT]
    staging = Path(tempfile.mkdtemp(prefix="carry-wheels-"))
    missing: dict[str, list[str]] = {}
    for python in pythons:
        if pip_download(specs, python, staging).returncode == 0:
            continue
        for spec in specs:  # one failed: find which, and keep the rest
            proc = pip_download([spec], python, staging)
            if proc.returncode:
                missing.setdefault(python, []).append(spec)
                print(f"carry: no {spec} wheel for Python {python}: {proc.stderr.strip().splitlines()[-1][:200]}")
    bnb = next(staging.glob("bitsandbytes-*.whl"), None)
    if bnb is None:
        raise SystemExit("carry: no bitsandbytes wheel was downloaded; is PyPI reachable?")
    slim = slim_bitsandbytes(bnb)
    wheels = carry / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    carry.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(wheels))
    order = [f"{name}=={pins[name]} {'core' if name in CORE else 'support'}" for name in CORE + SUPPORT]
    (carry / "requirements.txt").write_text("\n".join(order) + "\n")

    tiny = write_tiny(carry)
    weights = tiny / WEIGHTS
    weights_bytes = weights.stat().st_size
    weights_sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    if folder_bytes(carry) > BUDGET_MIB * 2**20:
        weights.unlink()  # `tiny` makes them again from tiny_spec.txt's seed
    manifest = {
        "made_by": "python bench/carry.py prepare",
        "made_with_python": sys.version.split()[0],
        "pythons": pythons,
        "pins": pins,
        "core": list(CORE),
        "assumed_in_image": list(ASSUMED_IN_IMAGE),
        "missing_wheels": missing,
        "bitsandbytes_slimmed": slim,
        "tiny_weights_sha256": weights_sha,
        "tiny_model_weights": "carried" if weights.exists() else f"left behind ({mib(weights_bytes)} MiB): regenerated",
        "seconds": round(time.perf_counter() - started, 1),
    }
    manifest["sizes_mib"] = sizes(carry)
    (carry / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = folder_bytes(carry)
    if total > BUDGET_MIB * 2**20:
        raise SystemExit(f"carry: {carry} is {mib(total)} MiB, over the {BUDGET_MIB} MiB budget")
    return manifest


def sizes(carry: Path) -> dict:
    """MiB per component: each wheel (per Python where it is per Python), the tiny model folder, the total."""
    out: dict[str, float] = {}
    for wheel in sorted((carry / "wheels").glob("*.whl")):
        parts = wheel.name.split("-")
        tag = "abi3" if parts[3] == "abi3" else parts[2] if parts[2].startswith(("cp3", "py31")) else "any"
        out[f"{wheel_name(wheel)} ({tag})"] = mib(wheel.stat().st_size)
    if (carry / TINY).exists():
        out[f"{TINY}/"] = mib(folder_bytes(carry / TINY))
    out["total"] = mib(folder_bytes(carry))
    return out


# --------------------------------------------------------------------------------------------- install (there)


IMAGE_VERSIONS = """
import importlib.metadata as m, json, sys
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps(found))
"""


def image_versions(names: list[str], target: Path) -> dict[str, str]:
    """The versions the image itself has (the target folder left off the path), for those it has."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != target]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-c", IMAGE_VERSIONS, *names], capture_output=True, text=True, env=env)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def pip_install(specs: list[str], wheels: Path, target: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "--no-deps",
           "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(target)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}  # no index, no config: the carry alone
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1")
    return subprocess.run(cmd + specs, capture_output=True, text=True, env=env)


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [x for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
    return lines[-1][:300] if lines else f"exit {proc.returncode}"


def install(carry: Path, target: Path) -> dict:
    started = time.perf_counter()
    wheels = carry / "wheels"
    requirements = carry / "requirements.txt"
    if not requirements.exists() or not any(wheels.glob("*.whl")):
        return {"ok": False, "reason": f"{carry} holds no prepared wheels; run `bash bench/gpu_run.sh --prepare` first"}
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
        return {"ok": False, "reason": f"{sys.executable} has no pip: the wheels cannot be installed"}
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    packages = []
    for line in requirements.read_text().split("\n"):
        if line.strip():
            spec, kind = line.split()
            name, version = spec.split("==")
            packages.append({"name": name, "version": version, "kind": kind})
    todo = []
    present = image_versions([p["name"] for p in packages], target)
    for p in packages:
        p["image_version"] = present.get(p["name"])
        if p["image_version"] and (p["kind"] == "support" or p["image_version"] == p["version"]):
            p["action"] = "image has it"
        else:
            todo.append(p)

    def one(p: dict) -> None:
        proc = pip_install([f"{p['name']}=={p['version']}"], wheels, target)
        p["action"] = "installed" if proc.returncode == 0 else "failed"
        if proc.returncode:
            tags = sorted({w.name.split("-")[2] for w in wheels.glob("*.whl") if wheel_name(w) == normalise(p["name"])})
            p["reason"] = f"{last_line(proc)} (carried for: {', '.join(tags) or 'none'})"

    first = [p for p in todo if p["name"] == "bitsandbytes"]
    rest = [p for p in todo if p["name"] != "bitsandbytes"]
    for p in first:
        one(p)
    if rest:
        proc = pip_install([f"{p['name']}=={p['version']}" for p in rest], wheels, target)
        if proc.returncode == 0:
            for p in rest:
                p["action"] = "installed"
        else:  # one at a time, so the one that does not fit is found and the others still install
            for p in rest:
                one(p)
    failed = [p["name"] for p in packages if p["action"] == "failed"]
    return {
        "ok": not failed,
        "python": sys.version.split()[0],
        "target": str(target),
        "installed": [p["name"] for p in packages if p["action"] == "installed"],
        "from_image": {p["name"]: p["image_version"] for p in packages if p["action"] == "image has it"},
        "failed": {p["name"]: p.get("reason", "") for p in packages if p["action"] == "failed"},
        "seconds": round(time.perf_counter() - started, 1),
        **({"reason": f"did not install: {', '.join(failed)}"} if failed else {}),
    }


def tiny(carry: Path, cache: Path) -> Path:
    """The built-in tiny model in a FINETUNE_CACHE folder: the carried files, and the weights made again from the
    same seed and spec as `finetune.model.tiny.write_tiny_model` where they were left behind."""
    import ast

    source, target = carry / TINY, cache / TINY
    if not (source / "config.json").exists():
        raise SystemExit(f"carry: {source} has no tiny model; run `bash bench/gpu_run.sh --prepare` first")
    import torch

    sys.path.insert(0, str(ROOT))
    if (target / WEIGHTS).exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    if not (target / WEIGHTS).exists():
        from transformers import MixtralForCausalLM

        from finetune.model.tiny import TinySpec, mixtral_config

        spec = TinySpec(**ast.literal_eval((target / "tiny_spec.txt").read_text()))
        torch.manual_seed(spec.seed)
        model = MixtralForCausalLM(mixtral_config(spec)).to(torch.float32)
        model.save_pretrained(str(target), safe_serialization=True)
        digest = hashlib.sha256((target / WEIGHTS).read_bytes()).hexdigest()
        prepared = json.loads((carry / "manifest.json").read_text()).get("tiny_weights_sha256")
        same = "identical to" if digest == prepared else "not identical to (another torch version?)"
        print(f"tiny: weights made again from seed {spec.seed}, {same} the prepared ones")
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["prepare", "install", "tiny", "sizes"])
    p.add_argument("--carry", type=Path, default=DEFAULT_CARRY)
    p.add_argument("--pythons", default=",".join(PYTHONS))
    p.add_argument("--target", type=Path, help="install: the folder to put on PYTHONPATH")
    p.add_argument("--cache", type=Path, help="tiny: the FINETUNE_CACHE folder")
    p.add_argument("--json", type=Path, help="install: also write the report here")
    args = p.parse_args(argv)
    if args.command == "prepare":
        manifest = prepare(args.carry, [x.strip() for x in args.pythons.split(",") if x.strip()])
        for part, size in manifest["sizes_mib"].items():
            print(f"  {size:7.2f} MiB  {part}")
        print(
            f"carry: {args.carry} ready in {manifest['seconds']}s; missing wheels: {manifest['missing_wheels'] or 'none'}"
        )
        return 0
    if args.command == "sizes":
        print(json.dumps(sizes(args.carry), indent=2))
        return 0
    if args.command == "tiny":
        print(tiny(args.carry, args.cache))
        return 0
    if args.target is None:
        p.error("install needs --target")
    report = install(args.carry, args.target)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"install: {'ok' if report['ok'] else 'FAILED'} in {report.get('seconds', 0)}s; installed "
          f"{', '.join(report.get('installed', [])) or 'nothing'}; image has {len(report.get('from_image', {}))}"
          + (f"; {report['reason']}" if not report["ok"] else ""))  # fmt: skip
    for name, reason in report.get("failed", {}).items():
        print(f"  {name}: {reason}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
