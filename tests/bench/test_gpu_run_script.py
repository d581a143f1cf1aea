"""bench/gpu_run.sh on a CPU: its guards, its deadline, a failed stage that does not stop the job, the carry's
install (a wheel that does not fit is reported, not fatal), and the dry run's install-and-import part in a bare
environment holding only torch, transformers, peft and accelerate (plus pyarrow, pandas and pillow).

The install-and-import test needs a prepared carry folder: bench/carry when `bash bench/gpu_run.sh --prepare` made it
for this Python, else one prepared once into pytest's cache (PyPI, about 30 s; then reused). With the carry at hand
it costs about 25-55 s here (2 busy cores): the bare environment is linked from this one in a second rather than
pip-installed (the full `--dry-run` does that, about a minute more).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_run.sh"
CARRY_PY = ROOT / "bench" / "carry.py"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def gpu_run(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )


def stages(out: Path) -> dict[str, dict]:
    return {row["stage"]: row for row in json.loads((out / "summary.json").read_text())["stages"]}


def test_dry_run_without_a_carry_folder_says_how_to_make_it(tmp_path):
    result = gpu_run("--dry-run", CARRY=str(tmp_path / "absent"), WORK=str(tmp_path / "work"))
    assert result.returncode == 2
    assert "bash bench/gpu_run.sh --prepare" in result.stderr and "Traceback" not in result.stderr


def test_a_carry_folder_over_the_budget_is_refused(tmp_path):
    (tmp_path / "requirements.txt").write_text("bitsandbytes==0.50.2 core\n")
    with open(tmp_path / "huge-0.0-py3-none-any.whl", "wb") as f:
        f.truncate(63 * 2**20)
    result = gpu_run("--dry-run", CARRY=str(tmp_path), WORK=str(tmp_path / "work"))
    assert result.returncode == 2
    assert "over the 62 MiB budget" in result.stderr


def test_a_failed_stage_is_recorded_and_the_next_one_runs(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # no carry: install fails, and tiny_model (which stands on it) runs and fails too; ONLY stops the job there, so
    # no stage depends on how fast this machine is
    env = dict(CARRY=str(tmp_path / "absent"), WORK=str(work), OUT=str(out), DEADLINE="3000", PYTHON=sys.executable)
    result = gpu_run(ONLY="install tiny_model", **env)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    rows = stages(out)
    assert rows["install"]["status"] == "failed"
    assert "no prepared wheels" in rows["install"]["figure"]
    assert rows["tiny_model"]["status"] == "failed"  # it ran after the failure
    assert rows["environment"]["status"] == "skipped" and "not in ONLY" in rows["environment"]["reason"]
    assert "| stage | status | seconds | key figure |" in result.stdout  # the closing table
    assert (out / "gpu_run.log").exists() and "== install" in (out / "gpu_run.log").read_text()


def test_a_stage_that_cannot_fit_before_the_deadline_is_skipped_and_said_so(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # 10 s is what the summary keeps for itself, so nothing fits, however fast the machine
    result = gpu_run(CARRY=str(tmp_path / "absent"), WORK=str(work), OUT=str(out), DEADLINE="10", PYTHON=sys.executable)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]  # skipped is not failed
    rows = stages(out)
    assert {row["status"] for row in rows.values()} == {"skipped"}
    assert {"install", "environment", "gpu_check", "baselines"} <= set(rows)
    assert "needs 20s" in rows["install"]["reason"] and "before the 10s deadline" in rows["install"]["reason"]
    assert "| stage | status | seconds | key figure |" in result.stdout


def make_wheel(folder: Path, name: str, tag: str) -> Path:
    """A minimal wheel holding one module, `name`, with the given python-abi-platform tag."""
    path = folder / f"{name}-1.0-{tag}.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 1\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{info}/RECORD", f"{name}/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def test_a_wheel_that_does_not_fit_this_python_is_reported_and_the_rest_install(tmp_path):
    carry = tmp_path / "carry"
    (carry / "wheels").mkdir(parents=True)
    make_wheel(carry / "wheels", "fits_here", "py3-none-any")
    make_wheel(carry / "wheels", "old_python", "cp27-cp27mu-manylinux1_x86_64")
    (carry / "requirements.txt").write_text("old_python==1.0 core\nfits_here==1.0 support\n")
    target, report = tmp_path / "site", tmp_path / "install.json"
    cmd = [
        sys.executable,
        str(CARRY_PY),
        "install",
        "--carry",
        str(carry),
        "--target",
        str(target),
        "--json",
        str(report),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    data = json.loads(report.read_text())
    assert data["installed"] == ["fits_here"]
    assert "old_python" in data["failed"] and "cp27" in data["failed"]["old_python"]
    assert (target / "fits_here" / "__init__.py").exists()


@pytest.fixture(scope="module")
def carry_folder(pytestconfig, tmp_path_factory) -> Path:
    """bench/carry when it was prepared for this Python, else a carry prepared once into pytest's cache (into this
    run's temporary folder under `-p no:cacheprovider`)."""
    prepared = ROOT / "bench" / "carry"
    manifest = prepared / "manifest.json"
    if manifest.exists() and PYTHON in json.loads(manifest.read_text()).get("pythons", []):
        return prepared
    cache = getattr(pytestconfig, "cache", None)
    home = cache.mkdir(f"gpu-carry-{PYTHON}") if cache is not None else tmp_path_factory.mktemp(f"gpu-carry-{PYTHON}")
    cached = home / "carry"
    if not (cached / "manifest.json").exists():
        cmd = [sys.executable, str(CARRY_PY), "prepare", "--carry", str(cached), "--pythons", PYTHON]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cached


def test_dry_run_installs_the_carry_into_a_bare_environment_and_everything_imports(tmp_path, carry_folder):
    work, out = tmp_path / "work", tmp_path / "out"
    result = gpu_run(
        "--dry-run", "--install-only", CARRY=str(carry_folder), WORK=str(work), OUT=str(out), BARE_FROM=sys.executable
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    rows = stages(out)
    assert [rows[s]["status"] for s in ("bare_env", "install", "tiny_model", "environment")] == ["ok"] * 4

    bare = work / "venv" / "bin" / "python"
    probe = subprocess.run(
        [str(bare), "-c", "import trl"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
    )
    assert probe.returncode != 0, "the bare environment must not hold trl: it comes from the carry"

    installed = json.loads((work / "install.json").read_text())
    assert installed["ok"] and installed["installed"][0] == "bitsandbytes"  # bitsandbytes first
    env = json.loads((out / "env.json").read_text())
    site = str((work / "site").resolve())
    for module in ("bitsandbytes", "trl", "datasets", "mistral_common"):
        assert env["libraries"][module]["from"].startswith(site), env["libraries"][module]
    assert env["project_imports"]["ok"], env["project_imports"]["failed"]
    assert (work / "cache" / "tiny-random-mixtral" / "model.safetensors").exists()
