"""The device rule and the DDP process group (slimkit/engine/distributed.py), without a GPU.

The rank -> device mapping and the backend choice are pure functions of the environment and the
GPU count, so the torchrun cases of a GPU host are checked here with env dicts. The process-group
teardown and timeout are checked with two real gloo processes.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slimkit.core.errors import SlimkitError
from slimkit.engine.distributed import backend_for, ddp_timeout, device_for

ROOT = Path(__file__).resolve().parents[1]


def torchrun_env(local_rank: int, per_node: int) -> dict[str, str]:
    return {"LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(per_node), "WORLD_SIZE": str(per_node),
            "RANK": str(local_rank)}


@pytest.mark.parametrize("name", ["auto", "cuda"])
@pytest.mark.parametrize("rank", [0, 1, 3])
def test_each_torchrun_process_takes_its_own_gpu(name, rank):
    # 4 GPUs, 4 processes: process r must be alone on GPU r (NCCL refuses two ranks on one GPU)
    assert device_for(name, torchrun_env(rank, 4), cuda_count=4) == f"cuda:{rank}"


def test_single_process_takes_the_first_gpu_or_the_one_named():
    assert device_for("auto", {}, cuda_count=2) == "cuda:0"
    assert device_for("cuda", {}, cuda_count=2) == "cuda:0"
    assert device_for("cuda:1", {}, cuda_count=2) == "cuda:1"
    assert device_for("cuda:1", torchrun_env(0, 1), cuda_count=2) == "cuda:1"  # torchrun, one process per node


def test_cpu_stays_cpu_on_a_gpu_host_and_auto_is_cpu_without_one():
    assert device_for("cpu", torchrun_env(1, 2), cuda_count=2) == "cpu"
    assert device_for("auto", torchrun_env(1, 2), cuda_count=0) == "cpu"


@pytest.mark.parametrize("name,env,count,msg", [
    ("cuda:1", torchrun_env(0, 2), 2, "would put every process on one GPU"),
    ("cuda", torchrun_env(2, 4), 2, "LOCAL_RANK 2 needs GPU 2, but this machine has 2"),
    ("cuda:3", {}, 2, "--device cuda:3 needs GPU 3, but this machine has 2"),
    ("cuda", {}, 0, "CUDA is not available on this machine"),
    ("cuda:x", {}, 1, "unknown device 'cuda:x'"),
    ("tpu", {}, 1, "unknown device 'tpu'"),
])
def test_impossible_devices_are_refused(name, env, count, msg):
    with pytest.raises(SlimkitError, match=msg):
        device_for(name, env, cuda_count=count)


def test_backend_follows_the_chosen_device_not_the_hardware():
    assert backend_for("cpu") == "gloo"  # --device cpu on a GPU host: NCCL cannot reduce CPU tensors
    assert backend_for("cuda:1") == "nccl"


def test_timeout_is_bounded_and_configurable():
    assert ddp_timeout({}).total_seconds() == 1800
    assert ddp_timeout({"SLIMKIT_DDP_TIMEOUT_S": "2.5"}).total_seconds() == 2.5
    for bad in ("0", "-3", "soon", "nan"):
        with pytest.raises(SlimkitError, match="SLIMKIT_DDP_TIMEOUT_S"):
            ddp_timeout({"SLIMKIT_DDP_TIMEOUT_S": bad})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(rank0: str, rank1: str, timeout_s: float, wait_s: float = 60) -> list[subprocess.CompletedProcess]:
    """Run two processes joined by slimkit's process_group('cpu'), as torchrun would start them."""
    port = _free_port()
    procs = []
    for rank, body in enumerate((rank0, rank1)):
        code = "\n".join([
            "import time",
            "import torch.distributed as dist",
            "from slimkit.engine.distributed import process_group",
            "with process_group('cpu') as (rank, world):",
            "    print('backend', dist.get_backend(), flush=True)",
            f"    {body}"])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "SLIMKIT_DDP_TIMEOUT_S": str(timeout_s), **torchrun_env(rank, 2)}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=wait_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank still waits after {wait_s} s: the process group hangs")
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


@pytest.mark.slow
def test_a_rank_that_fails_makes_the_others_fail_not_wait():
    # rank 0 raises inside the group; rank 1 waits at the closing barrier: it must fail, not hang
    r0, r1 = _two_ranks(
        'raise RuntimeError("rank 0 crashed")',
        'dist.barrier()',
        timeout_s=600)
    assert "rank 0 crashed" in r0.stderr and r0.returncode != 0
    assert r1.returncode != 0
    assert "backend gloo" in r1.stdout


@pytest.mark.slow
def test_a_rank_that_never_arrives_times_out():
    # rank 0 is stuck (alive, silent) before the closing barrier; rank 1 gives up after the timeout
    r0, r1 = _two_ranks('time.sleep(12)', 'pass', timeout_s=3, wait_s=60)
    assert r1.returncode != 0, r1.stderr
    assert "timed out" in r1.stderr.lower() or "timeout" in r1.stderr.lower(), r1.stderr[-2000:]
