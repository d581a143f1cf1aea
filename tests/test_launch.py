"""`finetune run --num-processes N`: the accelerate command it builds, the launch configs, and every refusal.

No training here: the commands are built in process, and the CLI refusals happen before anything is launched.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import UserError
from finetune.train import launch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
CPU = ROOT / "accelerate" / "cpu-ddp.yaml"
GPU = ROOT / "accelerate_config.yaml"
MULTI_NODE = ROOT / "accelerate" / "multi-node.yaml"
SHIPPED = [GPU, *sorted((ROOT / "accelerate").glob("*.yaml"))]


def prepare(argv, num_processes=None, config=None, *, env=None, cuda_count=0):
    return launch.prepare(argv, num_processes, config, env=env or {}, cuda_count=cuda_count)


def finetune_part(command: list[str]) -> list[str]:
    """What comes after `-m finetune` in an accelerate command."""
    index = command.index("-m")
    assert command[index + 1] == "finetune"
    return command[index + 2 :]


def test_command_is_accelerate_launch_of_python_m_finetune_with_every_other_argument():
    argv = ["run", "r.yaml", "--num-processes", "2", "--set", "training.max_steps=3", "--accelerate-config",
            str(CPU), "--overwrite", "--set", "lora.r=4", "--no-resume"]  # fmt: skip
    command = prepare(argv, 2, CPU)
    assert Path(command[0]).parent == Path(sys.executable).parent
    assert command[:2] == [str(Path(sys.executable).with_name("accelerate")), "launch"] or command[1:3] == [
        "-m",
        "accelerate.commands.launch",
    ]
    head = command[: command.index("-m", 2)]
    assert head[-4:] == ["--config_file", str(CPU), "--num_processes", "2"]
    assert finetune_part(command) == ["run", "r.yaml", "--set", "training.max_steps=3", "--overwrite", "--set",
                                      "lora.r=4", "--no-resume"]  # fmt: skip


def test_launch_options_written_with_equals_are_stripped_too():
    argv = ["run", "r.yaml", "--num-processes=4", f"--accelerate-config={CPU}", "--force"]
    assert launch.strip_launch_options(argv) == ["run", "r.yaml", "--force"]


def test_default_config_is_gpu_ddp_with_cuda_and_cpu_ddp_without():
    assert launch.default_config(cuda_available=True) == GPU
    assert launch.default_config(cuda_available=False) == CPU
    command = prepare(["run", "r.yaml", "--num-processes", "2"], 2)
    assert command[command.index("--config_file") + 1] == str(CPU)
    command = prepare(["run", "r.yaml", "--num-processes", "2"], 2, cuda_count=2)
    assert command[command.index("--config_file") + 1] == str(GPU)


def test_config_without_num_processes_takes_the_count_from_the_file():
    command = prepare(["run", "r.yaml", "--accelerate-config", str(CPU)], None, CPU)
    assert "--num_processes" not in command  # accelerate reads num_processes: 2 from the file
    assert finetune_part(command) == ["run", "r.yaml"]


def test_config_without_num_processes_key_needs_the_option(tmp_path):
    config = tmp_path / "nproc.yaml"
    config.write_text("distributed_type: MULTI_GPU\nuse_cpu: true\n")
    with pytest.raises(UserError, match="does not set num_processes; pass --num-processes N"):
        prepare(["run", "r.yaml"], None, config)
    assert "--num_processes" in prepare(["run", "r.yaml"], 3, config)


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_launch_configs_are_valid_accelerate_configs(config):
    data = launch.read_config(config)  # accelerate's own reader: unknown keys or a bad distributed_type fail
    assert data["num_processes"] >= 1


@pytest.mark.parametrize("config", [GPU, CPU, MULTI_NODE], ids=lambda p: p.name)
def test_launch_config_headers_give_the_launch_command(config):
    header = [line for line in config.read_text().splitlines() if line.startswith("#")]
    relative = config.relative_to(ROOT)
    assert any(f"accelerate launch --config_file {relative} -m finetune run recipes/" in line for line in header)


def test_cpu_ddp_config_starts_two_gloo_processes():
    data = yaml.safe_load(CPU.read_text())
    # MULTI_GPU + use_cpu is what makes accelerate start num_processes ranks through torchrun (MULTI_CPU starts one)
    assert (data["distributed_type"], data["use_cpu"], data["num_processes"]) == ("MULTI_GPU", True, 2)


def test_multi_node_header_says_what_to_change_on_each_machine():
    text = MULTI_NODE.read_text()
    data = yaml.safe_load(text)
    assert data["num_machines"] == 2 and data["num_processes"] % 2 == 0
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for key in ("machine_rank", "main_process_ip", "main_process_port", "num_processes", "same recipe"):
        assert key in header, key


def test_gpu_config_on_a_machine_without_cuda_points_to_the_cpu_config():
    with pytest.raises(UserError, match=r"no CUDA GPU; for CPU processes use --accelerate-config accelerate/cpu-ddp"):
        prepare(["run", "r.yaml"], 2, GPU, cuda_count=0)


def test_more_processes_than_gpus_is_refused():
    with pytest.raises(UserError, match=r"--num-processes: 4 processes on this machine, but it has 2 CUDA GPU"):
        prepare(["run", "r.yaml"], 4, GPU, cuda_count=2)
    assert prepare(["run", "r.yaml"], 2, GPU, cuda_count=2)  # one per GPU is fine
    # multi-node: num_processes is the total over the machines; each machine needs its share
    assert prepare(["run", "r.yaml"], None, MULTI_NODE, cuda_count=8)
    with pytest.raises(
        UserError, match=r"8 processes on this machine, but it has 4 CUDA GPU\(s\); use --num-processes 8"
    ):
        prepare(["run", "r.yaml"], None, MULTI_NODE, cuda_count=4)


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2"}, {"LOCAL_RANK": "0"}])
def test_launch_inside_a_distributed_launch_is_refused(env):
    with pytest.raises(UserError, match="already started by a distributed launcher"):
        prepare(["run", "r.yaml"], 2, CPU, env=env)
    assert not launch.already_distributed({"WORLD_SIZE": "1"})


def test_fewer_than_one_process_is_refused():
    with pytest.raises(UserError, match=r"--num-processes: got 0; give 1 or more"):
        prepare(["run", "r.yaml"], 0, CPU)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("distributed_type: MULTI_GPU\nnum_processes: 2: 3\n", r"bad.yaml:2: not valid YAML"),
        ("- MULTI_GPU\n", "holds a list, not a mapping"),
        ("distributed_type: MULTI_GPU\nnum_processes: 2\nnum_gpus: 2\n", r"not a valid accelerate config.*num_gpus"),
        ("num_processes: 2\n", "not a valid accelerate config.*distributed_type"),
    ],
)
def test_invalid_launch_config_is_refused(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(UserError, match=message):
        prepare(["run", "r.yaml"], 2, config)


@pytest.fixture
def cli_run(monkeypatch):
    """`finetune run ...` in process, on a machine without CUDA, with sys.argv as the console script sets it."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    launched = []
    monkeypatch.setattr(launch, "run", lambda command, echo: launched.append(command) or 0)

    def invoke(*args: str):
        monkeypatch.setattr(sys, "argv", ["finetune", *args])
        return CliRunner().invoke(app, list(args)), launched

    return invoke


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--num-processes", "2", "--accelerate-config", "missing.yaml"],
            "--accelerate-config: missing.yaml does not exist",
        ),
        (["--num-processes", "0"], "--num-processes: got 0"),
        (
            ["--num-processes", "2", "--accelerate-config", str(GPU)],
            f"--accelerate-config: {GPU} targets GPUs (use_cpu",
        ),
    ],
)
def test_cli_refuses_bad_launches_cleanly(cli_run, args, message):
    result, launched = cli_run("run", str(TINY), *args)
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert launched == []


def test_cli_refuses_num_processes_inside_a_launch(cli_run, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result, launched = cli_run("run", str(TINY), "--num-processes", "2")
    assert result.exit_code == 2 and "already started by a distributed launcher" in result.output
    assert launched == []


def test_cli_checks_the_recipe_once_before_launching(cli_run, tmp_path):
    result, launched = cli_run("run", str(TINY), "--num-processes", "2", "--set", "lora.rank=4")
    assert result.exit_code == 2 and "lora.rank: unknown key; did you mean lora.r?" in result.output
    assert launched == []


def test_cli_launches_with_the_config_alone(cli_run, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--accelerate-config", str(CPU), "--set", f"model.path={tiny_model_dir}", "--set", f"output_dir={out}"]
    result, launched = cli_run("run", str(TINY), *args)
    assert result.exit_code == 0, result.output
    (command,) = launched
    assert "--num_processes" not in command
    assert finetune_part(command) == ["run", str(TINY), *args[2:]]
    assert not out.exists()  # the parent only checks; the ranks train


def test_python_dash_m_finetune_is_the_cli():
    result = subprocess.run([sys.executable, "-m", "finetune", "run", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--num-processes" in result.stdout and "--accelerate-config" in result.stdout


CHILD = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *_: (print("child got SIGTERM", flush=True), sys.exit(7)))
Path(sys.argv[1]).write_text("ready")
deadline = time.monotonic() + 600  # a bound on a hang only: the signal comes as soon as the test sees "ready"
while time.monotonic() < deadline:
    time.sleep(0.01)
sys.exit(1)
"""
LAUNCHER = "import sys; from finetune.train import launch; sys.exit(launch.run([sys.executable, '-c', *sys.argv[1:]]))"


def test_run_passes_sigterm_to_the_child_and_exits_with_its_code(tmp_path):
    ready = tmp_path / "ready"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, CHILD, str(ready)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 600  # bounds a hang only (two interpreters starting on a loaded machine)
    while not ready.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not ready.exists():
        launcher.kill()
        pytest.fail(f"the child never started:\n{launcher.communicate()[0][-3000:]}")
    # as a scheduler would: to the launcher only (the child has its own session); its handler was in place before
    # the child started, so the child's "ready" means the signal is passed on
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=600)
    assert "child got SIGTERM" in out  # passed on: the child handled it, the launcher waited for it
    assert launcher.returncode == 128 + signal.SIGTERM, out  # it failed (7) because of the signal: 143
    assert out.startswith("launching: ")


def test_run_exits_with_the_child_code():
    assert launch.run([sys.executable, "-c", "raise SystemExit(3)"], echo=print) == 3
    assert launch.run([sys.executable, "-c", "pass"], echo=print) == 0


def test_run_reports_a_child_killed_by_a_signal_as_128_plus_the_signal():
    code = launch.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], echo=print)
    assert code == 128 + signal.SIGKILL


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_as_the_child_starts_is_passed_on_and_the_handlers_are_put_back(monkeypatch, sig):
    """The earliest moment: the signal is handled as Popen returns, before a handler installed after Popen could
    exist. It reaches the child once the child exists; the handler that was there before never sees it."""
    main = threading.main_thread().ident
    children: list[subprocess.Popen] = []
    missed: list[int] = []

    def before(signum, _frame):  # the handler `run` replaces: a signal here is one `run` did not pass on
        missed.append(signum)
        for child in children:
            child.kill()  # so the launch ends now, not when the child's sleep ends

    real_popen = subprocess.Popen

    def popen_then_signal(*args, **kwargs):
        children.append(real_popen(*args, **kwargs))
        signal.pthread_kill(main, sig)  # to this (the main) thread: its handler has run when pthread_kill returns
        return children[-1]

    monkeypatch.setattr(launch.subprocess, "Popen", popen_then_signal)
    previous = signal.signal(sig, before)
    try:
        code = launch.run([sys.executable, "-c", "import time; time.sleep(600)"], echo=print)
        assert signal.getsignal(sig) is before  # put back
    finally:
        signal.signal(sig, previous)
    assert missed == [], "the signal reached the handler from before the launch, not the child"
    assert code == 128 + sig
    assert children[0].returncode == -sig  # the child ended by the very signal
