"""The double-width network of two networks of one architecture (merging's big student), exactly.

The layers reading the image stack both networks' filters; every later conv/linear becomes
block-diagonal [[W_A, 0], [0, W_B]] (the cross blocks are zero); BN parameters and running statistics
are concatenated; the classifier is [W_A/2 | W_B/2] with bias (b_A+b_B)/2. Every tensor inside is then
[A's channels | B's channels], so residual adds stay consistent and the logits are the mean of the two.
A network transformation like the cut (surgery.py): methods/merge/transform.py builds its big student
with :func:`concatenate`, and a checkpoint of one is rebuilt with :func:`widen` (models/checkpoint.py).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.graph import ChannelGraph

__all__ = ["mergeable_graph", "concatenate", "widen", "NORMS"]

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_WEIGHTED = (nn.Conv2d, nn.Linear, *NORMS)
_CHANNEL_MIXING_OPS = ("CONCAT", "SPLIT", "UNBIND", "SLICE", "EXPAND")


def mergeable_graph(model: nn.Module, input_shape: tuple[int, ...]) -> ChannelGraph:
    """The traced graph of ``model``, refusing any layer the concatenation cannot widen exactly."""
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
        elif isinstance(m, NORMS):
            m.num_features = ma.num_features + mb.num_features
            if m.affine:
                m.weight = nn.Parameter(torch.cat([ma.weight, mb.weight]))
                m.bias = nn.Parameter(torch.cat([ma.bias, mb.bias]))
            if m.track_running_stats:
                m.running_mean = torch.cat([ma.running_mean, mb.running_mean])
                m.running_var = torch.cat([ma.running_var, mb.running_var])


def concatenate(a: nn.Module, b: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """The double-width network of ``a`` and ``b`` (same architecture, traced at ``input_shape``): a new
    module, neither input is modified. Checks nothing about the result; the caller verifies its logits."""
    graph = mergeable_graph(a, input_shape)
    big = copy.deepcopy(a)
    _concat_into(big, a, b, graph)
    big.slimkit_concat = 2
    return big


def widen(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """The double-width *structure* of ``model`` in place (weights meaningless): used to load a checkpoint."""
    graph = mergeable_graph(model, input_shape)
    _concat_into(model, model, copy.deepcopy(model), graph)
    model.slimkit_concat = 2
    return model
