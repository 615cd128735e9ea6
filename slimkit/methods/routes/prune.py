"""Pruning to the KELS widths by an importance criterion: which channels survive, ranked by torch-pruning.

The "prune" route keeps, in every coupled group, as many channels as KELS keeps (so every layer has
exactly the fit hypothesis's width and the routes compare network for network), but chooses them by
an importance criterion instead of taking a prefix. The scores are torch-pruning's own estimators,
applied to torch-pruning's own group of each slimkit coupled group (``ChannelGraph.pruning_group``:
every producer's output channels, every BN and every consumer's input channels, in the root layer's
index space), reduced over the group and normalised as torch-pruning does by default
(``group_reduction="mean"``, ``normalizer="mean"``):

- ``l1`` / ``l2``: ``GroupMagnitudeImportance(p=1)`` / ``(p=2)``, the group's weight norms;
- ``taylor``: ``GroupTaylorImportance()``, |w * dL/dw| summed over the group (Molchanov et al., CVPR
  2019), with the gradients of the mean cross-entropy over a few labelled batches, accumulated with
  the network in eval mode (BN statistics are read, never updated);
- ``kels``: the KELS prefix itself (``core/plan.py kels_plan``).

The channels kept per group follow KELS's segments (``kels_segments``): the top ceil(sr*n) of every
segment of n channels (a concatenation's chunks, a split's shares, a grouped conv's blocks). Segments
of one length in a group keep the same relative positions, the ones whose importance summed over them
is highest, as KELS keeps the same prefix in each: torch-pruning's group can miss a tie between them
(GhostNet's concatenation of a conv's output with a depthwise conv of that output couples channel i
of both chunks, and the traced group lists only one), which a shared choice satisfies. For the same
reason the input blocks of a grouped conv keep the same positions across the groups a concatenation
feeds into it, so each grouped conv keeps its group count. Depthwise convs are members of their
producer's group and follow it. Ties keep the lower index (the KELS order). The cut is the one
surgery (``core/surgery.py``).
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.cost import device_of, example_input
from slimkit.core.errors import SlimkitError
from slimkit.core.graph import ChannelGraph, CoupledGroup, is_grouped
from slimkit.core.plan import (
    KeepPlan,
    apply_masks,
    check_split_rate,
    kels_count,
    kels_plan,
    kels_segments,
    plan_masks,
)
from slimkit.core.surgery import cut
from slimkit.models import spec_of

__all__ = ["CRITERIA", "importance_plan", "prune", "importance_of"]

CRITERIA = ("l1", "l2", "taylor", "kels")

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise SlimkitError(f"unknown pruning criterion {criterion!r}; available: {', '.join(CRITERIA)}")


def importance_of(criterion: str):
    """torch-pruning's importance estimator for ``criterion`` (l1, l2, taylor), with its default
    group reduction and normaliser."""
    import torch_pruning as tp  # heavy import kept out of `import slimkit`

    _check_criterion(criterion)
    if criterion == "kels":
        raise SlimkitError("the kels criterion is a prefix, not an importance score")
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if criterion == "l1" else 2)


def _taylor_gradients(model: nn.Module, data_batches: Batches | None) -> None:
    """Accumulate d(mean cross-entropy)/dw of every parameter over ``data_batches`` into ``.grad``."""
    if data_batches is None:
        raise SlimkitError("the taylor criterion needs labelled batches (data_batches / --data) to compute gradients")
    dev, n = device_of(model), 0
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(True)  # a frozen layer is scored too; it stays frozen (below)
        p.grad = None
    model.eval()  # gradients at the network as it is: BN uses (and keeps) its running statistics
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for x, y in data_batches:
                F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
                n += 1
    finally:
        for p in frozen:
            p.requires_grad_(False)
    if n == 0:
        raise SlimkitError("the taylor criterion needs at least one labelled batch; data_batches was empty")


def _kept(graph: ChannelGraph, scored: list[tuple[CoupledGroup, torch.Tensor]], sr: float) -> dict[int, set[int]]:
    """Root channels kept per group (by index in ``scored``): the most important ceil(sr*n) of every KELS
    segment of n channels. Segments that keep the same positions (a group's segments of one length; the
    input blocks of a grouped conv, across the groups a concatenation feeds into it) are ranked together,
    by their importance summed position by position."""
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    owner: dict[tuple, tuple[int, int]] = {}  # alignment key -> first segment seen with it
    lengths: dict[tuple[int, int], int] = {}
    for gi, (g, _) in enumerate(scored):
        for a, b in kels_segments(graph, g)[0]:
            node = parent[(gi, a)] = (gi, a)
            lengths[node] = b - a
            keys = [("segment", gi, b - a)]  # the group's segments of one length: see the module docstring
            for c in g.consumers:  # a grouped conv reading these channels: every input block keeps the same positions
                m = graph.layers[c.name]
                if is_grouped(m) and a in c.root:
                    keys.append(("in", c.name, c.local[c.root.index(a)] % (m.in_channels // m.groups), b - a))
            for key in keys:
                other = owner.setdefault(key, node)
                parent[find(node)] = find(other)
    classes: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for node in parent:
        classes.setdefault(find(node), []).append(node)
    scores = [torch.nan_to_num(s.detach().double().cpu(), nan=0.0) for _, s in scored]  # 0/0 normalisation: last
    kept: dict[int, set[int]] = {gi: set() for gi in range(len(scored))}
    for members in classes.values():
        length = lengths[members[0]]
        total = sum(scores[gi][a:a + length] for gi, a in members)  # (length,) summed over aligned segments
        order = sorted(range(length), key=lambda i: (-float(total[i]), i))  # ties: the KELS order
        top = order[:kels_count(length, sr)]
        for gi, a in members:
            kept[gi].update(a + i for i in top)
    return kept


def _plan(graph: ChannelGraph, sr: float, criterion: str, data_batches: Batches | None) -> KeepPlan:
    if criterion == "kels":
        return kels_plan(graph, sr)
    if criterion == "taylor":
        _taylor_gradients(graph.model, data_batches)
    imp = importance_of(criterion)
    scored = []
    for g in graph.groups:
        if g.is_output:
            continue  # the classifier keeps every class
        scores = imp(graph.pruning_group(g))  # (g.size,) in the root layer's index space
        if scores is None or scores.numel() != g.size:
            raise SlimkitError(f"layer {g.root}: torch-pruning's {criterion} importance gave no score for its "
                               f"{g.size} channels; slimkit cannot rank this group")
        scored.append((g, scores))
    keep: dict[str, set[int]] = {}
    for gi, kept in _kept(graph, scored, sr).items():
        for p in scored[gi][0].producers:  # a layer split across groups keeps its share of each
            keep.setdefault(p.name, set()).update(loc for loc, r in zip(p.local, p.root) if r in kept)
    return KeepPlan({n: tuple(sorted(k)) for n, k in keep.items()}, origin=f"{criterion} importance split_rate={sr:g}")


def _traced_copy(model: nn.Module, input_shape: tuple[int, ...] | None) -> ChannelGraph:
    shape = tuple(input_shape) if input_shape is not None else spec_of(model).input_shape
    return ChannelGraph(copy.deepcopy(model).eval(), shape)


def importance_plan(model: nn.Module, input_shape: tuple[int, ...] | None, split_rate: float, criterion: str,
                    data_batches: Batches | None = None) -> KeepPlan:
    """The KeepPlan keeping, in every coupled group, the KELS number of channels that ``criterion``
    ranks highest (module docstring). ``model`` is not modified (the scores are computed on a copy);
    ``input_shape`` None takes the model's ModelSpec. ``data_batches`` ((inputs, labels) pairs) are
    read by ``taylor`` only."""
    _check_criterion(criterion)
    sr = check_split_rate(split_rate)
    return _plan(_traced_copy(model, input_shape), sr, criterion, data_batches)


def prune(model: nn.Module, split_rate: float, criterion: str, data_batches: Batches | None = None,
          input_shape: tuple[int, ...] | None = None, seed: int = 0, verify_batch: int = 2) -> nn.Module:
    """A physically smaller copy of ``model`` keeping what :func:`importance_plan` keeps, cut by the one
    surgery (traced once) and verified, like ``extract``, against the dense network with the dropped
    channels zeroed (float64, ``verify_batch`` random inputs drawn with ``seed``); a cut that is not
    exact is refused. It carries the model's ModelSpec and plans, so it saves and loads like an
    extracted fit hypothesis. ``model`` is untouched; fine-tuning is the caller's."""
    from slimkit.models.hypothesis import VERIFY_RTOL, VERIFY_RTOL_FP32, verify_slim

    _check_criterion(criterion)
    sr = check_split_rate(split_rate)
    graph = _traced_copy(model, input_shape)
    plan = _plan(graph, sr, criterion, data_batches)
    for p in graph.model.parameters():
        p.grad = None  # the taylor scores' gradients are not part of the pruned network
    masked = apply_masks(copy.deepcopy(graph.model), plan_masks(graph, plan))
    hint = f"the {criterion} choice of channels cannot be cut exactly from this network; use the kels criterion"
    try:
        slim = cut(graph, plan).eval()
    except SlimkitError as exc:
        raise SlimkitError(f"{hint}: {exc}") from exc
    x = example_input(slim, graph.input_shape, verify_batch, torch.Generator().manual_seed(seed))
    max_abs, max_rel, dtype = verify_slim(masked, slim, x)
    if not max_rel <= (VERIFY_RTOL if dtype == "float64" else VERIFY_RTOL_FP32):  # also catches NaN
        raise SlimkitError(f"{hint}: the pruned and masked dense networks differ by {max_abs:.3e} in {dtype} "
                           f"(relative {max_rel:.1e})")
    return slim
