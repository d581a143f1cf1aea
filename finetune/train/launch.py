"""`finetune run --num-processes N`: re-run the same command under `accelerate launch`, and say how.

Multi-process training is accelerate's job; this module only builds the `accelerate launch` command line, prints it
(so users learn the real command and can run it themselves, e.g. once per machine for multi-node), and supervises
it: SIGTERM/SIGINT are passed on to the launcher (which passes them to every rank, so a rank can save a checkpoint
before it exits) and our exit code is the launcher's. Everything that can be wrong with the launch itself is
refused here, before any process, model or data is started.

A user error inside a rank (a bad data record: FILE:LINE) is written to a folder the launch names in
FINETUNE_LAUNCH_ERRORS instead of printed, and the rank marks the moment in its stderr. What the launcher's stderr
(which we relay) holds after that mark is the aftermath: the other ranks' tracebacks as their peer vanished,
torchrun's failure report. We drop it, print the first rank's error once, and exit 2 as a single process would.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
GPU_CONFIG = ROOT / "accelerate_config.yaml"  # DDP over the machine's GPUs
CPU_CONFIG = ROOT / "accelerate" / "cpu-ddp.yaml"  # two CPU processes over gloo
LAUNCH_OPTIONS = ("--num-processes", "--accelerate-config")  # ours: consumed here, never passed on
ERRORS_ENV = "FINETUNE_LAUNCH_ERRORS"  # the folder where a rank leaves its user error for `run` to print
ERROR_MARK = b"\x1efinetune: a rank reported a user error\x1e\n"  # in the rank's stderr, right after the report
# Seconds torchrun gives the ranks between passing on SIGTERM and killing them (its default, 30 s, can be shorter
# than writing a checkpoint of a big adapter with its optimizer state). A value the user set is kept.
SHUTDOWN_TIMEOUT = "300"
SIGNALS = (signal.SIGTERM, signal.SIGINT)  # passed on to the launcher


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


def report_to_launcher(error: Exception, env: Mapping[str, str] | None = None) -> bool:
    """Inside a rank of `--num-processes`: leave the user error for the launching process to print once, and say
    so (True); elsewhere (a single process, or `accelerate launch` run by hand) False, and the caller prints it."""
    env = os.environ if env is None else env
    folder = Path(env.get(ERRORS_ENV) or "")
    if not env.get(ERRORS_ENV) or not folder.is_dir():
        return False
    rank = env.get("RANK", env.get("LOCAL_RANK", "0"))
    tmp = folder / f".rank-{rank}.tmp"
    tmp.write_text(str(error), encoding="utf-8")
    os.replace(tmp, folder / f"rank-{rank}.txt")  # whole or not at all
    try:
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), ERROR_MARK)  # after everything this rank wrote before the error
    except (AttributeError, OSError, ValueError):  # no real stderr: the report alone still gives exit 2
        pass
    return True


def rank_errors(folder: Path) -> list[str]:
    """The user errors ranks left in `folder`, lowest rank first."""
    files = sorted(folder.glob("rank-*.txt"), key=lambda f: int(f.stem.partition("-")[2] or 0))
    return [f.read_text(encoding="utf-8") for f in files]


def _relay(source: int) -> None:
    """Copy the launcher's stderr to ours as it comes, up to the first rank's ERROR_MARK (see module doc)."""
    sink = getattr(sys.stderr, "buffer", None)
    held, cut = b"", False
    with os.fdopen(source, "rb", buffering=0) as stream:
        while chunk := stream.read(65536):
            if cut:
                continue  # read on, so the launcher never blocks on a full pipe
            data, held = held + chunk, b""
            if (at := data.find(ERROR_MARK)) >= 0:
                data, cut = data[:at], True
            elif (start := data.rfind(ERROR_MARK[:1])) >= 0 and ERROR_MARK.startswith(data[start:]):
                data, held = data[:start], data[start:]  # the mark may be split across two reads
            if sink is not None:
                sink.write(data)
                sink.flush()
            else:
                sys.stderr.write(data.decode(errors="replace"))
                sys.stderr.flush()


def run(command: Sequence[str], *, echo=print) -> int:
    """Print the command, run it, pass SIGTERM/SIGINT on to it, and return its exit code.

    The handler is in place before the child starts, so no signal falls between the two: one that arrives while
    the child is being started is passed on as soon as it exists. The previous handlers are back when we return.
    A child killed by a signal gives 128 + the signal; so does a child that fails after we passed a signal on
    (accelerate exits 1 once torchrun has stopped the ranks), so the caller sees 143 / 130 as for a single process.
    A rank's user error is printed once, here, and gives 2.
    """
    echo(f"launching: {shlex.join(command)}")
    env = dict(os.environ)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT)
    child: subprocess.Popen | None = None
    queued: list[int] = []  # signals that arrived before the child existed
    forwarded: list[int] = []  # signals passed on to the running child, in order

    def forward(signum, _frame):
        if child is None:
            queued.append(signum)
        elif child.poll() is None:
            forwarded.append(signum)
            child.send_signal(signum)

    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS} if main else {}
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-launch-") as folder:
            errors = Path(folder)
            env[ERRORS_ENV] = folder
            read_end, write_end = os.pipe()
            # Its own session: a Ctrl-C in the terminal reaches the launcher once, through us, not twice.
            try:
                started = subprocess.Popen(list(command), env=env, stderr=write_end, start_new_session=True)
            finally:
                os.close(write_end)
            child = started
            while queued:  # arrived while the child was starting: passed on now (from here on the handler does it)
                forward(queued.pop(0), None)
            relay = threading.Thread(target=_relay, args=(read_end,), daemon=True)
            relay.start()
            code = started.wait()
            relay.join(timeout=30)  # a rank's leftover child may hold the pipe open: never wait on it for long
            reported = rank_errors(errors)
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(sig, handler)
    if code < 0:
        return 128 - code
    if code != 0 and forwarded:
        return 128 + forwarded[0]
    if code != 0 and reported:
        print(f"error: {reported[0]}", file=sys.stderr, flush=True)
        return 2
    return code
