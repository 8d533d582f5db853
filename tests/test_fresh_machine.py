"""The README's test command on a fresh machine, and on an administrator's server.

``bash tests/run.sh`` must install everything the suite imports (nothing installed by hand), and
must never stop, restart or reconfigure a service it did not start: on a PACS administrator's
server a real Orthanc or PostgreSQL may run next to our tests.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.peers import OrthancServer, PostgresServer

FIRST_PARTY = {"node", "pipelines", "db", "onnx_models", "tests"}
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# Imports each module named on the command line in one interpreter; prints "name: error" for each that fails.
_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        print(f"{name}: {type(exc).__name__}: {exc}")
"""


def _clean_copy(dest: Path) -> Path:
    """The repository as a fresh clone has it: tracked and new files, nothing ignored (no caches)."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # The prebuilt OHIF viewer is an npm download the copy would fetch again: share it.
    cache = REPO / "tests" / ".cache"
    if cache.is_dir():
        (dest / "tests" / ".cache").symlink_to(cache, target_is_directory=True)
    return dest


def _third_party_imports(root: Path) -> set[str]:
    """Top-level modules imported anywhere in the tests (module level or inside functions)."""
    names: set[str] = set()
    for path in (root / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in FIRST_PARTY}


def _run_sh(root: Path, python_bin: Path | None, *pytest_args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if python_bin is not None:
        # run.sh calls `python3`: in this PATH that is the fresh venv's.
        env["PATH"] = f"{python_bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(python_bin.parent)
    return subprocess.run(
        ["bash", "tests/run.sh", *pytest_args], cwd=root, env=env, capture_output=True, text=True, timeout=1500
    )


@pytest.mark.slow
def test_readme_test_command_installs_everything_the_suite_imports_in_a_fresh_venv(tmp_path):
    root = _clean_copy(tmp_path / "clone")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)  # no system site-packages: only what run.sh installs
    python = env_dir / "bin" / "python3"

    # The README's command itself; pytest only collects, which imports every test module.
    out = _run_sh(root, env_dir / "bin", "--collect-only")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"\d+ tests collected", out.stdout), out.stdout[-2000:]

    # Imports inside test functions (torch in the training tests) are not seen by collection.
    probe = subprocess.run(
        [str(python), "-c", _PROBE, *sorted(_third_party_imports(root))], capture_output=True, text=True, cwd=tmp_path
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert not probe.stdout.strip(), "the test command does not install: " + "; ".join(probe.stdout.splitlines())
    assert "torch" in _third_party_imports(root)

    # And the tests that failed on a fresh machine pass there: one training script (PyTorch, its
    # ONNX export and the model check) stands for the three, whose imports the probe above covers.
    out = subprocess.run(
        [
            str(python),
            "-m",
            "pytest",
            "tests/test_models_training.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "train_breast_density",
        ],  # fmt: skip
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert "1 passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-1000:]


def test_readme_test_command_leaves_the_hosts_own_orthanc_and_postgresql_running(tmp_path):
    """An administrator's Orthanc and PostgreSQL (here: ones this test starts) survive the test command."""
    policy_before = POLICY_RC_D.read_bytes() if POLICY_RC_D.exists() else None
    with OrthancServer(tmp_path / "hosts-orthanc") as orthanc, PostgresServer() as postgres:
        out = _run_sh(REPO, None, "--collect-only", "-q", "tests/test_router.py")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert orthanc.proc is not None and orthanc.proc.poll() is None, "the host's Orthanc was stopped"
        assert orthanc.rest("/system")["DicomAet"] == orthanc.aet
        assert postgres.proc is not None and postgres.proc.poll() is None, "the host's PostgreSQL was stopped"
        assert postgres.create_database("still_here").endswith("/still_here")
    # The temporary "start no service" policy is gone, and a host's own policy is untouched.
    assert (POLICY_RC_D.read_bytes() if POLICY_RC_D.exists() else None) == policy_before


def test_the_suite_never_stops_or_kills_services_by_name():
    """Stopping a service or process by its name hits the host's own as well as ours."""
    by_name = re.compile(
        # Spelled in pieces so that this line is not itself a match for checks of the same kind.
        r"\b(serv" + r"ice|systemc" + r"tl)\b.*\b(st" + r"op|rest" + r"art|reload)\b"
        r"|start-stop-daemon|\bp" + r"kill\b|kill" + r"all\b"
    )
    offenders = []
    for path in [REPO / ".ci" / "run", *(REPO / "tests").rglob("*.sh"), *(REPO / "tests").rglob("*.py")]:
        if path.name == Path(__file__).name:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if by_name.search(code):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, offenders
