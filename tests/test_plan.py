"""Split masks: KELS matches the paper's rule written independently; WELS is exact and seeded."""
from __future__ import annotations

import pytest
import torch
from conftest import ke_kels_masks

from slimkit import SlimkitError, create_model
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import (
    KeepPlan,
    check_split_rate,
    kels_count,
    kels_plan,
    plan_from_masks,
    plan_masks,
    wels_masks,
)


@pytest.mark.parametrize("split_rate", [0.5, 0.8, 0.3])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_kels_masks_match_knowledge_evolution_rule(arch, split_rate):
    model = create_model(arch, num_classes=10)
    graph = ChannelGraph(model, (3, 64, 64))
    masks = plan_masks(graph, kels_plan(graph, split_rate))
    expected = ke_kels_masks(model.state_dict(), split_rate)
    assert set(masks) == set(expected)
    for name, m in masks.items():
        assert torch.equal(m, expected[name].bool()), name


def test_kels_linear_after_flatten_follows_the_channels_it_reads():
    model = create_model("small_vgg", widths=(4, 6), image_size=8, hidden=5, num_classes=3)
    graph = ChannelGraph(model, (1, 8, 8))
    masks = plan_masks(graph, kels_plan(graph, 0.5))
    # the first conv reads the image: its one input channel is kept, 2 of its 4 filters
    assert masks["features.0"][:2].all() and not masks["features.0"][2:].any()
    # the Linear after the flatten reads 6 channels x 2 x 2 positions, channel-major: the first
    # 3 channels are its first 12 inputs; it keeps 3 of 5 units
    fc = masks["classifier.1"]
    assert fc[:3, :12].all() and not fc[:3, 12:].any() and not fc[3:].any()
    # the classifier keeps all 3 classes and reads the 3 kept hidden units
    assert masks["classifier.3"][:, :3].all() and not masks["classifier.3"][:, 3:].any()


def test_kels_depthwise_and_concat():
    """mobilenet_v2's depthwise convs follow their channels; densenet splits each concatenated chunk."""
    mb = create_model("mobilenet_v2", num_classes=5)
    g = ChannelGraph(mb, (3, 64, 64))
    plan = kels_plan(g, 0.5)
    dw = "features.2.conv.1.0"  # depthwise 3x3 over 96 channels
    assert mb.get_submodule(dw).groups == 96
    assert plan.keep[dw] == tuple(range(48))
    masks = plan_masks(g, plan)
    assert masks[dw][:48].all() and not masks[dw][48:].any()

    dn = create_model("densenet121", num_classes=5)
    g = ChannelGraph(dn, (3, 64, 64))
    masks = plan_masks(g, kels_plan(g, 0.5))
    # denseblock1.denselayer3.conv1 reads cat(conv0 stem: 64, layer1: 32, layer2: 32)
    m = masks["features.denseblock1.denselayer3.conv1"]
    kept_in = m[0, :, 0, 0]
    expected = torch.zeros(128, dtype=torch.bool)
    for lo, hi in ((0, 32), (64, 80), (96, 112)):  # first half of every chunk
        expected[lo:hi] = True
    assert torch.equal(kept_in, expected)


def test_wels_exact_count_and_seeded():
    model = create_model("cifar_resnet", depth=8, width=8)
    a, b, c = wels_masks(model, 0.3, seed=1), wels_masks(model, 0.3, seed=1), wels_masks(model, 0.3, seed=2)
    for name, m in a.items():
        assert int(m.sum()) == round(0.3 * m.numel())
        assert torch.equal(m, b[name])
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_wels_masks_have_no_slim_network():
    model = create_model("cifar_resnet", depth=8, width=8)
    graph = ChannelGraph(model, model.slimkit_spec.input_shape)
    with pytest.raises(SlimkitError, match="WELS"):
        plan_from_masks(graph, wels_masks(model, 0.5))


def test_plan_from_kels_masks_roundtrip():
    model = create_model("resnet18", num_classes=10)
    graph = ChannelGraph(model, (3, 64, 64))
    plan = kels_plan(graph, 0.5)
    assert plan_from_masks(graph, plan_masks(graph, plan)).keep == plan.keep


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan"), float("inf"), "abc", None])
def test_split_rate_must_be_in_open_unit_interval(bad):
    with pytest.raises(SlimkitError, match="split rate"):
        check_split_rate(bad)


def test_kels_count_ignores_float_noise():
    assert 0.28 * 25 > 7  # float noise a plain ceil would turn into 8
    assert kels_count(25, 0.28) == 7 and kels_count(25, 0.29) == 8 and kels_count(3, 0.5) == 2


def test_keep_plan_json_roundtrip():
    plan = KeepPlan({"a.conv": (0, 2, 5), "fc": (1,)}, origin="test")
    assert KeepPlan.from_json(plan.to_json()) == plan
    with pytest.raises(SlimkitError, match="malformed"):
        KeepPlan.from_json({"nokeep": 1})


def test_kels_round_to_gives_aligned_widths():
    assert kels_count(128, 0.8, round_to=8) == 104 and kels_count(64, 0.8, round_to=8) == 56
    assert kels_count(10, 0.8, round_to=16) == 10  # never more than the layer has
    model = create_model("resnet18", num_classes=10)
    graph = ChannelGraph(model, (3, 64, 64))
    plan = kels_plan(graph, 0.8, round_to=8)
    assert all(len(k) % 8 == 0 for k in plan.keep.values())
    assert "round_to=8" in plan.origin
    with pytest.raises(SlimkitError, match="round_to"):
        kels_plan(graph, 0.8, round_to=0)
