"""Starting the node and pointing the CLI at it, as a PACS administrator does (issue 11, items 5-10).

Every test runs the real ``ainode`` command in a subprocess: what is checked is what the
administrator sees on the terminal and in the log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import REPO
from tests.support.cli import status
from tests.support.nodeproc import NodeProcess
from tests.support.peers import free_port, storescu
from tests.support.waiting import wait_for

MODELS = "breast-density, chest-xray, lung-seg"


def run_cli(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout_s: float = 90
) -> subprocess.CompletedProcess[str]:
    """``ainode ARGS`` in ``cwd``, without any AINODE_* variable of the calling shell."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AINODE_")}
    return subprocess.run(
        [sys.executable, "-m", "node.operate.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=timeout_s,
    )


def node_section(tmp_path: Path, **extra: object) -> dict:
    return {
        "host": "127.0.0.1",
        "port": free_port(),
        "spool_dir": str(tmp_path / "spool"),
        "database_url": f"sqlite:///{tmp_path}/node.db",
        "workers": 1,
        **extra,
    }


def write(tmp_path: Path, data: dict, name: str = "ainode.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- item 5: a route to a model that does not exist ----------------------------------------------
def misspelt_route_config(tmp_path: Path) -> Path:
    routes = [{"name": "ct-lungs", "match": {"Modality": "CT"}, "pipeline": "lung-sge"}]
    return write(tmp_path, {"node": node_section(tmp_path), "routes": routes})


def test_config_check_refuses_a_route_to_a_model_that_does_not_exist(tmp_path):
    result = run_cli("config", "check", str(misspelt_route_config(tmp_path)))
    assert result.returncode == 2, result.stdout
    line = one_line(result)
    assert "routes.0 (ct-lungs): pipeline 'lung-sge' is not a model" in line
    assert MODELS in line and "did you mean 'lung-seg'" in line
    assert "config OK" not in result.stdout


def test_serve_refuses_a_route_to_a_model_that_does_not_exist_before_starting(tmp_path):
    result = run_cli("serve", "--config", str(misspelt_route_config(tmp_path)), timeout_s=60)
    assert result.returncode == 2
    line = one_line(result)
    assert "ct-lungs" in line and "'lung-sge'" in line and MODELS in line
    assert not (tmp_path / "spool").exists() and not (tmp_path / "node.db").exists()


def test_each_route_to_a_missing_model_is_its_own_line(tmp_path):
    routes = [
        {"name": "ct", "match": {"Modality": "CT"}, "pipeline": "lung-sge"},
        {"name": "cr", "match": {"Modality": "CR"}, "pipeline": "chest-xray"},
        {"name": "mg", "match": {"Modality": "MG"}, "pipeline": "density"},
    ]
    result = run_cli("config", "check", str(write(tmp_path, {"routes": routes})))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [("(ct)" in line, "(mg)" in line) for line in lines] == [(True, False), (False, True)], result.stderr


# -- item 6: an environment override's error names the variable -------------------------------------
def test_a_bad_environment_override_names_the_variable_not_the_file(tmp_path):
    good = write(tmp_path, {"node": node_section(tmp_path)}, name="good.yaml")
    env = {"AINODE_NODE__PROT": "11113"}
    result = run_cli("config", "check", str(good), env=env)
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("config error in environment variable AINODE_NODE__PROT: node.prot: unknown key"), line
    assert "good.yaml" not in line
    # Without a config file: the embedded defaults are not to blame either.
    result = run_cli("serve", cwd=tmp_path, env={**env, "AINODE_NODE__PORT": str(free_port())}, timeout_s=60)
    assert result.returncode == 2
    line = one_line(result)
    assert "environment variable AINODE_NODE__PROT" in line and "default_config.yaml" not in line
    # A value error inside a section the variable created is the variable's too.
    result = run_cli("config", "check", str(good), env={"AINODE_PEERS__PACS__PORT": "104"})
    assert result.returncode == 2
    assert all("environment variable AINODE_PEERS__PACS__PORT" in ln for ln in result.stderr.strip().splitlines())


# -- item 7: a second node on the same port ------------------------------------------------------
def test_serve_on_a_port_in_use_says_so_in_one_line_and_starts_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write(tmp_path, {"node": node_section(tmp_path, port=port)})
        result = run_cli("serve", "--config", str(config), timeout_s=60)
    assert result.returncode == 2, result.stderr
    assert one_line(result) == f"cannot listen on 127.0.0.1:{port}: address already in use"
    assert result.stdout == ""
    # Bound first: no spool (and so no clean-up of another node's files), no database, no workers.
    assert not (tmp_path / "spool").exists()
    assert not (tmp_path / "node.db").exists()


def test_serve_with_its_http_api_port_in_use_says_so_in_one_line_and_starts_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        api = {"host": "127.0.0.1", "port": port}
        for role in ("all", "worker"):  # a worker serves health and metrics too
            config = write(tmp_path, {"node": node_section(tmp_path, role=role), "api": api})
            result = run_cli("serve", "--config", str(config), timeout_s=60)
            assert result.returncode == 2, result.stderr
            assert one_line(result) == f"HTTP API: cannot listen on 127.0.0.1:{port}: address already in use"
            assert not (tmp_path / "spool").exists()
            assert not (tmp_path / "node.db").exists()


# -- item 8: read-only commands find the node's config and never create a database ------------------
@pytest.mark.skipif(Path("/etc/ainode/ainode.yaml").exists(), reason="this machine has a system-wide config")
def test_status_in_an_empty_folder_creates_nothing_and_says_where_it_looked(tmp_path):
    result = run_cli("status", cwd=tmp_path)
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"no database at {tmp_path}/var/ainode.db (database_url from embedded defaults"), line
    assert "pass --config" in line
    assert list(tmp_path.iterdir()) == []


def test_status_with_a_config_whose_database_does_not_exist_creates_nothing(tmp_path):
    config = write(tmp_path, {"node": node_section(tmp_path)})
    result = run_cli("status", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"no database at {tmp_path}/node.db (database_url from {config}"), line
    assert not (tmp_path / "node.db").exists()


def test_status_names_the_config_and_database_it_reads(tmp_path):
    config = write(tmp_path, {"node": node_section(tmp_path)})
    assert run_cli("db", "upgrade", "--config", str(config)).returncode == 0
    result = run_cli("status", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"config {config} (--config)" in result.stderr
    assert f"database sqlite:///{tmp_path}/node.db" in result.stderr
    # Found the way serve finds it: ./ainode.yaml in the current folder, then AINODE_CONFIG.
    here = run_cli("status", cwd=tmp_path)
    assert here.returncode == 0 and f"config {config}" in here.stderr, here.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_env = run_cli("status", cwd=elsewhere, env={"AINODE_CONFIG": str(config)})
    assert by_env.returncode == 0 and "(AINODE_CONFIG)" in by_env.stderr, by_env.stderr
    assert list(elsewhere.iterdir()) == []


def test_status_hides_the_database_password(tmp_path):
    url = f"postgresql+psycopg://ainode:s3cret@127.0.0.1:{free_port()}/ainode"
    config = write(tmp_path, {"node": {"database_url": url}})
    result = run_cli("status", "--config", str(config))
    assert result.returncode == 1
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr
    assert "cannot open database postgresql+psycopg://ainode:***@127.0.0.1" in result.stderr, result.stderr


# -- items 9 and 10: what serve says when it starts ------------------------------------------------
def test_serve_warns_that_results_wait_when_routes_send_to_the_sender_and_no_peers_exist(tmp_path):
    config = {"node": node_section(tmp_path)}  # the quick start: default routes, no peers
    node = NodeProcess(config, tmp_path / "n", cli=True)
    with node:
        pass
    log = node.log_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "no peers are configured" in line]
    assert len(warnings) == 3, log
    assert (
        "route ct-lungs sends results to the sender, but no peers are configured: "
        "results will wait until the sender is added under peers"
    ) in warnings[0]
    # The start-up lines name what this node runs with.
    assert f"config {node.config_path} (--config)" in log
    assert f"database sqlite:///{tmp_path}/node.db" in log and f"spool {tmp_path}/spool" in log
    assert "peers: none" in log and "routes: ct-lungs -> lung-seg -> sender" in log
    assert "models: lung-seg " in log


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_a_real_session_logs_no_library_chatter_at_info(tmp_path, orthanc, ct_dir):
    config = {
        "node": node_section(tmp_path),
        "peers": {"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        "routes": [
            {
                "name": "ct-lungs",
                "match": {"Modality": "CT"},
                "pipeline": "lung-seg",
                "destinations": ["pacs"],
                "stable_after_s": 1,
            }
        ],  # fmt: skip
    }
    with NodeProcess(config, tmp_path / "n", cli=True) as node:
        assert storescu(ct_dir / "series-3-B40f", node.port, calling_ae="CTSCANNER").returncode == 0
        wait_for(
            lambda: (s := status(node))["jobs"] and s["jobs"][0]["state"] not in ("queued", "running")
            and not s["counts"]["deliveries"].get("pending"),
            timeout_s=300,
            what="the job and its deliveries to end",
            node=node,
        )  # fmt: skip
    log = node.log_text()
    assert "lung-seg" in log
    libraries = ("highdicom", "pydicom", "py.warnings", "pynetdicom", "alembic")
    # Lines are "date time LEVEL logger: message".
    chatter = [line for line in log.splitlines() if line.split()[3:4] and line.split()[3].startswith(libraries)]
    assert chatter == [], "\n".join(chatter[:10])
