"""The inference worker layout: processes and threads per machine, and the overrides."""

from __future__ import annotations

import os

from pipeline.service.supervisor import MAX_CPU_WORKERS, inference_layout, worker_children
from pipeline.settings import Settings

CORES = len(os.sched_getaffinity(0))


def test_a_cpu_gets_a_single_threaded_process_per_core() -> None:
    layout = inference_layout(Settings(device="cpu"))
    assert layout.processes == min(CORES, MAX_CPU_WORKERS)
    assert layout.threads == max(1, CORES // layout.processes)
    assert layout.processes * layout.threads <= max(CORES, 1)


def test_overrides_of_processes_and_threads() -> None:
    one = inference_layout(Settings(device="cpu", worker_processes=1))
    assert (one.processes, one.threads) == (1, CORES)
    both = inference_layout(Settings(device="cpu", worker_processes=3, torch_threads=2))
    assert (both.processes, both.threads) == (3, 2)


def test_an_accelerator_gets_one_process() -> None:
    layout = inference_layout(Settings(device="cuda"))
    assert (layout.device, layout.processes, layout.threads) == ("cuda", 1, 0)
    assert inference_layout(Settings(device="cuda:1", worker_processes=2)).processes == 2


def test_each_worker_child_has_its_own_celery_name_and_the_layout_in_its_env() -> None:
    children = worker_children(Settings(device="cpu", worker_processes=3), {"KEEP": "1"}, "w")
    assert [name for name, _, _ in children] == ["worker-0", "worker-1", "worker-2"]
    hostnames = [cmd[cmd.index("--hostname") + 1] for _, cmd, _ in children]
    assert hostnames == ["w-0@%h", "w-1@%h", "w-2@%h"]
    for _, _, env in children:
        assert (env["KEEP"], env["CXR_DEVICE"]) == ("1", "cpu")
        assert env["CXR_TORCH_THREADS"] == str(max(1, CORES // 3))
    [(name, cmd, env)] = worker_children(Settings(device="cpu", worker_processes=1), {})
    assert name == "worker" and cmd[cmd.index("--hostname") + 1] == "cxr-worker@%h"
