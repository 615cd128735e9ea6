"""Merging two networks into one (Pasen & Boza, "Merging of neural networks", arXiv 2204.09973).

Three network transformations, no training (merging.py runs the method):

1. :func:`concat_teachers`: two teachers of one architecture become a double-width *big student*
   (core/widen.py's concatenation: the image-reading layers stacked, every later conv/linear
   block-diagonal [[W_A, 0], [0, W_B]] with trainable zero cross blocks, BN concatenated, the
   classifier [W_A/2 | W_B/2]), checked to give the mean of the teachers' logits.
2. :class:`GatedStudent`: hard-concrete L0 gates (Louizos et al. 2018) on the channels of every
   coupled group (graph.py), applied after the group's BN (gating before BN would be undone by
   it). A residual stream is one group, so every tensor added into it shares one gate vector.
3. :func:`gate_plan` + :func:`compress`: per group keep the half of the channels with the largest
   log alpha (a KeepPlan), fold the deterministic gate values of the kept channels into the BN (or
   layer) that they scale, and cut with the one surgery: the result has exactly the teachers'
   architecture and equals the gated student with the dropped channels' gates closed.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from slimkit.core.cost import example_input
from slimkit.core.errors import SlimkitError
from slimkit.core.graph import ChannelGraph, CoupledGroup
from slimkit.core.plan import KeepPlan
from slimkit.core.surgery import apply_plan, plans_of
from slimkit.core.widen import NORMS, concatenate
from slimkit.models import spec_of

__all__ = ["concat_teachers", "GatedStudent", "gate_plan", "compress", "BETA", "GAMMA", "ZETA", "LOG_ALPHA_INIT"]

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # hard-concrete temperature and stretch (Louizos et al. 2018)
LOG_ALPHA_INIT = 1.0


# --- 1. the big student ---------------------------------------------------------------------------

def concat_teachers(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> nn.Module:
    """The double-width big student of teachers ``a`` and ``b`` (eval mode); neither is modified.

    Verifies, on random inputs in eval mode, that the student's logits equal the mean of the
    teachers' logits (to ``atol`` relative to the logits' scale) and refuses otherwise.
    """
    sa, sb = spec_of(a), spec_of(b)
    if sa.arch != sb.arch or sa.args != sb.args:
        diff = "architecture" if sa.arch != sb.arch else next(k for k in sa.args if sa.args.get(k) != sb.args.get(k))
        raise SlimkitError(f"the teachers differ in {diff}: {sa.arch}{_args(sa.args)} vs {sb.arch}{_args(sb.args)}; "
                           "merging needs two networks of one architecture, classes and input shape")
    if plans_of(a) or plans_of(b) or getattr(a, "slimkit_concat", 1) != 1 or getattr(b, "slimkit_concat", 1) != 1:
        raise SlimkitError("merging needs two dense teachers; a sliced or already merged network cannot be a teacher")
    a, b = a.eval(), b.eval()
    with torch.inference_mode(False):
        big = concatenate(a, b, sa.input_shape)
    big.slimkit_spec = sa
    big.eval()
    x = example_input(a, sa.input_shape, 4, torch.Generator().manual_seed(0))  # where the teachers live
    with torch.no_grad():
        want = (a(x) + b(x)) / 2
        got = big(x)
    err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)
    if not err <= atol:
        raise SlimkitError(f"the concatenated {sa.arch} does not reproduce the mean of its teachers "
                           f"(relative error {err:.2e} > {atol:g}); its forward pass mixes channels in a way "
                           "merging cannot follow")
    return big


def _args(args: dict) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in args.items()) + ")"


# --- 2. hard-concrete gates ----------------------------------------------------------------------

class GatedStudent(nn.Module):
    """``net`` with one hard-concrete gate vector per coupled channel group (classes are never gated).

    Training mode samples z = clamp(sigmoid((log u - log(1-u) + log_alpha)/beta)*(zeta-gamma)+gamma, 0, 1)
    once per forward pass (shared by the batch); eval mode uses the deterministic
    z = clamp(sigmoid(log_alpha)*(zeta-gamma)+gamma, 0, 1). The gate multiplies the output of the BN
    that follows each producer of the group (or of the producer itself when no BN follows).
    """

    def __init__(self, net: nn.Module, graph: ChannelGraph | None = None, log_alpha_init: float = LOG_ALPHA_INIT):
        super().__init__()
        self.net = net
        graph = graph if graph is not None else ChannelGraph(net, spec_of(net).input_shape)
        self.groups: list[CoupledGroup] = [g for g in graph.groups if not g.is_output]
        device = next(net.parameters()).device  # gates live with the network they gate
        self.log_alpha = nn.ParameterList([nn.Parameter(torch.full((g.size,), float(log_alpha_init), device=device))
                                           for g in self.groups])
        self.targets: list[list[tuple[str, torch.Tensor]]] = []  # per group: (module gated, local->root index)
        names = {m: n for n, m in net.named_modules()}
        modules = dict(net.named_modules())
        for g in self.groups:
            targets = []
            for p in g.producers:
                where = _norm_after(graph, modules[p.name], names) or p.name
                index = torch.empty(len(p.local), dtype=torch.long)
                index[list(p.local)] = torch.tensor(p.root, dtype=torch.long)
                index = index.to(device)
                targets.append((where, index))
            self.targets.append(targets)
        self._z: list[torch.Tensor] | None = None
        for gi, targets in enumerate(self.targets):
            for where, index in targets:
                name = f"_index{len(self._buffers)}"  # a buffer, so it moves with .to(device)
                self.register_buffer(name, index.clone(), persistent=False)
                modules[where].register_forward_hook(self._hook(gi, name))

    def _hook(self, gi: int, index_name: str):
        def apply(module, inputs, output):
            if self._z is None:  # the bare network called directly, outside the GatedStudent: ungated
                return output
            z = self._z[gi][getattr(self, index_name)]
            return output * z.view(1, -1, *([1] * (output.dim() - 2)))
        return apply

    @staticmethod
    def stretch(s: torch.Tensor) -> torch.Tensor:
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def gates(self, deterministic: bool | None = None) -> list[torch.Tensor]:
        if deterministic is None:
            deterministic = not self.training
        if deterministic:
            return [self.stretch(torch.sigmoid(la)) for la in self.log_alpha]
        out = []
        for la in self.log_alpha:
            u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
            out.append(self.stretch(torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / BETA)))
        return out

    def p_open(self) -> list[torch.Tensor]:
        """P(z_j != 0) per channel, differentiable in log_alpha."""
        shift = BETA * math.log(-GAMMA / ZETA)
        return [torch.sigmoid(la - shift) for la in self.log_alpha]

    def penalty(self) -> torch.Tensor:
        """sum over gated groups of (1/2 - mean_j P(z_j != 0))^2: pulls each group towards half open."""
        return sum((0.5 - p.mean()) ** 2 for p in self.p_open())

    def open_fraction(self) -> list[float]:
        """Per group, the fraction of gates the deterministic (eval) gate leaves non-zero."""
        with torch.no_grad():
            return [float((z > 0).float().mean()) for z in self.gates(deterministic=True)]

    def group_names(self) -> list[str]:
        return [g.root for g in self.groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._z = self.gates()
        try:
            return self.net(x)
        finally:
            self._z = None


def _norm_after(graph: ChannelGraph, producer: nn.Module, names: dict[nn.Module, str]) -> str | None:
    node = graph.dg.module2node.get(producer)
    if node is None:
        return None
    for out in node.outputs:
        if isinstance(out.module, NORMS) and len(node.outputs) == 1:
            return names[out.module]
    return None


# --- 3. compression ------------------------------------------------------------------------------

def gate_plan(gated: GatedStudent, keep_fraction: float = 0.5) -> KeepPlan:
    """Per gated group, keep the ``keep_fraction`` of channels with the largest log alpha."""
    keep = {}
    for g, la in zip(gated.groups, gated.log_alpha):
        k = max(1, round(keep_fraction * g.size))
        order = torch.argsort(la.detach().cpu(), descending=True, stable=True)
        kept_roots = set(order[:k].tolist())
        for p in g.producers:
            keep[p.name] = tuple(sorted(loc for loc, r in zip(p.local, p.root) if r in kept_roots))
    return KeepPlan(keep, origin=f"merge: top {keep_fraction:g} of hard-concrete gates by log alpha")


@torch.no_grad()
def _fold_gates(gated: GatedStudent, net: nn.Module) -> None:
    """Multiply each gated module's per-channel affine output by its deterministic gate value."""
    modules = dict(net.named_modules())
    for z, targets in zip(gated.gates(deterministic=True), gated.targets):
        for where, index in targets:
            m = modules[where]
            s = z[index.to(z.device)].to(device=m.weight.device, dtype=m.weight.dtype)
            if isinstance(m, NORMS) and not m.affine:
                raise SlimkitError(f"layer {where}: a BatchNorm without affine parameters cannot absorb its gate")
            m.weight.mul_(s.view(-1, *([1] * (m.weight.dim() - 1))))
            if m.bias is not None:
                m.bias.mul_(s)


def compress(gated: GatedStudent, teacher_like: nn.Module, keep_fraction: float = 0.5) -> tuple[nn.Module, KeepPlan]:
    """The compressed student: a fresh network of ``teacher_like``'s architecture holding the kept half.

    ``gated`` is left untouched. The gate values of the kept channels are folded into the BN they
    scale, so the result equals ``gated`` in eval mode with every dropped channel's gate closed.
    """
    plan = gate_plan(gated, keep_fraction)
    net = copy.deepcopy(gated.net)  # its copied hooks see no sampled gates and pass outputs through
    _fold_gates(gated, net)
    spec = spec_of(teacher_like)
    net.slimkit_spec = spec
    slim = apply_plan(net.eval(), plan, spec.input_shape)
    from slimkit.models import create_model

    out = create_model(spec.arch, input_shape=spec.input_shape, **spec.args)  # the teachers' input, not the default
    own, got = out.state_dict(), slim.state_dict()
    bad = [k for k in own if k not in got or tuple(got[k].shape) != tuple(own[k].shape)]
    if bad:
        raise SlimkitError(f"the compressed student is not a {spec.arch}: layer {bad[0]} has the wrong shape")
    out.load_state_dict(got)
    return out.eval(), plan
