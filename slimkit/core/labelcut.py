"""The cut of a network traced by channel labels (channelmap.py; its coupled groups: graph.py).

The cut removes every
dropped class from each layer that produces or reads it, from the norms, fixed filters and layer
scale parameters that follow it, and rewrites split sizes a module stores. The per-layer pruning
functions are torch-pruning's.
"""
from __future__ import annotations

import torch
from torch import nn

from slimkit.core.channelmap import LabelTrace

__all__ = ["prune_labelled"]


@torch.no_grad()
def prune_labelled(model: nn.Module, trace: LabelTrace, groups: list, drops: list) -> None:
    """Remove the dropped channel classes from every layer, norm, filter and parameter that holds them,
    with torch-pruning's per-layer pruning functions."""
    from torch_pruning.pruner import function as F

    dropped = {g.classes[r] for g, drop in drops for r in drop}
    if not dropped:
        return
    mods = dict(model.named_modules())

    def idx(labels):
        return [i for i, c in enumerate(trace.classes(labels)) if c in dropped]

    for name, labels in trace.produced.items():
        m, i = mods[name], idx(labels)
        if not i:
            continue
        if isinstance(m, nn.Linear):
            F.prune_linear_out_channels(m, i)
        elif m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            F.prune_depthwise_conv_out_channels(m, i)
        elif name in trace.multipliers:  # whole groups go: k outputs and their one input each
            F.prune_conv_out_channels(m, i)
            m.groups = m.in_channels = m.out_channels // (len(labels) // m.groups)
        else:
            F.prune_conv_out_channels(m, i)
    for name, labels in trace.read.items():
        m, i = mods[name], idx(labels)
        if i:
            (F.prune_linear_in_channels if isinstance(m, nn.Linear) else F.prune_conv_in_channels)(m, i)
    done = set()
    for kind, where, dim, labels in trace.followers:
        i = idx(labels)
        if not i or (kind, where) in done:
            continue
        done.add((kind, where))
        if kind == "module":
            _prune_norm(F, mods[where], i)
        else:
            _slice_tensor(model, where, dim, i, kind == "filter")
    _resize_splits(model, trace, dropped)


def _prune_norm(F, m: nn.Module, i: list[int]) -> None:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        F.prune_batchnorm_out_channels(m, i)
    elif isinstance(m, nn.GroupNorm):  # one channel per group (several are refused): the groups follow
        F.prune_groupnorm_out_channels(m, i)
        m.num_groups = m.num_channels
    elif isinstance(m, nn.PReLU):
        F.prune_prelu_out_channels(m, i)
    else:
        F.prune_instancenorm_out_channels(m, i)


def _slice_tensor(model: nn.Module, where: str, dim: int, drop: list[int], update_count: bool) -> None:
    """Cut a per-channel parameter/buffer (layer scale, a fixed filter) along ``dim``."""
    kind, name = where.split(":", 1)
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    t = getattr(owner, attr)
    n = t.shape[dim]
    keep = torch.tensor([j for j in range(n) if j not in set(drop)], device=t.device)
    new = t.index_select(dim, keep)
    if kind == "param":
        setattr(owner, attr, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(owner, attr, new)
    if update_count:  # the module's own count of the filter's channels (its conv's groups)
        for a in ("channels", "num_channels", "groups"):
            if isinstance(getattr(owner, a, None), int) and getattr(owner, a) == n:
                setattr(owner, a, len(keep))


def _resize_splits(model: nn.Module, trace: LabelTrace, dropped: set[int]) -> None:
    """Split sizes and slice bounds a module stores (timm's ``torch.split(x, self.splits, 1)``,
    ``x.split(self.width)``, ``x[:, :self.in_channels]``): the attribute holding the old size (or a
    multiple of it by the number of pieces, the list of sizes, a slice bound) is set to the cut
    widths. Every rewrite is read from the uncut values first; an attribute two rules would set
    differently, or a size derived some other way, is left alone: the forward after the cut then
    fails or differs, and the network is refused (cut, extract), never written wrong."""
    todo: dict[tuple[int, str], list] = {}
    mods: dict[int, nn.Module] = {}
    for where, size, pieces, labels in trace.splits:
        classes, start, new = trace.classes(labels), 0, []
        for w in pieces:
            new.append(sum(c not in dropped for c in classes[start:start + w]))
            start += w
        if new == pieces or not isinstance(size, (int, list, tuple)) or size == len(pieces):
            continue  # nothing cut, or a number of chunks (chunk recomputes the pieces from the width)
        m = model.get_submodule(where) if where else model
        mods[id(m)] = m
        for attr, v in vars(m).items():
            if isinstance(v, bool) or attr.startswith("_"):
                continue
            if isinstance(size, tuple) and size[:1] == ("slice",):
                bounds = {size[1]: new[0], size[2]: new[0] + new[1]}
                if isinstance(v, int) and 0 < v < sum(pieces) and v in bounds:
                    todo.setdefault((id(m), attr), []).append(bounds[v])
            elif isinstance(v, (list, tuple)) and list(v) == list(pieces):
                todo.setdefault((id(m), attr), []).append(type(v)(new))
            elif isinstance(v, int) and isinstance(size, int) and len(set(new)) == 1:
                k = next((k for k in (1, len(pieces)) if v == size * k), None)
                if k is not None:
                    todo.setdefault((id(m), attr), []).append(new[0] * k)
    for (mid, attr), values in todo.items():
        if all(v == values[0] for v in values):
            setattr(mods[mid], attr, values[0])
