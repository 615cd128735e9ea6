"""Shared helpers: non-trivial BN statistics, the CLI run in-process, KE-style checkpoints."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from slimkit.cli import main

# `make test` runs the invariant tests again with SLIMKIT_TEST_THREADS=1: an equality between two
# different computations must hold whatever the thread count splits the reductions into.
if os.environ.get("SLIMKIT_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["SLIMKIT_TEST_THREADS"]))


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN layer non-trivial affine parameters and running statistics.

    With default BN (mean 0, var 1, gamma 1, beta 0) a dropped channel that leaks would often still
    cancel out; random statistics make any leak visible in the outputs.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def ke_kels_masks(state_dict: dict[str, torch.Tensor], split_rate: float, classifier: str = "fc") -> dict[str, torch.Tensor]:
    """Split masks exactly as the official Knowledge Evolution code builds them for a ResNet.

    Written from the paper's rule, independent of slimkit: first ceil(sr*out) filters x first
    ceil(sr*in) kernels; a conv with 3 input channels (reading the image) keeps all inputs; the
    classifier keeps every output.
    """
    masks = {}
    for key, w in state_dict.items():
        if not key.endswith(".weight") or w.dim() not in (2, 4):
            continue
        name = key[: -len(".weight")]
        out_c, in_c = w.shape[:2]
        mask = torch.zeros_like(w)
        keep_out = out_c if name == classifier else math.ceil(out_c * split_rate)
        keep_in = in_c if (w.dim() == 4 and in_c == 3) else math.ceil(in_c * split_rate)
        mask[:keep_out, :keep_in] = 1
        masks[name] = mask
    return masks


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run `slimkit ARGS...` in-process; returns exit code, stdout, stderr."""

    def run(*args: str) -> CliResult:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse errors
            code = exc.code
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
