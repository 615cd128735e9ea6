"""Channel coupling of a network, traced once with torch-pruning's DependencyGraph.

This module only *describes* a network: which conv/linear layers' output channels are tied
together (residual adds, concatenations, depthwise convs) and which input channels of which
consumers each output channel feeds (through BN, pooling, flatten, cat). Choosing channels
(plan.py) and cutting them (surgery.py) both read this description. Where torch-pruning's index
maps do not follow the network (a channel shuffle, a split joined back, a fixed filter, layer
scale), the same description is read from a channel-label trace instead (channelmap.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from torch import nn

from slimkit.core.errors import SlimkitError, one_line

__all__ = ["Member", "CoupledGroup", "ChannelGraph", "prunable_layers", "is_grouped"]

_PRUNABLE = (nn.Conv2d, nn.Linear)


@dataclasses.dataclass(frozen=True)
class Member:
    """One layer's share of a coupled group: ``local[i]`` of this layer is ``root[i]`` of the group."""

    name: str  # fully qualified module name
    local: tuple[int, ...]
    root: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class CoupledGroup:
    """Output channels that must be kept or dropped together, indexed in the root layer's space.

    ``producers`` are the conv/linear layers whose output channels are the group's channels (more
    than one across a residual add). ``consumers`` are the conv/linear layers whose *input*
    channels read them (several per channel after a flatten).
    """

    root: str
    size: int
    producers: tuple[Member, ...]
    consumers: tuple[Member, ...]
    pinned: bool = False  # some channel reaches the output or an operation whose channels are not followed

    @property
    def is_output(self) -> bool:
        """No layer reads these channels: they reach the network's output (the classifier's classes)."""
        return self.pinned or not self.consumers


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d / Linear layers by fully qualified name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _PRUNABLE)}


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_grouped(m: nn.Module) -> bool:
    """A grouped (not depthwise) conv: ``groups`` blocks of C_in/g inputs -> C_out/g outputs each."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m)


@contextlib.contextmanager
def _mapping_frozen():
    """Skip torch-pruning's index-mapping refresh while the network's shapes do not change."""
    from torch_pruning.dependency import index_mapping

    real = index_mapping.update_index_mapping
    index_mapping.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        index_mapping.update_index_mapping = real


@contextlib.contextmanager
def _all_requiring_grad(model: nn.Module):
    """Every parameter requires grad while tracing: autograd never records a frozen layer (a fine-tuned
    network's frozen backbone), so torch-pruning would leave it out of the graph, and uncut."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


class ChannelGraph:
    """The traced coupling of ``model``; valid until the model's shapes change (``refresh`` after)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        import torch_pruning as tp  # heavy import kept out of `import slimkit`

        self.model = model
        self.input_shape = tuple(input_shape)
        self.layers = prunable_layers(model)
        for name, m in self.layers.items():
            if is_grouped(m) and m.groups == m.out_channels:
                # torch-pruning would couple its inputs to its outputs one to one, which they are not
                raise SlimkitError(
                    f"layer {name}: grouped convolution with one output per group ({m.in_channels} -> "
                    f"{m.out_channels}, groups={m.groups}) cannot be cut exactly"
                )
        from slimkit.core.constructs import check_constructs

        # refuse what no rule covers before tracing; shuffles, splits, fixed filters and layer scale
        # are followed by channel labels (channelmap.py) instead of torch-pruning's index maps
        self.labelled = check_constructs(model, self.input_shape)
        self._names = {m: n for n, m in self.layers.items()}
        if not self.labelled:
            self._trace_dependencies(tp)
        if self.labelled:
            self._trace_labels()
        self.group_of = {p.name: g for g in self.groups for p in g.producers}

    def _trace_labels(self) -> None:
        from slimkit.core import channelmap

        try:
            self.trace = channelmap.trace_labels(self.model, self.input_shape)
        except SlimkitError:
            raise
        except Exception as exc:  # the user's forward failed at this input shape
            raise SlimkitError(
                f"cannot trace the network at input shape {list(self.input_shape)}: {one_line(exc)}"
            ) from exc
        self.groups = _label_groups(self.trace, self.layers)
        self.multipliers = self.trace.multipliers

    def _trace_dependencies(self, tp) -> None:
        model = self.model
        was_training = model.training
        model.eval()  # tracing runs a forward: never let it move BN running statistics
        try:  # torch-pruning traces through autograd, so it must run even under a caller's no_grad
            with torch.inference_mode(False), torch.enable_grad(), _all_requiring_grad(model):
                x = torch.zeros(1, *self.input_shape, device=_device_of(model))  # traced where the model lives
                self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
        except Exception as exc:  # tracing failures come from the user's model or input shape
            raise SlimkitError(
                f"cannot trace the network at input shape {list(self.input_shape)}: {one_line(exc)}"
            ) from exc
        finally:
            model.train(was_training)
        try:
            with _mapping_frozen():  # nothing changes shape while the groups are read
                self.groups = list(self._build_groups())
        except SlimkitError as exc:  # a slice joined back (ReXNet, DPN): torch-pruning's map is not exact
            if "channel split or slice" not in str(exc):
                raise
            self.labelled = {"channel slice joined back": str(exc).split(":")[0].removeprefix("layer ")}

    def _build_groups(self) -> Iterator[CoupledGroup]:
        dg, seen = self.dg, set()
        for name, m in self.layers.items():
            if name in seen or m not in dg.module2node:
                continue  # unused layers are not traced: they are left as they are
            pruner = dg.get_pruner_of_module(m)
            size = pruner.get_out_channels(m)
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(size)))
            producers: dict[str, set] = {}
            consumers: dict[str, set] = {}
            for item in group:
                dep, target = item.dep, item.dep.target.module
                tname = self._names.get(target)
                if tname is None:
                    continue  # BN, activations, pooling: they follow their channels
                pairs = zip((int(i) for i in item.idxs), (int(i) for i in item.root_idxs))
                if dg.is_out_channel_pruning_fn(dep.handler):
                    producers.setdefault(tname, set()).update(pairs)
                elif dg.is_in_channel_pruning_fn(dep.handler) and not _is_depthwise(target):
                    # a depthwise conv reads one channel per filter: it is a producer, not a consumer
                    consumers.setdefault(tname, set()).update(pairs)
            producers = {n: self._member(n, p, out=True) for n, p in producers.items()}
            consumers = {n: self._member(n, p, out=False) for n, p in consumers.items()}
            seen.update(producers)
            yield CoupledGroup(name, size, tuple(producers.values()), tuple(consumers.values()))

    def _member(self, name: str, pairs: set[tuple[int, int]], out: bool) -> Member:
        """One layer's (local, root) channel pairs, checked against its real width.

        torch-pruning maps channels through splits and slices; where it cannot (a split joined back
        by an add, a partial-channel residual), it reports channels a layer does not have, and a
        cut would be wrong: refuse, naming the layer.
        """
        m = self.layers[name]
        width = (m.out_channels if out else m.in_channels) if isinstance(m, nn.Conv2d) else \
            (m.out_features if out else m.in_features)
        pairs = sorted(pairs, key=lambda t: (t[1], t[0]))
        if any(loc >= width for loc, _ in pairs):
            raise SlimkitError(
                f"layer {name}: channel split or slice (torch.split/chunk, x[:, a:b]) joined back by an add or "
                f"concatenation: the traced coupling names channel {max(l for l, _ in pairs)} of its {width}; "
                "slimkit cannot cut this network exactly"
            )
        return Member(name, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))

    def pruning_group(self, group: CoupledGroup):
        """torch-pruning's own ``Group`` of every channel of ``group`` (what its importance estimators
        read: each item's layer, pruning function, local and root indices), read without pruning."""
        if self.labelled:
            construct, layer = next(iter(self.labelled.items()))
            raise SlimkitError(f"layer {layer}: {construct}: torch-pruning's dependency graph does not follow it, so "
                               "its importance estimators cannot score these channels; only the KELS prefix rule cuts "
                               "this network")
        root = self.layers[group.root]
        pruner = self.dg.get_pruner_of_module(root)
        with _mapping_frozen():  # nothing changes shape while it is read
            return self.dg.get_pruning_group(root, pruner.prune_out_channels, list(range(group.size)))

    def prune_groups(self, drops: list[tuple[CoupledGroup, list[int]]]) -> None:
        """Physically remove root channels of several groups at once.

        torch-pruning recomputes every concatenation's index mapping before each group (seconds on a
        DenseNet) because pruning one group shifts the offsets another sees. Here every group is read
        in the unpruned network's index space first, the channels each (layer, operation) loses are
        merged, and each layer is cut once: no offset can go stale, and the mapping is computed once.
        """
        if self.labelled:
            from slimkit.core import labelcut

            return labelcut.prune_labelled(self.model, self.trace, self.groups, drops)
        todo: dict[tuple[int, object], tuple[object, set[int]]] = {}
        with _mapping_frozen():
            for group, drop in drops:
                if not drop:
                    continue
                root = self.layers[group.root]
                pruner = self.dg.get_pruner_of_module(root)
                for item in self.dg.get_pruning_group(root, pruner.prune_out_channels, sorted(drop)):
                    dep = item.dep
                    key = (id(dep.target.module), getattr(dep.handler, "__func__", dep.handler))
                    todo.setdefault(key, (dep, set()))[1].update(getattr(i, "idx", i) for i in item.idxs)
        for dep, idxs in todo.values():
            if not isinstance(dep.target.module, nn.Module):
                raise SlimkitError(f"a bare parameter ({tuple(dep.target.module.shape)}) follows the cut channels; "
                                   "slimkit cannot cut this network exactly")
            dep(sorted(int(i) for i in idxs))

    def prune_group(self, group: CoupledGroup, drop_root: list[int]) -> None:
        """Physically remove root channels ``drop_root`` of ``group`` and everything coupled to them."""
        root = self.layers[group.root]
        pruner = self.dg.get_pruner_of_module(root)
        self.dg.get_pruning_group(root, pruner.prune_out_channels, sorted(drop_root)).prune()


# --- coupled groups from a channel-label trace (channelmap.py) -------------------------------------

def _label_groups(trace, layers: dict[str, nn.Module]) -> list[CoupledGroup]:
    """Coupled groups from a label trace (channelmap.LabelTrace): producers sharing a channel class are one
    group; a group's root index enumerates its classes by (first producer, that producer's channel)."""
    from slimkit.core.channelmap import PINNED

    order = {n: i for i, n in enumerate(layers)}
    prod = {n: trace.classes(trace.produced[n]) for n in sorted(trace.produced, key=order.get) if n in layers}
    read = {n: trace.classes(lab) for n, lab in trace.read.items() if n in layers}
    parent = {n: n for n in prod}

    def find(n):
        while parent[n] != n:
            parent[n] = n = parent[parent[n]]
        return n

    owner: dict[int, str] = {}
    for n, classes in prod.items():
        for c in classes:
            if c in owner:
                a, b = find(n), find(owner[c])
                if a != b:
                    parent[max(a, b, key=order.get)] = min(a, b, key=order.get)
            else:
                owner[c] = n
    marks = _split_marks(trace)
    comps: dict[str, list[str]] = {}
    for n in prod:
        comps.setdefault(find(n), []).append(n)
    groups = []
    for members in comps.values():
        roots: dict[int, int] = {}
        for n in members:
            for c in prod[n]:
                roots.setdefault(c, len(roots))
        producers = tuple(_member(n, prod[n], roots) for n in members)
        consumers = tuple(_member(n, cl, roots) for n, cl in read.items() if any(c in roots for c in cl))
        g = CoupledGroup(members[0], len(roots), producers, consumers, pinned=PINNED in roots)
        object.__setattr__(g, "classes", tuple(roots))  # root index -> class, for the cut
        object.__setattr__(g, "marks", {roots[c]: m for c, m in marks.items() if c in roots})  # split pieces
        groups.append(g)
    return groups


def _split_marks(trace) -> dict[int, tuple]:
    """For every channel class, the (split, piece) pairs it passes through."""
    marks: dict[int, list] = {}
    for k, (_, _, pieces, labels) in enumerate(trace.splits):
        classes = trace.classes(labels)
        start = 0
        for j, w in enumerate(pieces):
            for c in classes[start:start + w]:
                if c >= 0:
                    marks.setdefault(c, []).append((k, j))
            start += w
    return {c: tuple(sorted(set(m))) for c, m in marks.items()}


def _member(name: str, classes: list[int], roots: dict[int, int]) -> Member:
    pairs = sorted(((j, roots[c]) for j, c in enumerate(classes) if c in roots), key=lambda t: (t[1], t[0]))
    return Member(name, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
