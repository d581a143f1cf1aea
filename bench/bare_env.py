"""The GPU image, imitated here: a virtual environment holding only what the image is assumed to have.

    python bench/bare_env.py bare --dest DIR     # make it, linked from this environment's site-packages
    python bench/bare_env.py image-pins          # `name==version` of what it holds, for a pip install elsewhere

`bash bench/gpu_run.sh --dry-run` installs the carry folder into it exactly as the GPU job does, so a dry run sees
what a bare machine lacks instead of what this one happens to hold.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from carry import ASSUMED_IN_IMAGE, normalise

IMAGE_BASE = ("torch", "transformers", "peft", "accelerate", "pip")  # what the GPU image is assumed to have


def closure(roots: tuple[str, ...]) -> list:
    """These distributions of the running environment and everything they require (extras left out)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement

    seen: dict[str, object] = {}
    todo = list(roots)
    while todo:
        name = normalise(todo.pop())
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def bare(dest: Path) -> dict:
    """A virtual environment holding only IMAGE_BASE + ASSUMED_IN_IMAGE and what they require, as links into the
    running environment's site-packages: the image the job expects, built in a second instead of a pip install."""
    import venv

    shutil.rmtree(dest, ignore_errors=True)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(dest)
    site = Path(subprocess.check_output([str(dest / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())  # fmt: skip
    names = []
    for dist in closure(IMAGE_BASE + ASSUMED_IN_IMAGE):
        names.append(f"{dist.metadata['Name']} {dist.version}")
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops:
            source = Path(dist.locate_file(top))
            if top.endswith(".pth") or top in ("..", "bin") or not source.exists() or (site / top).exists():
                continue
            (site / top).symlink_to(source)
    return {"python": str(dest / "bin" / "python"), "distributions": sorted(names)}


def image_pins() -> list[str]:
    """`name==version` of what the bare environment holds, at this environment's versions (torch's local label off:
    `torch==2.13.0` finds the local CPU wheel here and the CUDA build on a GPU machine)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in IMAGE_BASE + ASSUMED_IN_IMAGE if name != "pip"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["bare", "image-pins"])
    p.add_argument("--dest", type=Path, help="bare: the virtual environment to make")
    args = p.parse_args(argv)
    if args.command == "image-pins":
        print(" ".join(image_pins()))
        return 0
    if args.dest is None:
        p.error("bare needs --dest")
    made = bare(args.dest)
    print(f"bare environment {args.dest}: {len(made['distributions'])} distributions linked from {sys.prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
