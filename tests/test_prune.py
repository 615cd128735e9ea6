"""The prune route (methods/routes/prune.py): channels ranked by torch-pruning's own importance, kept at
exactly the KELS widths, cut by the one surgery (slim == masked dense)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from conftest import randomize_bn
from torch import nn

from slimkit import SlimkitError, create_model
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import apply_masks, kels_plan, plan_masks
from slimkit.methods.routes.prune import importance_plan, prune


def _batches(shape, classes, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, *shape, generator=g), torch.randint(0, classes, (4,), generator=g)) for _ in range(n)]


def _net(name: str):
    if name == "small_vgg":
        m = create_model("small_vgg", num_classes=5, widths=(8, 12))
    elif name == "cifar_resnet":
        m = create_model("cifar_resnet", depth=8, width=8, in_chans=1, image_size=8, num_classes=5)
    elif name == "resnet18":
        m = create_model("resnet18", num_classes=5, input_shape=(3, 32, 32))
    else:
        m = create_model("mobilenet_v2", num_classes=5, width_mult=0.5, input_shape=(3, 32, 32))
    return randomize_bn(m, seed=2).eval()


def _torch_pruning_top(model, shape, criterion, batches, sr):
    """Per conv layer, the channels torch-pruning's importance ranks highest, computed here through its own
    API on its own DependencyGraph (no slimkit code): the top ceil(sr*C) of the group of that layer."""
    model = copy.deepcopy(model).eval()
    if criterion == "taylor":
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
    imp = {"l1": tp.importance.MagnitudeImportance(p=1), "l2": tp.importance.MagnitudeImportance(p=2),
           "taylor": tp.importance.TaylorImportance()}[criterion]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *shape))
    top = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            group = dg.get_pruning_group(m, tp.prune_conv_out_channels, idxs=list(range(m.out_channels)))
            scores = imp(group)
            top[name] = sorted(torch.topk(scores, math.ceil(sr * m.out_channels)).indices.tolist())
    return top


@pytest.mark.parametrize("name, criterion", [("small_vgg", "l1"), ("small_vgg", "l2"), ("small_vgg", "taylor"),
                                             ("cifar_resnet", "l1"), ("cifar_resnet", "taylor")])
def test_kept_channels_are_the_ones_torch_pruning_ranks_highest(name, criterion):
    model = _net(name)
    shape = model.slimkit_spec.input_shape
    batches = _batches(shape, 5)
    sr = 0.5
    plan = importance_plan(model, None, sr, criterion, data_batches=batches)
    expected = _torch_pruning_top(model, shape, criterion, batches, sr)
    assert {n: list(plan.keep[n]) for n in expected} == expected
    # not the KELS prefix: the criterion chose something else somewhere
    assert any(list(plan.keep[n]) != list(range(len(v))) for n, v in expected.items())


class _GroupedConcat(nn.Module):
    """A grouped conv reading a concatenation of two branches: its input blocks span two coupled groups."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.g = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        y = self.g(torch.cat([self.a(x), self.b(x)], 1))  # (B, 12, H, W)
        return self.head(y.mean((2, 3)))


class _Ghost(nn.Module):
    """GhostNet's module: a conv's output concatenated with a depthwise conv of itself, added to its input.
    Channel i of both chunks comes from the conv's channel i; torch-pruning's group lists only one tie."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.primary = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        p = self.primary(x)
        return self.head((torch.cat([p, self.cheap(p)], 1) + x).mean((2, 3)))


def _case(name, seed=0):
    if name in ("grouped_concat", "ghost"):
        torch.manual_seed(seed)
        m = randomize_bn(_GroupedConcat() if name == "grouped_concat" else _Ghost(), seed=seed).eval()
        return m, (3, 8, 8)
    m = _net(name)
    return m, m.slimkit_spec.input_shape


def _p(name, criterion, slow=False):
    return pytest.param(name, criterion, marks=[pytest.mark.slow] if slow else [], id=f"{name}-{criterion}")


@pytest.mark.parametrize("name, criterion", [
    _p("cifar_resnet", "l2"), _p("small_vgg", "taylor"), _p("grouped_concat", "l1"), _p("grouped_concat", "taylor"),
    _p("ghost", "l1"),
    _p("resnet18", "l1", slow=True), _p("mobilenet_v2", "taylor", slow=True),
])
def test_widths_equal_kels_and_the_cut_equals_the_masked_network(name, criterion):
    model, shape = _case(name)
    classes = 4 if name in ("grouped_concat", "ghost") else 5
    batches = _batches(shape, classes)
    sr = 0.5
    slim = prune(model, sr, criterion, data_batches=batches, input_shape=shape)
    plan = slim.slimkit_plans[-1]
    graph = ChannelGraph(copy.deepcopy(model), shape)
    assert plan.widths() == kels_plan(graph, sr).widths()
    assert plan.keep != kels_plan(graph, sr).keep  # a choice of its own, not the prefix
    masked = apply_masks(copy.deepcopy(model), plan_masks(graph, plan)).double()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y_ref, y = masked(x), copy.deepcopy(slim).double()(x)
    scale = float(y_ref.abs().max())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10 * scale)
    dense = dict(model.named_modules())
    for n, m in slim.named_modules():  # grouped convs keep their group count; depthwise stay depthwise
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == (m.in_channels if dense[n].groups == dense[n].in_channels else dense[n].groups)


@pytest.mark.parametrize("seed", range(4))
def test_ghost_modules_keep_the_same_positions_in_both_chunks(seed):
    # without the shared choice, half of these seeds pick different channels in the two chunks: a cut
    # torch-pruning cannot do (stem.0 would end with 2 channels)
    model, shape = _case("ghost", seed)
    slim = prune(model, 0.5, "l1", input_shape=shape)  # verified against the masked network inside
    keep = slim.slimkit_plans[-1].keep
    assert [c for c in keep["stem.0"] if c < 4] == list(keep["primary.0"]) == [c - 4 for c in keep["stem.0"] if c >= 4]


def test_the_source_is_left_untouched():
    model = _net("small_vgg")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, 0.5, "taylor", data_batches=_batches((1, 8, 8), 5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_frozen_layer_stays_frozen_and_nothing_keeps_a_gradient():
    model = _net("small_vgg")
    model.features[0].requires_grad_(False)
    slim = prune(model, 0.5, "taylor", data_batches=_batches((1, 8, 8), 5))
    assert [n for n, p in slim.named_parameters() if not p.requires_grad] == ["features.0.weight", "features.0.bias"]
    assert all(p.grad is None for p in slim.parameters())


def test_kels_criterion_is_the_kels_plan():
    model = _net("cifar_resnet")
    plan = importance_plan(model, None, 0.3, "kels")
    assert plan.keep == kels_plan(ChannelGraph(copy.deepcopy(model), (1, 8, 8)), 0.3).keep


@pytest.mark.parametrize("kwargs, match", [
    ({"criterion": "l3"}, r"^unknown pruning criterion 'l3'; available: l1, l2, taylor, kels$"),
    ({"criterion": "taylor"}, r"^the taylor criterion needs labelled batches"),
    ({"criterion": "taylor", "data_batches": []}, r"^the taylor criterion needs at least one labelled batch"),
    ({"criterion": "l1", "split_rate": 1.0}, r"^split rate must be in \(0, 1\) exclusive, got 1.0$"),
])
def test_bad_input_is_refused_in_one_line(kwargs, match):
    kwargs = {"split_rate": 0.5, **kwargs}
    with pytest.raises(SlimkitError, match=match) as e:
        prune(_net("small_vgg"), **kwargs)
    assert "\n" not in str(e.value)
