"""Where a training process runs: the device rule and the DDP process group, in one place.

Under torchrun every process reads LOCAL_RANK; a process given ``--device auto`` or ``cuda`` on a
GPU host takes ``cuda:LOCAL_RANK`` (one GPU per process: NCCL refuses two ranks on one GPU). The
backend follows the *chosen* device, not the hardware: ``nccl`` for CUDA, ``gloo`` for the CPU,
so ``--device cpu`` under torchrun on a GPU host still reduces CPU tensors. The process group has a
timeout, and a rank that fails tears its group down at once instead of leaving a barrier behind.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator, Mapping

import torch
from torch import nn

from slimkit.core.errors import SlimkitError

__all__ = ["device_for", "resolve_device", "backend_for", "ddp_timeout", "process_group", "barrier", "ddp"]

DEFAULT_TIMEOUT_S = 1800.0  # rank 0 evaluates and writes while the others wait at the next collective
TIMEOUT_ENV = "SLIMKIT_DDP_TIMEOUT_S"


def device_for(name: str, env: Mapping[str, str], cuda_count: int) -> str:
    """The device a process takes for ``--device name``, given its environment and the visible GPUs.

    A pure function (tested without a GPU): 'auto' is CUDA when a GPU is visible, else the CPU;
    under torchrun (LOCAL_RANK set) 'auto' and 'cuda' become ``cuda:LOCAL_RANK``. An explicit
    ``cuda:N`` is kept for a single process per node and refused for several (they would share GPU N).
    """
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise SlimkitError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name == "cpu" or (name == "auto" and cuda_count == 0):
        return "cpu"
    if cuda_count == 0:
        raise SlimkitError(f"--device {name}: CUDA is not available on this machine (torch sees no GPU); use cpu or auto")
    local = env.get("LOCAL_RANK")
    if name.startswith("cuda:"):
        index = int(name[5:])
        if local is not None and int(env.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise SlimkitError(f"--device {name} under torchrun with {env['LOCAL_WORLD_SIZE']} processes per node would put "
                               "every process on one GPU; use --device cuda (process r takes cuda:r) or auto")
    else:
        index = int(local) if local is not None else 0
    if index >= cuda_count:
        what = f"LOCAL_RANK {local}" if not name.startswith("cuda:") else f"--device {name}"
        raise SlimkitError(f"{what} needs GPU {index}, but this machine has {cuda_count} (cuda:0..cuda:{cuda_count - 1}); "
                           "run at most one process per GPU")
    return f"cuda:{index}"


def resolve_device(name: str) -> str:
    """:func:`device_for` this process on this machine; makes a chosen GPU the current one."""
    dev = device_for(name, os.environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest conv algorithms
    return dev


def backend_for(device: str) -> str:
    """The collective backend for tensors on ``device``: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def ddp_timeout(env: Mapping[str, str]) -> datetime.timedelta:
    """How long a collective may wait for the other ranks (env SLIMKIT_DDP_TIMEOUT_S, default 30 min)."""
    raw = env.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise SlimkitError(f"{TIMEOUT_ENV}={raw!r}: the DDP timeout must be a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group(device: str) -> Iterator[tuple[int, int]]:
    """(rank, world): joins torchrun's process group (WORLD_SIZE > 1) for tensors on ``device``, leaves it after.

    ``device`` is the resolved device (:func:`resolve_device`); it picks the backend. On an error
    the group is torn down without the closing barrier, so the other ranks fail instead of waiting.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0, 1
        return
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        kwargs = {"device_id": torch.device(device)} if str(device).startswith("cuda") else {}
        dist.init_process_group(backend_for(device), timeout=ddp_timeout(os.environ), **kwargs)
        created = True
    ok = False
    try:
        yield dist.get_rank(), dist.get_world_size()
        ok = True
    finally:
        if created:
            try:
                if ok:  # ranks > 0 finish first: let rank 0 finish writing before anyone tears the group down
                    dist.barrier()
            finally:
                dist.destroy_process_group()  # on NCCL this aborts the communicators: pending peers fail


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def ddp(model: nn.Module, world: int) -> nn.Module:
    """``model`` wrapped for data-parallel training when launched by torchrun, else itself."""
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return DistributedDataParallel(model, device_ids=[dev.index])
    return DistributedDataParallel(model)  # shares model's parameters; buffers follow rank 0
