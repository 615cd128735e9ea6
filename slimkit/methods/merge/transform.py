"""Merging two networks into one (Pasen & Boza, "Merging of neural networks", arXiv 2204.09973).

Three network transformations, no training (merging.py runs the method):

1. :func:`concat_teachers`: two teachers of one architecture become a double-width *big student*.
   The layers reading the image stack both teachers' filters; every later conv/linear becomes
   block-diagonal [[W_A, 0], [0, W_B]] (the cross blocks are zero and trainable); BN parameters and
   running statistics are concatenated; the classifier is [W_A/2 | W_B/2] with bias (b_A+b_B)/2.
   Every tensor inside the student is then [teacher A's channels | teacher B's channels], so residual
   adds stay consistent and the student's logits equal the mean of the teachers' logits.
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
from slimkit.models import spec_of

__all__ = ["concat_teachers", "widen", "mergeable_graph", "GatedStudent", "gate_plan", "compress",
           "BETA", "GAMMA", "ZETA", "LOG_ALPHA_INIT"]

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # hard-concrete temperature and stretch (Louizos et al. 2018)
LOG_ALPHA_INIT = 1.0
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_WEIGHTED = (nn.Conv2d, nn.Linear, *_NORMS)
_CHANNEL_MIXING_OPS = ("CONCAT", "SPLIT", "UNBIND", "SLICE", "EXPAND")


# --- 1. the big student --------------------------------------------------------------------------

def mergeable_graph(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ChannelGraph:
    """The traced graph of ``model``, refusing any layer the concatenation cannot widen exactly."""
    if input_shape is None:
        input_shape = spec_of(model).input_shape
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            raise SlimkitError(f"layer {name}: grouped/depthwise convolution (groups={m.groups}) is not supported "
                               "by merging; supported: dense Conv2d, Linear, BatchNorm, activations, pooling")
        has_state = any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
        if has_state and not isinstance(m, _WEIGHTED):
            raise SlimkitError(f"layer {name}: {type(m).__name__} is not supported by merging; "
                               "supported: dense Conv2d, Linear, BatchNorm, activations, pooling")
    graph = ChannelGraph(model, input_shape)
    for construct, layer in graph.labelled.items():  # shuffles, splits, fixed filters, layer scale
        raise SlimkitError(
            f"layer {layer}: {construct}, which merging cannot widen exactly (the student's channels must stay "
            "[teacher A | teacher B] everywhere); supported: cifar_resnet, resnet18/34/50, vgg11_bn/16_bn, small_vgg, mlp")
    names = {m: n for n, m in model.named_modules()}
    for node in graph.dg.module2node.values():
        kind = getattr(getattr(node, "type", None), "name", "")
        if kind in _CHANNEL_MIXING_OPS:
            reader = _first_layer_after(node, names)
            raise SlimkitError(
                f"layer {reader}: reads a channel {kind.lower()} operation, which merging cannot widen exactly "
                "(the student's channels must stay [teacher A | teacher B] everywhere); "
                "supported: cifar_resnet, resnet18/34/50, vgg11_bn/16_bn, small_vgg, mlp")
    return graph


def _first_layer_after(node, names: dict[nn.Module, str]) -> str:
    seen, todo = set(), list(node.outputs)
    while todo:
        n = todo.pop(0)
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n.module, _WEIGHTED) and n.module in names:
            return names[n.module]
        todo.extend(n.outputs)
    return "<output>"


def _layer_roles(graph: ChannelGraph) -> tuple[set[str], set[str]]:
    """(layers reading the network input, layers writing the network output)."""
    consumers = {c.name for g in graph.groups for c in g.consumers}
    reads_input = {n for n in graph.group_of if n not in consumers}
    writes_output = {p.name for g in graph.groups if g.is_output for p in g.producers}
    return reads_input, writes_output


def _set_width(m: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    m.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        m.bias = nn.Parameter(bias.contiguous())
    if isinstance(m, nn.Conv2d):
        m.out_channels, m.in_channels = weight.shape[0], weight.shape[1]
    else:
        m.out_features, m.in_features = weight.shape[0], weight.shape[1]


def _block_diag(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    w = wa.new_zeros((wa.shape[0] + wb.shape[0], wa.shape[1] + wb.shape[1], *wa.shape[2:]))
    w[: wa.shape[0], : wa.shape[1]] = wa
    w[wa.shape[0]:, wa.shape[1]:] = wb
    return w


@torch.no_grad()
def _concat_into(big: nn.Module, a: nn.Module, b: nn.Module, graph: ChannelGraph) -> None:
    reads_input, writes_output = _layer_roles(graph)
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    for name, m in big.named_modules():
        ma, mb = mods_a[name], mods_b[name]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if name not in graph.group_of:
                raise SlimkitError(f"layer {name}: the forward pass never uses it; merging needs every layer traced")
            wa, wb = ma.weight, mb.weight
            ba = ma.bias if ma.bias is not None else None
            bb = mb.bias if mb.bias is not None else None
            inp, outp = name in reads_input, name in writes_output
            if inp and outp:  # a single-layer network: the mean of two affine maps
                w, bias = (wa + wb) / 2, None if ba is None else (ba + bb) / 2
            elif outp:  # classifier: [W_A/2 | W_B/2], bias (b_A+b_B)/2 -> mean of the teachers' logits
                w, bias = torch.cat([wa / 2, wb / 2], 1), None if ba is None else (ba + bb) / 2
            elif inp:  # reads the shared image: both teachers' filters stacked
                w, bias = torch.cat([wa, wb], 0), None if ba is None else torch.cat([ba, bb])
            else:
                w, bias = _block_diag(wa, wb), None if ba is None else torch.cat([ba, bb])
            _set_width(m, w, bias)
        elif isinstance(m, _NORMS):
            m.num_features = ma.num_features + mb.num_features
            if m.affine:
                m.weight = nn.Parameter(torch.cat([ma.weight, mb.weight]))
                m.bias = nn.Parameter(torch.cat([ma.bias, mb.bias]))
            if m.track_running_stats:
                m.running_mean = torch.cat([ma.running_mean, mb.running_mean])
                m.running_var = torch.cat([ma.running_var, mb.running_var])


def widen(model: nn.Module) -> nn.Module:
    """The big-student *structure* of ``model`` in place (weights meaningless): used to load a checkpoint."""
    graph = mergeable_graph(model)
    _concat_into(model, model, copy.deepcopy(model), graph)
    model.slimkit_concat = 2
    return model


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
        graph = mergeable_graph(a, sa.input_shape)
        big = copy.deepcopy(a)
        _concat_into(big, a, b, graph)
    big.slimkit_spec, big.slimkit_concat = sa, 2
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
        if isinstance(out.module, _NORMS) and len(node.outputs) == 1:
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
            if isinstance(m, _NORMS) and not m.affine:
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
