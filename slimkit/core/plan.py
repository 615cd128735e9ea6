"""What survives: KeepPlan, and the Knowledge Evolution split masks (KELS, WELS).

A :class:`KeepPlan` names, for conv/linear layers, which output channels (units) survive. It is the
one object every method emits (KELS here; merging, DEN and baselines later) and the one object
surgery consumes. Layers a plan does not name keep all their channels unless they are coupled to a
layer it names (a residual add, a depthwise conv), in which case they follow it.

Split masks are weight-shaped boolean tensors marking the *fit hypothesis* (Taha et al., CVPR 2021):
KELS keeps the first ceil(sr*C_out) filters x the first ceil(sr*C_in) kernels of every layer; WELS
keeps a random sr fraction of every weight tensor.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.graph import ChannelGraph, CoupledGroup, is_grouped, prunable_layers

__all__ = [
    "KeepPlan", "check_split_rate", "kels_count", "kels_plan", "kels_segments", "plan_masks", "wels_masks",
    "plan_from_masks", "apply_masks", "grouped_keeps", "segments",
]


@dataclasses.dataclass(frozen=True)
class KeepPlan:
    """Kept output channels per layer (fully qualified name -> ascending indices)."""

    keep: Mapping[str, tuple[int, ...]]
    origin: str = ""  # how the plan was made, e.g. "kels split_rate=0.5"

    def __post_init__(self):
        clean = {}
        for name, idxs in self.keep.items():
            idxs = tuple(int(i) for i in idxs)
            if not idxs:
                raise SlimkitError(f"plan keeps no channel of layer {name}; a layer must keep at least one")
            if list(idxs) != sorted(set(idxs)) or idxs[0] < 0:
                raise SlimkitError(f"plan for layer {name} must list distinct non-negative channels in ascending order")
            clean[name] = idxs
        object.__setattr__(self, "keep", clean)

    def widths(self) -> dict[str, int]:
        return {n: len(i) for n, i in self.keep.items()}

    def to_json(self) -> dict[str, Any]:
        return {"origin": self.origin, "keep": {n: list(i) for n, i in self.keep.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "KeepPlan":
        try:
            return cls(keep={str(n): tuple(i) for n, i in d["keep"].items()}, origin=str(d.get("origin", "")))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise SlimkitError(f"malformed KeepPlan: {exc}") from exc

    def validate(self, model: nn.Module) -> None:
        """Every named layer exists, is conv/linear, and every index is in range."""
        layers = prunable_layers(model)
        for name, idxs in self.keep.items():
            if name not in layers:
                kind = "is not a Conv2d/Linear layer" if name in dict(model.named_modules()) else "does not exist"
                raise SlimkitError(f"plan names layer {name!r}, which {kind} in this network")
            n = _out_channels(layers[name])
            if idxs[-1] >= n:
                raise SlimkitError(f"plan keeps channel {idxs[-1]} of layer {name}, which has only {n} output channels")

    def dropped(self, group: CoupledGroup) -> list[int]:
        """Root-space channels of ``group`` this plan drops; refuses if coupled layers disagree."""
        verdict: dict[int, tuple[bool, str, int]] = {}  # root idx -> (kept, layer, local idx)
        for p in group.producers:
            kept = self.keep.get(p.name)
            if kept is None:
                continue  # layers the plan does not name follow the layers they are coupled to
            kept = set(kept)
            for local, root in zip(p.local, p.root):
                k = local in kept
                prev = verdict.setdefault(root, (k, p.name, local))
                if prev[0] != k:
                    a, b = (prev[1], p.name) if prev[0] else (p.name, prev[1])
                    ia, ib = (prev[2], local) if prev[0] else (local, prev[2])
                    raise SlimkitError(
                        f"plan is inconsistent across coupled layers {a} and {b}: {a} keeps channel {ia} "
                        f"but {b} drops channel {ib}, and these channels are tied (residual add, concatenation "
                        "or depthwise conv); coupled layers must keep the same channels"
                    )
        drop = sorted(r for r, (k, _, _) in verdict.items() if not k)
        if drop and len(drop) == group.size:
            raise SlimkitError(f"plan drops every channel of layer {group.root}; keep at least one")
        return drop


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def check_split_rate(split_rate: Any) -> float:
    """A split rate is a real number strictly between 0 and 1."""
    try:
        sr = float(split_rate)
    except (TypeError, ValueError) as exc:
        raise SlimkitError(f"split rate must be a number in (0, 1), got {split_rate!r}") from exc
    if not (0.0 < sr < 1.0):  # also rejects NaN
        raise SlimkitError(f"split rate must be in (0, 1) exclusive, got {split_rate!r}")
    return sr


def kels_count(channels: int, split_rate: float, round_to: int = 1) -> int:
    """ceil(sr * C), immune to float noise such as 0.28 * 25 = 7.000000000000001.

    ``round_to`` > 1 rounds the count up to a multiple (capped at C): a hardware-aware split whose
    widths suit blocked conv kernels (see benchmarks/results/latency_cpu.md). It defines a different
    split from the paper's, so it must be the split the network was trained with.
    """
    k = max(1, math.ceil(round(split_rate * channels, 9)))
    if round_to > 1:
        k = min(channels, math.ceil(k / round_to) * round_to)
    return k


def kels_plan(graph: ChannelGraph, split_rate: float, round_to: int = 1) -> KeepPlan:
    """KELS fit hypothesis: the first ceil(sr*C) output channels of every layer.

    The classifier (channels nobody reads) keeps every class; the first conv keeps every input
    channel because nothing produces them; a Linear after a flatten and a depthwise conv follow
    the channels they read, and a concatenation is split per chunk, because the consumers' input
    masks are derived from the producers' plans through the traced graph.
    """
    sr = check_split_rate(split_rate)
    if not isinstance(round_to, int) or round_to < 1:
        raise SlimkitError(f"round_to must be a positive integer, got {round_to!r}")
    keep = {}
    for g in graph.groups:
        if g.is_output:
            continue
        kept = _kept_roots(graph, g, sr, round_to)
        for p in g.producers:  # a layer split across groups (MixNet's mixed convs) keeps its share of each
            keep.setdefault(p.name, set()).update(loc for loc, r in zip(p.local, p.root) if r in kept)
    keep = {n: tuple(sorted(k)) for n, k in keep.items()}
    origin = f"kels split_rate={sr:g}" + (f" round_to={round_to}" if round_to > 1 else "")
    return KeepPlan(keep, origin=origin)


def _kept_roots(graph: ChannelGraph, group: CoupledGroup, sr: float, round_to: int) -> set[int]:
    """Root channels KELS keeps in ``group``: the first ceil(sr*n) of every segment of n channels
    (see :func:`kels_segments`), or of every cell where the coupling was read by channel labels."""
    if getattr(graph, "labelled", None):
        return _kept_cells(graph, group, sr, round_to)
    segments, block = kels_segments(graph, group)
    kept = set()
    for a, b in segments:
        kept.update(range(a, a + kels_count(b - a, sr, round_to if block is None else 1)))
    return kept


def kels_segments(graph: ChannelGraph, group: CoupledGroup) -> tuple[list[tuple[int, int]], int | None]:
    """The root-space segments ``[a, b)`` of ``group`` that each keep ceil(sr*(b-a)) channels, and the
    block width of its grouped convs (None: no grouped conv).

    With one producer spanning the group there is one segment, the paper's rule ceil(sr*C). A group can
    tie a layer to only part of another's channels (a split or slice joined by an add or a
    concatenation: CSP, GhostNet, ReXNet, MixNet); then the root space is cut into segments at every
    member's boundaries, and a prefix of each segment is a prefix of every member's share, so all
    coupled layers agree. Grouped convs further split segments into blocks of their group width.
    Any rule that keeps as many channels of every segment (KELS: a prefix; an importance criterion:
    the top ones) gives every layer the KELS width.
    """
    cuts = {0, group.size}
    for mem in group.producers:  # consumers read whatever is kept: only producers constrain the choice
        prev = None
        for loc, r in sorted(set(zip(mem.local, mem.root)), key=lambda t: (t[1], t[0])):
            if prev is not None and r == prev[1]:
                continue
            if prev is None or r != prev[1] + 1 or loc != prev[0] + 1:
                cuts.add(r)  # a member's contiguous run of channels starts here
                if prev is not None:
                    cuts.add(prev[1] + 1)
            prev = (loc, r)
        if prev is not None:
            cuts.add(prev[1] + 1)
    block = _block(graph, group)
    if block is not None:
        cuts.update(range(0, group.size, block))
    bounds = sorted(c for c in cuts if 0 <= c <= group.size)
    return list(zip(bounds, bounds[1:])), block


def segments(graph: ChannelGraph, group: CoupledGroup) -> tuple[list[int], int | None]:
    """:func:`kels_segments` as sorted bounds ``[0, b1, ..., size]`` (what deploy/align.py reads)."""
    pairs, block = kels_segments(graph, group)
    return [0] + [b for _, b in pairs], block  # segments start at 0 and tile the root space


def _kept_cells(graph: ChannelGraph, group: CoupledGroup, sr: float, round_to: int) -> set[int]:
    """Root channels KELS keeps when the coupling permutes channels (a shuffle, a split joined back).

    Root channels are sorted into *cells* by the set of layers that produce them (and, for a grouped
    conv, the group they fall in); every cell keeps its first ceil(sr*n) in root order. A layer whose
    channels form one cell keeps the paper's ceil(sr*C); every coupled layer agrees, because the
    choice is made once per channel class.
    """
    cells: dict[tuple, list[int]] = {}
    sig: dict[int, list] = {}
    for members, out in ((group.producers, True), (group.consumers, False)):
        for mem in members:
            m = graph.layers[mem.name]
            grouped = is_grouped(m) and mem.name not in getattr(graph, "multipliers", ())
            per = (m.out_channels if out else m.in_channels) // m.groups if grouped else None
            if not out and per is None:
                continue  # a dense consumer reads whatever is kept
            for loc, r in zip(mem.local, mem.root):
                sig.setdefault(r, []).append((mem.name, out, loc // per if per else 0))
    marks = getattr(group, "marks", {})  # the pieces of splits a channel passes through
    for r in range(group.size):
        cells.setdefault((tuple(sorted(set(sig.get(r, [])))), marks.get(r, ())), []).append(r)
    grouped = any(is_grouped(graph.layers[m.name]) and m.name not in getattr(graph, "multipliers", ())
                  for m in group.producers + group.consumers)
    kept = set()
    for roots in cells.values():
        kept.update(roots[: kels_count(len(roots), sr, 1 if grouped else round_to)])
    return kept


def _block(graph: ChannelGraph, group: CoupledGroup) -> int | None:
    """Channels per block of ``group`` when grouped convs produce or read it (None: no grouped conv).

    A grouped conv with g groups splits its inputs (outputs) into g blocks of C/g; the KELS rule keeps
    the same prefix of every block, so every group of every such conv keeps the same channels and
    stays a group (the group count is kept). Blocks of different convs are reconciled by their gcd
    (a prefix of every finer block is the same set in every coarser one).
    """
    sizes = []
    for members, per in ((group.producers, lambda m: m.out_channels // m.groups),
                         (group.consumers, lambda m: m.in_channels // m.groups)):
        for mem in members:
            m = graph.layers[mem.name]
            if is_grouped(m):
                sizes.append(per(m))
                sizes += [abs(loc - r) for loc, r in zip(mem.local[:1], mem.root[:1]) if loc != r]  # offsets
    return math.gcd(*sizes) if sizes else None


def grouped_keeps(graph: ChannelGraph, plan: KeepPlan) -> dict[str, tuple[list[int], list[int]]]:
    """For every grouped conv: (kept output channels, kept input positions within a group).

    Refuses a plan under which some groups would keep more channels than others, which no grouped
    conv can represent (``groups`` blocks of equal width).
    """
    dropped_in: dict[str, set[int]] = {}
    dropped_out: dict[str, set[int]] = {}
    for g in graph.groups:
        drop = set(plan.dropped(g))
        for c in g.consumers:
            if is_grouped(graph.layers[c.name]):
                dropped_in.setdefault(c.name, set()).update(loc for loc, r in zip(c.local, c.root) if r in drop)
        for p in g.producers:
            if is_grouped(graph.layers[p.name]):
                dropped_out.setdefault(p.name, set()).update(loc for loc, r in zip(p.local, p.root) if r in drop)
    out = {}
    for name, m in graph.layers.items():
        if not is_grouped(m) or name in getattr(graph, "multipliers", ()):
            continue  # a conv with one input per group loses whole groups, like a depthwise one
        g, per_in, per_out = m.groups, m.in_channels // m.groups, m.out_channels // m.groups
        d_in, d_out = dropped_in.get(name, set()), dropped_out.get(name, set())
        pos = [sorted(i % per_in for i in range(j * per_in, (j + 1) * per_in) if i not in d_in) for j in range(g)]
        counts = [sum(1 for o in range(j * per_out, (j + 1) * per_out) if o not in d_out) for j in range(g)]
        if any(p != pos[0] for p in pos) or len(set(counts)) > 1:
            raise SlimkitError(
                f"layer {name}: grouped convolution (groups={g}): the plan keeps different channels in different "
                "groups; a grouped conv can only keep the same input channels and as many output channels in every group"
            )
        if not pos[0] or not counts[0]:
            raise SlimkitError(f"layer {name}: grouped convolution (groups={g}): the plan keeps no channel of a group")
        out[name] = ([o for o in range(m.out_channels) if o not in d_out], pos[0])
    return out


def plan_masks(graph: ChannelGraph, plan: KeepPlan) -> dict[str, torch.Tensor]:
    """Weight-shaped boolean masks of what ``plan`` keeps (for KELS: the fit hypothesis), on the weights' device.

    A weight survives when its output channel is kept and the channel it reads is kept by its
    producer. Applying these masks to the dense network gives the network surgery must equal.
    """
    plan.validate(graph.model)
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in graph.layers.items()}
    for g in graph.groups:
        drop = set(plan.dropped(g))
        if not drop:
            continue
        for p in g.producers:
            masks[p.name].index_fill_(0, _index([loc for loc, r in zip(p.local, p.root) if r in drop]), False)
        for c in g.consumers:
            dropped = [loc for loc, r in zip(c.local, c.root) if r in drop]
            m = graph.layers[c.name]
            if is_grouped(m):  # weight (C_out, C_in/g, ...): output o reads inputs of its own group only
                per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
                for i in dropped:
                    j = i // per_in
                    masks[c.name][j * per_out:(j + 1) * per_out, i % per_in] = False
            else:
                masks[c.name].index_fill_(1, _index(dropped), False)
    return masks


def _index(idxs: list[int]) -> torch.Tensor:
    # a tensor index: torch inspects a long Python list element by element (milliseconds each)
    return torch.tensor(idxs, dtype=torch.long)


def wels_masks(model: nn.Module, split_rate: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """WELS fit hypothesis: exactly round(sr*|W|) randomly chosen weights of every conv/linear layer."""
    sr = check_split_rate(split_rate)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, m in prunable_layers(model).items():
        n = m.weight.numel()
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=gen)[: round(sr * n)]] = True  # drawn on the CPU: one draw on every device
        masks[name] = flat.view_as(m.weight).to(m.weight.device)
    return masks


def plan_from_masks(graph: ChannelGraph, masks: Mapping[str, torch.Tensor], origin: str = "masks") -> KeepPlan:
    """Recover the KeepPlan behind kernel-level structured masks (e.g. an official KE checkpoint's).

    Refuses masks that are not exactly what a channel plan would produce (a WELS mask has no slim
    network: its fit hypothesis is scattered weights, not whole channels).
    """
    unknown = sorted(set(masks) - set(graph.layers))
    if unknown:
        raise SlimkitError(f"split mask given for {unknown[0]!r}, which is not a Conv2d/Linear layer of this network")
    keep = {}
    for name, mask in masks.items():
        w = graph.layers[name].weight
        if tuple(mask.shape) != tuple(w.shape):
            raise SlimkitError(f"split mask of layer {name} has shape {list(mask.shape)}, its weight {list(w.shape)}")
        rows = mask.reshape(mask.shape[0], -1).ne(0).any(dim=1)
        if not rows.all():
            keep[name] = tuple(torch.nonzero(rows).flatten().tolist())
    plan = KeepPlan(keep, origin=origin)
    expected = plan_masks(graph, plan)
    for name, exp in expected.items():
        got = masks[name].ne(0) if name in masks else torch.ones_like(exp)
        if not torch.equal(got, exp):
            raise SlimkitError(
                f"the split mask of layer {name} is not kernel-level structured (KELS): it keeps "
                f"{int(got.sum())} of {got.numel()} weights where whole filters/kernels would keep {int(exp.sum())}. "
                "A WELS (random weight) split has no slim network; only KELS splits can be extracted"
            )
    return plan


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero, in place, every conv/linear weight outside ``masks`` (the reset hypothesis).

    Masks may live on any device (evolve builds them once on the CPU): each follows its weight.
    """
    layers = prunable_layers(model)
    for name, mask in masks.items():
        w = layers[name].weight
        w.mul_(mask.to(device=w.device, dtype=w.dtype))
    return model
