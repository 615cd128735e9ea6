"""Dynamically Expandable Networks (Yoon et al., ICLR 2018): the steps, on a :class:`DENNet`.

Each step is a function of the network and one task's data, so each is tested on its own:

- :func:`select_units`: from the units task t's (sparse) head reads, breadth-first down through
  non-zero weights: the subnetwork S that selective retraining may change;
- :func:`grow`: k new units per hidden layer, timestamped t;
- :func:`remove_units`: physically remove units through a KeepPlan and the one surgery;
- :func:`drift` and :func:`split_units`: units whose incoming weights moved more than sigma are
  duplicated; the old copy gets its task-(t-1) weights back, the copy keeps the new ones;
- :func:`train_task` (:mod:`slimkit.methods.den.fit`, re-exported here): SGD on chosen weight entries only
  (gradient masks) with the penalties the steps use: L1 and group lasso as proximal steps (so they
  reach exact zeros), L2, and L2 to reference weights.

Old units always keep their row index: new units are appended, and removal only ever drops
units added in the current task, so a snapshot of task t-1 compares by slicing.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.plan import KeepPlan
from slimkit.methods.den.fit import CLIP, Penalties, task_loss, train_task  # noqa: F401 (re-exported: DEN's steps in one place)
from slimkit.models import ModelSpec
from slimkit.models.den_net import DENNet

__all__ = ["refresh_spec", "add_head", "select_units", "grow", "remove_units", "snapshot", "drift",
           "split_units", "task_network", "new_unit_masks", "selected_masks", "train_task", "Penalties", "dead_units",
           "widths"]


def _out(layer: nn.Module) -> int:
    return layer.weight.shape[0]


def _in(layer: nn.Module) -> int:
    return layer.weight.shape[1]


def _blank_like(layer: nn.Module, n_in: int, n_out: int) -> nn.Module:
    """A layer of ``layer``'s kind (Linear, or Conv2d with the same geometry) with new widths, on its device."""
    where = dict(device=layer.weight.device, dtype=layer.weight.dtype)
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(n_in, n_out, layer.kernel_size, layer.stride, layer.padding, bias=True, **where)
    return nn.Linear(n_in, n_out, **where)


def _conn(w: torch.Tensor) -> torch.Tensor:
    """(units, inputs) connectivity of a Linear or Conv2d weight: any non-zero in the kernel."""
    return w.reshape(w.shape[0], w.shape[1], -1).ne(0).any(2)


def _to_weight(mask2d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return mask2d.reshape(*mask2d.shape, *([1] * (w.dim() - 2))).expand_as(w).clone()


def widths(net: DENNet) -> list[int]:
    return [_out(layer) for layer in net.hidden]


def refresh_spec(net: DENNet) -> DENNet:
    """Record the current widths and heads in the network's ModelSpec (so checkpoints rebuild it)."""
    old = net.slimkit_spec
    args = {**old.args, "heads": tuple(h.out_features for h in net.heads)}
    ws = widths(net)
    if "channels" in old.args:  # den_conv: conv channels, then linear units
        nc = len(old.args["channels"])
        args.update(channels=tuple(ws[:nc]), hidden=tuple(ws[nc:]))
    else:
        args["hidden"] = tuple(ws)
    net.slimkit_spec = ModelSpec(old.arch, args, old.input_shape)
    net.slimkit_plans = []
    return net


def add_head(net: DENNet, n_out: int, generator: torch.Generator | None = None) -> int:
    """A new output head for the next task; returns its task number (1-based)."""
    last = net.hidden[-1].weight
    head = nn.Linear(_out(net.hidden[-1]), n_out, device=last.device, dtype=last.dtype)
    if generator is not None:
        _default_init(head, generator)
    net.heads.append(head)
    refresh_spec(net)
    return len(net.heads)


def _default_init(layer: nn.Module, generator: torch.Generator, rows: slice | None = None) -> None:
    """PyTorch's default Linear/Conv2d init (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))), seeded."""
    with torch.no_grad():  # drawn on the CPU (the generator's device): the same draw on every device
        w = torch.empty(layer.weight.shape, dtype=layer.weight.dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
        fan_in = w[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        b = torch.empty(layer.bias.shape, dtype=layer.bias.dtype).uniform_(-bound, bound, generator=generator)
        w, b = w.to(layer.weight.device), b.to(layer.bias.device)
        if rows is None:
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        else:
            layer.weight[rows] = w[rows]
            layer.bias[rows] = b[rows]


# --- selection ---------------------------------------------------------------------------------

@torch.no_grad()
def select_units(net: DENNet, task: int) -> list[list[int]]:
    """Units per hidden layer reachable from head ``task`` through non-zero weights (breadth-first)."""
    n = len(net.hidden)
    selected: list[list[int]] = [[] for _ in range(n)]
    frontier = torch.nonzero(net.heads[task - 1].weight.ne(0).any(0)).flatten()
    for layer in range(n - 1, -1, -1):
        selected[layer] = sorted(frontier.tolist())
        if layer == 0:
            break
        conn = _conn(net.hidden[layer].weight)  # rows: units of `layer`, columns: units of `layer - 1`
        frontier = torch.nonzero(conn[frontier].any(0)).flatten() if len(frontier) else frontier
    return selected


def selected_masks(net: DENNet, selected: list[list[int]], task: int) -> dict[str, torch.Tensor | None]:
    """Gradient masks of W_S: rows of selected units x columns of the selected units below (all inputs
    for the first layer), their biases, and the whole head ``task``."""
    masks: dict[str, torch.Tensor | None] = {}
    for i, layer in enumerate(net.hidden):
        dev = layer.weight.device
        rows = torch.zeros(_out(layer), dtype=torch.bool, device=dev)
        rows[selected[i]] = True
        cols = torch.ones(_in(layer), dtype=torch.bool, device=dev)
        if i > 0:
            cols = torch.zeros(_in(layer), dtype=torch.bool, device=dev)
            cols[selected[i - 1]] = True
        masks[f"hidden.{i}.weight"] = _to_weight(rows[:, None] & cols[None, :], layer.weight)
        masks[f"hidden.{i}.bias"] = rows
    masks[f"heads.{task - 1}.weight"] = None
    masks[f"heads.{task - 1}.bias"] = None
    return masks


def new_unit_masks(net: DENNet, task: int) -> dict[str, torch.Tensor | None]:
    """Gradient masks of the units stamped ``task``: their incoming rows and biases, the columns that
    read them in the next layer, and the whole head ``task``. Nothing an earlier task uses changes."""
    masks: dict[str, torch.Tensor | None] = {}
    stamps = net.stamps()
    for i, layer in enumerate(net.hidden):
        rows = stamps[i] == task
        m = rows[:, None].expand(-1, _in(layer)).clone()
        if i > 0:
            m |= (stamps[i - 1] == task)[None, :]
        masks[f"hidden.{i}.weight"] = _to_weight(m, layer.weight)
        masks[f"hidden.{i}.bias"] = rows.clone()
    masks[f"heads.{task - 1}.weight"] = None
    masks[f"heads.{task - 1}.bias"] = None
    return masks


# --- growth and removal ---------------------------------------------------------------------------

@torch.no_grad()
def _widen_layer(layer: nn.Module, add_out: int, add_in: int) -> nn.Module:
    new = _blank_like(layer, _in(layer) + add_in, _out(layer) + add_out)
    new.weight.zero_()
    new.bias.zero_()
    new.weight[: _out(layer), : _in(layer)] = layer.weight
    new.bias[: _out(layer)] = layer.bias
    return new


@torch.no_grad()
def grow(net: DENNet, k: int, task: int, generator: torch.Generator) -> list[list[int]]:
    """Add ``k`` units to every hidden layer, stamped ``task``; returns their indices per layer.

    New incoming rows get PyTorch's default init; the columns reading new units start at zero
    except in head ``task`` and in the new units of the next layer, which start like the rows."""
    if k < 1:
        raise SlimkitError(f"k (units added per layer) must be a positive integer, got {k!r}")
    added = []
    for i in range(len(net.hidden)):
        old = net.hidden[i]
        add_in = k if i > 0 else 0
        new = _widen_layer(old, k, add_in)
        fresh = _blank_like(new, _in(new), _out(new))
        _default_init(fresh, generator)
        new.weight[_out(old):] = fresh.weight[_out(old):]
        new.bias[_out(old):] = fresh.bias[_out(old):]
        net.hidden[i] = new
        stamp = getattr(net, f"stamp{i}")
        setattr(net, f"stamp{i}", torch.cat([stamp, torch.full((k,), task, dtype=torch.long, device=stamp.device)]))
        added.append(list(range(_out(old), _out(new))))
    for j, head in enumerate(net.heads):
        new = _widen_layer(head, 0, k)
        if j == task - 1:
            fresh = _blank_like(new, new.in_features, new.out_features)
            _default_init(fresh, generator)
            new.weight[:, head.in_features:] = fresh.weight[:, head.in_features:]
        net.heads[j] = new
    refresh_spec(net)
    return added


@torch.no_grad()
def dead_units(net: DENNet, task: int) -> list[list[int]]:
    """Units stamped ``task`` whose incoming weights are all exactly zero (group lasso removed them)."""
    out = []
    for i, layer in enumerate(net.hidden):
        mine = net.stamps()[i] == task
        zero = layer.weight.flatten(1).ne(0).sum(1) == 0
        out.append(torch.nonzero(mine & zero).flatten().tolist())
    return out


def remove_units(net: DENNet, drop: list[list[int]]) -> DENNet:
    """Physically remove units (per hidden layer) with a KeepPlan and the one surgery; in place.

    Refuses to empty a layer. Timestamps follow their units."""
    from slimkit.core.graph import ChannelGraph
    from slimkit.core.surgery import cut

    keep = {}
    for i, layer in enumerate(net.hidden):
        gone = set(drop[i])
        if not gone:
            continue
        kept = tuple(j for j in range(_out(layer)) if j not in gone)
        if not kept:
            raise SlimkitError(f"removing {len(gone)} units would empty hidden layer {i}")
        keep[f"hidden.{i}"] = kept
    if not keep:
        return net
    stamps = {name: getattr(net, f"stamp{name.split('.')[1]}") for name in keep}
    cut(ChannelGraph(net, net.slimkit_spec.input_shape), KeepPlan(keep, origin="den: units with zero group norm"))
    for name, kept in keep.items():
        i = int(name.split(".")[1])
        setattr(net, f"stamp{i}", stamps[name][list(kept)].clone())
    return refresh_spec(net)


def task_network(net: DENNet, task: int) -> DENNet:
    """The physical network of task ``task``: the units stamped <= task, cut out with a KeepPlan and the
    one surgery, and head ``task`` alone. ``task_network(net, t)(x)`` equals ``net(x, t)``."""
    import copy

    if not 1 <= task <= len(net.heads):
        raise SlimkitError(f"task {task} does not exist; the network has tasks 1..{len(net.heads)}")
    sub = copy.deepcopy(net)
    keep = sub.units(task)
    remove_units(sub, [[j for j in range(_out(layer)) if j not in set(k.tolist())]
                       for layer, k in zip(sub.hidden, keep)])
    sub.heads = nn.ModuleList([sub.heads[task - 1]])
    for s in sub.stamps():
        s.fill_(1)  # a one-task network: every unit belongs to its only task
    return refresh_spec(sub)


# --- drift and split --------------------------------------------------------------------------------

def snapshot(net: DENNet) -> dict[str, torch.Tensor]:
    """The hidden layers' weights and biases now (W^{t-1} before task t)."""
    return {k: v.detach().clone() for k, v in net.state_dict().items() if k.startswith("hidden.")}


@torch.no_grad()
def drift(net: DENNet, snap: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per hidden layer, rho_i = ||w_i^t - w_i^{t-1}||_2 of each unit that existed in ``snap``
    (incoming weights from the units that existed then, and the bias)."""
    out = []
    for i, layer in enumerate(net.hidden):
        w0, b0 = snap[f"hidden.{i}.weight"], snap[f"hidden.{i}.bias"]
        n, m = w0.shape[:2]
        dw = (layer.weight[:n, :m] - w0).flatten(1)
        db = layer.bias[:n] - b0
        out.append(torch.sqrt((dw ** 2).sum(1) + db ** 2))
    return out


@torch.no_grad()
def split_units(net: DENNet, snap: Mapping[str, torch.Tensor], sigma: float, task: int) -> list[list[int]]:
    """Duplicate every old unit whose drift exceeds ``sigma``.

    The copy (stamped ``task``) takes the unit's current incoming weights and its outgoing columns;
    the original gets its task-(t-1) weights back exactly (connections from units stamped ``task``
    reset to zero), so earlier tasks see it as they left it. Returns the duplicated units per layer."""
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise SlimkitError(f"sigma (split threshold) must be a non-negative number, got {sigma!r}")
    rho = drift(net, snap)
    dup = [torch.nonzero(r > sigma).flatten().tolist() for r in rho]
    for i, units in enumerate(dup):
        if not units:
            continue
        layer = net.hidden[i]
        w0, b0 = snap[f"hidden.{i}.weight"], snap[f"hidden.{i}.bias"]
        n_add = len(units)
        new = _widen_layer(layer, n_add, 0)
        new.weight[_out(layer):] = layer.weight[units]
        new.bias[_out(layer):] = layer.bias[units]
        restored = torch.zeros_like(layer.weight[units])
        restored[:, : w0.shape[1]] = w0[units]
        new.weight[units] = restored
        new.bias[units] = b0[units]
        net.hidden[i] = new
        stamp = getattr(net, f"stamp{i}")
        setattr(net, f"stamp{i}", torch.cat([stamp, torch.full((n_add,), task, dtype=torch.long, device=stamp.device)]))
        # the layer above reads the copies through the same weights it used for the originals
        if i + 1 < len(net.hidden):
            nxt = net.hidden[i + 1]
            wide = _widen_layer(nxt, 0, n_add)
            wide.weight[:, _in(nxt):] = nxt.weight[:, units]
            net.hidden[i + 1] = wide
        else:
            for j, head in enumerate(net.heads):
                wide = _widen_layer(head, 0, n_add)
                if j == task - 1:
                    wide.weight[:, head.in_features:] = head.weight[:, units]
                net.heads[j] = wide
    refresh_spec(net)
    return dup
