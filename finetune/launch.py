"""`finetune run --num-processes N`: re-run the same command under `accelerate launch`, and say how.

Multi-process training is accelerate's job; this module only builds the `accelerate launch` command line, prints it
(so users learn the real command and can run it themselves, e.g. once per machine for multi-node), and supervises
it: SIGTERM/SIGINT are passed on to the launcher (which passes them to every rank, so a rank can save a checkpoint
before it exits) and our exit code is the launcher's. Everything that can be wrong with the launch itself is
refused here, before any process, model or data is started.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "accelerate_config.yaml"  # DDP over the machine's GPUs
CPU_CONFIG = ROOT / "accelerate" / "cpu-ddp.yaml"  # two CPU processes over gloo
LAUNCH_OPTIONS = ("--num-processes", "--accelerate-config")  # ours: consumed here, never passed on
# Seconds torchrun gives the ranks between passing on SIGTERM and killing them (its default, 30 s, can be shorter
# than writing a checkpoint of a big adapter with its optimizer state). A value the user set is kept.
SHUTDOWN_TIMEOUT = "300"


def already_distributed(env: Mapping[str, str]) -> bool:
    """True inside a process that a launcher (accelerate, torchrun, SLURM's srun + torchrun) already started."""
    try:
        world = int(env.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        world = 1
    return world > 1 or "LOCAL_RANK" in env


def default_config(cuda_available: bool) -> Path:
    """accelerate_config.yaml (DDP over GPUs) when CUDA is present, else accelerate/cpu-ddp.yaml."""
    return GPU_CONFIG if cuda_available else CPU_CONFIG


def read_config(path: Path) -> dict[str, Any]:
    """The launch config as a dict, refused unless accelerate itself accepts it (keys, types, distributed_type)."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    fix = (
        f"give an accelerate config file such as {CPU_CONFIG.relative_to(ROOT)} (or write one with `accelerate config`)"
    )
    if not path.exists():
        raise UserError(f"--accelerate-config: {path} does not exist; {fix}")
    if not path.is_file():
        raise UserError(f"--accelerate-config: {path} is a folder, not a file; {fix}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--accelerate-config: {path} cannot be read ({e}); {fix}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"--accelerate-config: {where}: not valid YAML ({getattr(e, 'problem', e)}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"--accelerate-config: {path} holds a {type(data).__name__}, not a mapping of keys; {fix}")
    try:
        config = load_config_from_file(str(path))  # accelerate's own reader: unknown keys and bad values fail here
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"--accelerate-config: {path} is not a valid accelerate config: {e}") from None
    return {**data, **{k: getattr(config, k, data.get(k)) for k in ("num_processes", "num_machines", "use_cpu")}}


def check_devices(config: Mapping[str, Any], path: Path, num_processes: int, cuda_count: int) -> None:
    """A config that targets GPUs (use_cpu false) needs a CUDA GPU on this machine for each of its processes."""
    if config.get("use_cpu"):
        return
    machines = max(1, int(config.get("num_machines") or 1))
    per_machine = max(1, num_processes // machines)
    if cuda_count == 0:
        raise UserError(
            f"--accelerate-config: {path} targets GPUs (use_cpu: false) but this machine has no CUDA GPU; "
            f"for CPU processes use --accelerate-config {CPU_CONFIG.relative_to(ROOT)}"
        )
    if per_machine > cuda_count:
        raise UserError(
            f"--num-processes: {per_machine} processes on this machine, but it has {cuda_count} CUDA GPU(s); "
            f"use --num-processes {cuda_count * machines} or fewer (one process per GPU)"
        )


def strip_launch_options(args: Sequence[str]) -> list[str]:
    """The `finetune` arguments without ours (`--num-processes N`, `--accelerate-config=FILE`, ...), else unchanged."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in LAUNCH_OPTIONS:
            skip = True
            continue
        if arg.startswith(tuple(f"{option}=" for option in LAUNCH_OPTIONS)):
            continue
        out.append(arg)
    return out


def accelerate_launcher(python: str = sys.executable) -> list[str]:
    """The `accelerate` script of this Python's environment, or the same program run as a module."""
    script = Path(python).with_name("accelerate")
    return [str(script), "launch"] if script.is_file() else [python, "-m", "accelerate.commands.launch"]


def launch_command(config: Path, num_processes: int | None, finetune_args: Sequence[str]) -> list[str]:
    """`accelerate launch --config_file CONFIG [--num_processes N] -m finetune ARGS...`."""
    command = [*accelerate_launcher(), "--config_file", str(config)]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    return [*command, "-m", "finetune", *finetune_args]


def prepare(
    argv: Sequence[str],
    num_processes: int | None,
    config_path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    cuda_count: int | None = None,
) -> list[str]:
    """Check the launch request and return the command to run; `argv` is the finetune command line after `finetune`."""
    env = os.environ if env is None else env
    if already_distributed(env):
        raise UserError(
            "--num-processes/--accelerate-config: this process was already started by a distributed launcher "
            f"(WORLD_SIZE={env.get('WORLD_SIZE')}, LOCAL_RANK={env.get('LOCAL_RANK')}); drop the option and let "
            "the launcher set the process count"
        )
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num-processes: got {num_processes}; give 1 or more (one process per GPU)")
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    path = config_path if config_path is not None else default_config(cuda_count > 0)
    config = read_config(path)
    total = num_processes if num_processes is not None else int(config.get("num_processes") or -1)
    if total < 1:
        raise UserError(f"--accelerate-config: {path} does not set num_processes; pass --num-processes N")
    check_devices(config, path, total, cuda_count)
    return launch_command(path, num_processes, strip_launch_options(argv))


def run(command: Sequence[str], *, echo=print) -> int:
    """Print the command, run it, pass SIGTERM/SIGINT on to it, and return its exit code.

    A child killed by a signal gives 128 + the signal; so does a child that fails after we passed a signal on
    (accelerate exits 1 once torchrun has stopped the ranks), so the caller sees 143 / 130 as for a single process.
    """
    echo(f"launching: {shlex.join(command)}")
    env = dict(os.environ)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT)
    # Its own session: a Ctrl-C in the terminal reaches the launcher once, through us, not twice.
    child = subprocess.Popen(list(command), env=env, start_new_session=True)
    forwarded: list[int] = []

    def forward(signum, _frame):
        if child.poll() is None:
            forwarded.append(signum)
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:
        return 128 - code
    return 128 + forwarded[0] if code != 0 and forwarded else code
