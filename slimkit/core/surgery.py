"""Plan -> physically smaller dense network.

The cutting is torch-pruning's: for each coupled group (graph.py) the channels the plan drops are
removed from every producer, every BN/consumer reading them, through residual adds, concatenations,
flattens and depthwise convs. Nothing here knows any architecture by name.
"""
from __future__ import annotations

import copy

from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import KeepPlan, grouped_keeps

__all__ = ["cut", "apply_plan", "plans_of"]


def plans_of(model: nn.Module) -> list[KeepPlan]:
    """The plans already applied to ``model``, oldest first (empty for a dense network)."""
    return list(getattr(model, "slimkit_plans", []))


def cut(graph: ChannelGraph, plan: KeepPlan) -> nn.Module:
    """Apply ``plan`` in place to ``graph.model`` and return it.

    Every group's verdict is computed before anything is cut, so an inconsistent plan leaves the
    model untouched.
    """
    model = graph.model
    plan.validate(model)
    verdicts = [(g, plan.dropped(g)) for g in graph.groups]
    untraced = sorted(set(plan.keep) - set(graph.group_of))
    if untraced:
        raise SlimkitError(f"plan names layer {untraced[0]}, which the forward pass never uses; it cannot be cut")
    grouped = grouped_keeps(graph, plan)  # refuses before anything is cut
    weights = {n: graph.layers[n].weight.detach().clone() for n in grouped}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    graph.prune_groups(verdicts)
    params = dict(model.named_parameters())
    for name in frozen:  # torch-pruning's new parameters require grad: a frozen layer stays frozen
        if name in params:
            params[name].requires_grad_(False)
    if graph.labelled:
        _check_forward(graph)
    # torch-pruning cuts a grouped conv's input channels as if it were dense; cut its weight here:
    # (C_out, C_in/g, kh, kw) -> kept outputs x the kept positions every group keeps
    for name, (out_idx, in_pos) in grouped.items():
        m = graph.layers[name]
        w = weights[name][out_idx][:, in_pos].contiguous()
        if tuple(m.weight.shape) != tuple(w.shape):
            raise SlimkitError(f"surgery could not cut grouped conv {name}: expected weight {list(w.shape)}, "
                               f"got {list(m.weight.shape)}")
        m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
    # torch-pruning worked in place; check every planned layer ended with exactly the planned width
    for name, idxs in plan.keep.items():
        m = graph.layers[name]
        width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        if width != len(idxs):
            raise SlimkitError(f"surgery could not cut layer {name} to {len(idxs)} channels (it has {width})")
    model.slimkit_plans = plans_of(model) + [plan]
    return model


def _check_forward(graph: ChannelGraph) -> None:
    """After a cut read from channel labels, the network must still run: a split size or slice bound
    computed in the forward in a way no rule rewrote fails here, as a refusal instead of a crash."""
    import torch

    from slimkit.core.errors import one_line

    model = graph.model
    construct, layer = next(iter(graph.labelled.items()))
    p = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *graph.input_shape, device=p.device if p is not None else "cpu"))
    except Exception as exc:  # the user's forward with sizes it computed before the cut
        raise SlimkitError(
            f"layer {layer}: {construct}: after the cut the forward fails ({one_line(exc)}): a size the network "
            "stores or computes does not follow the cut; slimkit cannot cut this network exactly") from exc
    finally:
        model.train(was_training)


def apply_plan(model: nn.Module, plan: KeepPlan, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A physically smaller copy of ``model`` keeping what ``plan`` keeps; ``model`` is untouched."""
    if input_shape is None:
        spec = getattr(model, "slimkit_spec", None)
        if spec is None:
            raise SlimkitError("apply_plan needs input_shape for a model without a slimkit ModelSpec")
        input_shape = spec.input_shape
    slim = copy.deepcopy(model).eval()
    return cut(ChannelGraph(slim, input_shape), plan)
