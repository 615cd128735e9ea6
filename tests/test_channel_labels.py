"""Exact rules for channel shuffles, splits joined by a concatenation, fixed per-channel filters and
layer scale (slimkit/core/channelmap.py), on small hand-built networks with hand-worked plans.

Each network is cut at split rate 0.5 and must equal the dense network with everything outside the
plan zeroed, in float64 (the bound `extract` uses); the real zoo models with these constructs are
checked in tests/test_zoo.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn, rel_err
from torch import nn

from slimkit import SlimkitError
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import KeepPlan, apply_masks, kels_plan, plan_masks
from slimkit.core.surgery import cut, plans_of

SHAPE = (3, 12, 12)


def _cbr(cin, cout, k=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


class Shuffle(nn.Module):
    """A stem and one ShuffleNetV2 unit: chunk in two, a conv on the second half, concatenate, shuffle."""

    def __init__(self):
        super().__init__()
        self.stem, self.br, self.head, self.fc = _cbr(3, 8, 3), _cbr(4, 4), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        x = torch.cat([a, self.br(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.head(x).mean((2, 3)))


class Split(nn.Module):
    """Mixed kernels on stored split sizes (MixNet), then a split by a stored width (Res2Net, CSP)."""

    def __init__(self):
        super().__init__()
        self.splits, self.width = [2, 6], 4
        self.stem, self.a, self.b = _cbr(3, 8), _cbr(2, 4, 3), _cbr(6, 4, 5)
        self.c, self.head, self.fc = _cbr(4, 4, 3), nn.Conv2d(8, 6, 1), nn.Linear(6, 5)

    def forward(self, x):
        p, q = torch.split(self.stem(x), self.splits, 1)
        x = torch.cat([self.a(p), self.b(q)], 1)
        p, q = x.split(self.width, dim=1)
        return self.fc(self.head(torch.cat([self.c(p), q], 1)).mean((2, 3)))


class Blur(nn.Module):
    """A fixed binomial filter per channel, as timm's BlurPool2d: F.conv2d with a buffer."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", ((k[:, None] * k[None]) / 16)[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=self.channels)


class BlurNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.blur, self.head, self.fc = _cbr(3, 8, 3), Blur(8), nn.Conv2d(8, 6, 1), nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.head(self.blur(self.stem(x))).mean((2, 3)))


class LayerScale(nn.Module):
    """A residual block whose branch is multiplied by a learned per-channel scale (ConvNeXt, FastViT)."""

    def __init__(self, computed=False):
        super().__init__()
        self.computed = computed
        self.stem, self.conv, self.head, self.fc = _cbr(3, 8, 3), _cbr(8, 8, 3), nn.Conv2d(8, 6, 1), nn.Linear(6, 5)
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, 8).view(8, 1, 1))

    def forward(self, x):
        x = self.stem(x)
        gamma = self.gamma.exp() if self.computed else self.gamma
        return self.fc(self.head(x + gamma * self.conv(x)).mean((2, 3)))


def _cut(model):
    """(plan, slim, masked) at split rate 0.5; the slim and masked networks in float64."""
    dense = randomize_bn(model, seed=2).eval()
    graph = ChannelGraph(copy.deepcopy(dense), SHAPE)
    plan = kels_plan(graph, 0.5)
    masked = apply_masks(copy.deepcopy(dense), plan_masks(graph, plan))
    slim = cut(graph, plan)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.inference_mode():
        ys, ym, yd = slim.double()(x), masked.double()(x), dense.double()(x)
    assert rel_err(ys, ym) <= 1e-9  # slim == masked dense
    assert rel_err(yd, ym) > 1e-3  # the cut mattered
    return plan, slim


def test_shuffle_keeps_the_same_positions_in_both_halves():
    # the shuffle interleaves the halves [stem[0:4] | br]: position i of each half must be kept or
    # dropped together, and chunk re-halves the cut width, so stem keeps the same positions in
    # both of its halves. Worked by hand: keep the first 2 of the 4 tied positions.
    plan, slim = _cut(Shuffle())
    assert dict(plan.keep) == {"stem.0": (0, 1, 4, 5), "br.0": (0, 1), "head": (0, 1, 2, 3)}
    assert slim.stem[0].out_channels == 4 and slim.br[0].in_channels == 2


def test_a_plain_prefix_is_refused_across_a_shuffle():
    graph = ChannelGraph(Shuffle(), SHAPE)
    with pytest.raises(SlimkitError, match="inconsistent across coupled layers"):
        cut(graph, KeepPlan({"stem.0": (0, 1, 2, 3), "br.0": (0, 1)}))


def test_split_pieces_keep_their_share_and_stored_sizes_follow():
    # pieces [2, 6] of stem keep 1 and 3 (ceil of half of each): 4 of 8 in all; the next split
    # by width 4 is over [a(4) | b(4)], each keeping 2
    plan, slim = _cut(Split())
    assert dict(plan.keep) == {"stem.0": (0, 2, 3, 4), "a.0": (0, 1), "b.0": (0, 1), "c.0": (0, 1), "head": (0, 1, 2)}
    assert slim.splits == [1, 3] and slim.width == 2


def test_fixed_filter_follows_the_cut():
    plan, slim = _cut(BlurNet())
    assert plan.keep["stem.0"] == (0, 1, 2, 3)
    assert slim.blur.filt.shape == (4, 1, 3, 3) and slim.blur.channels == 4


def test_layer_scale_is_cut_by_slicing():
    dense = LayerScale()
    plan, slim = _cut(dense)
    assert plan.keep["stem.0"] == plan.keep["conv.0"] == (0, 1, 2, 3)  # tied by the residual add
    torch.testing.assert_close(slim.gamma.detach(), dense.gamma.detach()[:4])  # both float64 now


def test_a_per_channel_constant_computed_in_the_forward_is_refused():
    with pytest.raises(SlimkitError) as info:
        ChannelGraph(LayerScale(computed=True), SHAPE)
    msg = str(info.value)
    assert msg.startswith("layer (model): a per-channel constant computed from gamma") and "\n" not in msg


class SizeFromText(Split):
    """A split size the forward computes from a string: no rule can rewrite it."""

    def __init__(self):
        super().__init__()
        self.spec = "4"

    def forward(self, x):
        p, q = torch.split(self.stem(x), [2, 6], 1)
        x = torch.cat([self.a(p), self.b(q)], 1)
        p, q = x.split(int(self.spec), dim=1)
        return self.fc(self.head(torch.cat([self.c(p), q], 1)).mean((2, 3)))


def test_a_split_size_the_cut_cannot_follow_is_refused_and_nothing_is_written(tmp_path):
    import slimkit

    model = slimkit.create_model("test_channel_labels:SizeFromText", input_shape=SHAPE)  # tests/ is on sys.path
    out = tmp_path / "o.pt"
    with pytest.raises(SlimkitError) as info:
        slimkit.extract(model, split_rate=0.5, out=out)
    msg = str(info.value)
    assert "after the cut the forward fails" in msg and "\n" not in msg and msg.startswith("layer ")
    assert not out.exists()


def test_merging_refuses_a_network_whose_coupling_needs_labels():
    from slimkit.core.widen import mergeable_graph

    with pytest.raises(SlimkitError) as info:
        mergeable_graph(Split(), SHAPE)
    assert str(info.value).startswith("layer (model): channel split, which merging cannot widen exactly")


def test_a_split_network_rebuilds_from_its_checkpoint(tmp_path):
    """A slim checkpoint is rebuilt by re-applying its plan to a fresh dense network: the stored split
    sizes must be rewritten again, and the weights must load into the rebuilt shapes."""
    import slimkit

    dense = randomize_bn(slimkit.create_model("test_channel_labels:Split", input_shape=SHAPE), seed=4)
    out = tmp_path / "split.slim.pt"
    slimkit.extract(dense, split_rate=0.5, out=out)
    slim = slimkit.load(out, arch="test_channel_labels:Split")  # an import path is named to be imported
    assert slim.splits == [1, 3] and slim.width == 2
    graph = ChannelGraph(copy.deepcopy(dense), SHAPE)
    masked = apply_masks(copy.deepcopy(dense), plan_masks(graph, plans_of(slim)[-1]))
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert rel_err(slim.eval()(x), masked.eval()(x)) <= 1e-5


def test_importance_ranking_refuses_a_network_whose_coupling_needs_labels():
    from slimkit.methods.routes.prune import importance_plan

    with pytest.raises(SlimkitError) as info:
        importance_plan(Shuffle(), SHAPE, 0.5, "l1")
    msg = str(info.value)
    assert msg.startswith("layer (model): channel split: torch-pruning's dependency graph does not follow it")
    assert "\n" not in msg
