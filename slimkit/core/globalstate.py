"""Process-wide settings a library call must leave as it found them (STYLE.md: no hidden global state).

:func:`usable_cpus` is the default thread count of every timing, and :func:`keep_global_state`
wraps every verb: torch's global generators (CPU, and the CUDA devices the
call uses), the thread count and the cudnn / matmul flags are restored when it returns or raises.
Inside, :func:`seed_global` seeds the generators that module constructors and the digits' batch
shift draw from; it touches only the CPU generator and, on CUDA, the current device's (where
``torch.manual_seed`` would also queue a seed for every accelerator the process has not used yet).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["keep_global_state", "seed_global", "usable_cpus"]


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (a container's or taskset's limit), not the
    machine's core count, which ``os.cpu_count()`` gives. Default thread count of every timing."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def seed_global(seed: int, device: str = "cpu") -> None:
    """Seed the global generator(s) a seeded step draws from: the CPU's and, on CUDA, the current device's."""
    torch.default_generator.manual_seed(seed)
    if str(device).startswith("cuda"):
        torch.cuda.manual_seed(seed)  # the current device: resolve_device made the chosen GPU current


def _flags() -> dict[str, object]:
    cudnn = torch.backends.cudnn
    return {"threads": torch.get_num_threads(), "deterministic": cudnn.deterministic, "benchmark": cudnn.benchmark,
            "enabled": cudnn.enabled, "cudnn_tf32": cudnn.allow_tf32,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "precision": torch.get_float32_matmul_precision()}


def _restore(f: dict[str, object]) -> None:
    cudnn = torch.backends.cudnn
    torch.set_num_threads(int(f["threads"]))  # type: ignore[arg-type]
    cudnn.deterministic, cudnn.benchmark, cudnn.enabled = f["deterministic"], f["benchmark"], f["enabled"]
    cudnn.allow_tf32 = f["cudnn_tf32"]
    torch.set_float32_matmul_precision(str(f["precision"]))  # sets matmul.allow_tf32 too: restore it after
    torch.backends.cuda.matmul.allow_tf32 = f["matmul_tf32"]


@contextlib.contextmanager
def keep_global_state() -> Iterator[None]:
    """Within the block anything may seed torch's generators or change threads and cudnn flags; after
    it, they are as before (also usable as a decorator).

    CUDA: if CUDA was initialised on entry, every device's generator and the current device are
    restored. If the call initialises CUDA itself, the generators it used are reseeded from
    ``torch.initial_seed()``, which is what a ``torch.manual_seed`` queued before the call would
    have done on first use (CUDA cannot be un-initialised), and device 0 is made current again.
    """
    flags = _flags()
    cuda_before = torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda_before else []
    current = torch.cuda.current_device() if cuda_before else None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        _restore(flags)
        if cuda_before:
            torch.cuda.set_device(current)
        elif torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(torch.initial_seed())
            torch.cuda.set_device(0)
