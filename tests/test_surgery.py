"""The central invariant: surgery(model, plan) == dense model with everything outside the plan zeroed."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_bn, rel_err

from slimkit import SlimkitError, apply_plan, count_params, create_model, list_models
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import KeepPlan, apply_masks, kels_plan, plan_masks
from slimkit.core.surgery import cut

# torchvision nets are traced at 64x64 to keep CPU time down; channel coupling does not depend on
# the spatial size (their classifiers sit behind adaptive pooling)
SMALL_INPUT = {"torchvision": (3, 64, 64)}


def _model_and_shape(name: str):
    model = randomize_bn(create_model(name, num_classes=7), seed=1)
    family = "torchvision" if name in list_models("torchvision") else "small"
    return model, SMALL_INPUT.get(family, model.slimkit_spec.input_shape)


def _params(name):
    marks = [pytest.mark.slow] if name in list_models("torchvision") else []
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("split_rate", [0.5, 0.8])
@pytest.mark.parametrize("name", [_params(n) for n in list_models()])
def test_kels_extraction_equals_masked_dense(name, split_rate):
    torch.manual_seed(0)
    dense, shape = _model_and_shape(name)
    slim = copy.deepcopy(dense)
    graph = ChannelGraph(slim, shape)
    plan = kels_plan(graph, split_rate)
    masked = apply_masks(copy.deepcopy(dense), plan_masks(graph, plan))
    cut(graph, plan)

    x = torch.randn(3, *shape)
    with torch.inference_mode():
        ref, out, full = masked(x), slim(x), dense(x)
    assert out.shape == ref.shape == full.shape  # the classifier keeps every class
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-5
    # the reset hypothesis mattered: the dense network itself gives different outputs
    assert rel_err(full, ref) > 1e-3

    # physically smaller, about sr^2 of the parameters (first conv and classifier keep more)
    ratio = count_params(slim) / count_params(dense)
    assert split_rate**2 - 0.02 <= ratio <= split_rate**2 + 0.12, ratio
    # every planned layer has exactly ceil(sr*C) output channels now
    for layer, kept in plan.keep.items():
        m = dict(slim.named_modules())[layer]
        assert (m.out_channels if hasattr(m, "out_channels") else m.out_features) == len(kept)


def test_apply_plan_leaves_the_original_untouched():
    dense = randomize_bn(create_model("cifar_resnet", depth=8, width=8))
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    plan = kels_plan(ChannelGraph(copy.deepcopy(dense), dense.slimkit_spec.input_shape), 0.5)
    slim = apply_plan(dense, plan)
    assert count_params(slim) < count_params(dense)
    for k, v in dense.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_arbitrary_channels_not_just_the_first():
    """Surgery keeps the channels the plan names, wherever they are (merging/DEN plans are not prefixes)."""
    torch.manual_seed(3)
    dense = randomize_bn(create_model("resnet18", num_classes=4))
    shape = (3, 64, 64)
    graph = ChannelGraph(copy.deepcopy(dense), shape)
    g = torch.Generator().manual_seed(0)
    keep = {}
    for group in graph.groups:
        if group.is_output:
            continue
        chosen = sorted(torch.randperm(group.size, generator=g)[: group.size // 3 + 1].tolist())
        for p in group.producers:  # coupled layers get the same channels
            local = dict(zip(p.root, p.local))
            keep[p.name] = tuple(sorted(local[r] for r in chosen))
    plan = KeepPlan(keep)
    masked = apply_masks(copy.deepcopy(dense), plan_masks(graph, plan))
    slim = cut(graph, plan)
    x = torch.randn(2, *shape)
    with torch.inference_mode():
        assert rel_err(slim(x), masked(x)) <= 1e-5


def test_inconsistent_plan_across_residual_add_is_refused_naming_layers():
    dense = create_model("resnet18", num_classes=4)
    shape = (3, 64, 64)
    graph = ChannelGraph(copy.deepcopy(dense), shape)
    # layer1.0.conv2 and layer1.1.conv2 both write into the same residual stream
    plan = KeepPlan({"layer1.0.conv2": tuple(range(32)), "layer1.1.conv2": tuple(range(32, 64))})
    before = count_params(graph.model)
    with pytest.raises(SlimkitError) as err:
        cut(graph, plan)
    msg = str(err.value)
    assert "layer1.0.conv2" in msg and "layer1.1.conv2" in msg and "inconsistent" in msg
    assert count_params(graph.model) == before  # nothing was cut


@pytest.mark.parametrize(
    "keep, match",
    [
        ({"nope.conv": (0,)}, "does not exist"),
        ({"bn1": (0,)}, "not a Conv2d/Linear"),
        ({"conv1": (0, 99)}, "only 8 output channels"),
    ],
)
def test_bad_plans_are_refused(keep, match):
    dense = create_model("cifar_resnet", depth=8, width=8)
    with pytest.raises(SlimkitError, match=match):
        apply_plan(dense, KeepPlan(keep))


@pytest.mark.parametrize("keep, match", [((), "keeps no channel"), ((3, 1), "ascending"), ((1, 1), "distinct")])
def test_malformed_plans_are_refused(keep, match):
    with pytest.raises(SlimkitError, match=match):
        KeepPlan({"conv1": keep})


def _frozen(model: torch.nn.Module, names=("conv1", "bn1", "layer1")) -> torch.nn.Module:
    for name in names:  # a fine-tuned network's frozen backbone
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(False)
    return model


def test_frozen_layers_are_traced_and_cut_like_trainable_ones():
    # torch-pruning traces through autograd, which records no frozen layer: resnet18 with conv1, bn1
    # and layer1 frozen once gave a plan of 15 layers instead of 20 and left those layers uncut
    dense = randomize_bn(create_model("resnet18", num_classes=7, input_shape=(3, 32, 32)), seed=1)
    frozen = _frozen(copy.deepcopy(dense))
    plans, slims = [], []
    for model in (dense, frozen):
        graph = ChannelGraph(model, (3, 32, 32))
        plans.append(kels_plan(graph, 0.5))
        slims.append(apply_plan(model, plans[-1], (3, 32, 32)))
    assert len(plans[0].keep) == 20 and plans[1].keep == plans[0].keep
    assert slims[1].conv1.out_channels == 32 and slims[1].layer1[0].conv2.in_channels == 32
    a, b = slims[0].state_dict(), slims[1].state_dict()
    assert a.keys() == b.keys()
    for k in a:  # the same cut of the same weights
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    # the caller's model is left as it was, and the slim one keeps it: frozen stays frozen, trainable trainable
    want = [n for n, _ in frozen.named_parameters() if n.split(".")[0] in ("conv1", "bn1", "layer1")]
    for model in (frozen, slims[1]):
        assert [n for n, p in model.named_parameters() if not p.requires_grad] == want
