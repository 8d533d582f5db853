"""node.worker_processes: auto (the default) chooses where a node's jobs run from the machine it is on."""

from __future__ import annotations

import os

import pytest

from node.config import NodeSettings
from node.operate.supervise import plan, usable_cpus, usable_memory_bytes

GIB = 2**30
CPU = ["CPUExecutionProvider"]


def test_the_default_is_auto_with_two_jobs_at_once():
    node = NodeSettings()
    assert (node.worker_processes, node.workers) == ("auto", 2)
    # auto is fine with every role (it means "none" for a receiver or a worker); a number needs role all.
    assert NodeSettings(role="receiver").worker_processes == "auto"
    with pytest.raises(ValueError, match="needs role all"):
        NodeSettings(role="worker", port=None, worker_processes=2)


def test_on_two_cores_the_two_jobs_run_in_two_processes_of_one_thread():
    jobs = plan("auto", 2, cpus=2, memory_bytes=24 * GIB, providers=CPU)
    assert (jobs.processes, jobs.threads) == (2, 1)
    assert jobs.why == "worker_processes: auto, 2 usable cores, 24.0 GiB"


@pytest.mark.parametrize(
    ("workers", "cpus", "memory", "expected"),
    [
        (2, 1, 24 * GIB, (0, 2)),  # one core: processes would only take turns
        (2, 2, 3 * GIB, (0, 2)),  # not 2 GiB for each
        (1, 8, 64 * GIB, (0, 1)),  # one job at a time: nothing to run beside it
        (4, 2, 24 * GIB, (2, 2)),  # more jobs than cores: a process per core, the jobs shared out
        (8, 16, 6 * GIB, (3, 2)),  # memory for 3
        (2, 4, None, (2, 1)),  # memory unknown: the cores decide
    ],
)
def test_auto_keeps_jobs_in_the_node_where_processes_would_not_help(workers, cpus, memory, expected):
    jobs = plan("auto", workers, cpus=cpus, memory_bytes=memory, providers=CPU)
    assert (jobs.processes, jobs.threads) == expected
    if not jobs.processes:
        assert jobs.why.endswith("jobs in this process")


def test_models_on_a_gpu_stay_in_one_process():
    jobs = plan("auto", 2, cpus=8, memory_bytes=64 * GIB, providers=["CUDAExecutionProvider", *CPU])
    assert (jobs.processes, jobs.threads) == (0, 2)
    assert "CUDAExecutionProvider" in jobs.why


def test_a_number_is_taken_as_it_is():
    assert plan(3, 2, cpus=1, memory_bytes=1 * GIB, providers=CPU).processes == 3
    assert plan(0, 2, cpus=16, memory_bytes=64 * GIB, providers=CPU).processes == 0
    assert plan(3, 2, cpus=1, memory_bytes=None, providers=CPU).threads == 2  # workers threads each, as configured


def _cgroup(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "cap"),
    [
        ({"cpu.max": "100000 100000\n"}, 1),  # cgroup v2: a container of 1 CPU
        ({"cpu.max": "250000 100000\n"}, 2),
        ({"cpu.max": "max 100000\n"}, None),  # no quota
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files: the affinity alone
    ],
)
def test_a_containers_cpu_quota_caps_the_usable_cores(tmp_path, files, cap):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(_cgroup(tmp_path, files)) == (min(affinity, cap) if cap else affinity)


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"memory.max": "3221225472\n"}, 3 * GIB),  # cgroup v2: a container of 3 GiB
        ({"memory.max": "max\n"}, None),
        ({"memory/memory.limit_in_bytes": "2147483648\n"}, 2 * GIB),  # cgroup v1
        ({}, None),
    ],
)
def test_a_containers_memory_limit_caps_the_usable_memory(tmp_path, files, limit):
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert usable_memory_bytes(_cgroup(tmp_path, files)) == (min(physical, limit) if limit else physical)
