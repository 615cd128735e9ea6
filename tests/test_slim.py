"""The scratch route's network (models/slimarch.py): the fit hypothesis's architecture, initialised
afresh the way its source initialises itself, from a seeded generator."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimkit import SlimkitError, count_params, create_model, load, save
from slimkit.core.graph import prunable_layers
from slimkit.models.checkpoint import from_module
from slimkit.models.hypothesis import fit_hypothesis
from slimkit.models.slimarch import slim_network

CASES = {  # id: (arch, constructor args, input shape or None)
    "cifar_resnet": ("cifar_resnet", {"depth": 8, "width": 8, "in_chans": 1, "image_size": 8, "num_classes": 7}, None),
    "small_vgg": ("small_vgg", {"num_classes": 5}, None),
    "mlp": ("mlp", {"hidden": (20, 12), "num_classes": 4}, None),
    "resnet18": ("resnet18", {"num_classes": 6}, (3, 32, 32)),  # a torchvision source
}


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in prunable_layers(model).items()}


@pytest.mark.parametrize("case, split_rate", [
    pytest.param(c, 0.5, marks=[pytest.mark.slow] if c == "resnet18" else [], id=f"{c}-0.5") for c in CASES
] + [("cifar_resnet", 0.3), ("small_vgg", 0.7)])
def test_widths_and_parameters_equal_the_extracted_fit_hypothesis(case, split_rate):
    arch, args, shape = CASES[case]
    args = dict(args)
    classes = args.pop("num_classes")
    dense = create_model(arch, input_shape=shape, num_classes=classes, **args)
    fh = fit_hypothesis(from_module(dense), split_rate)
    slim = slim_network(arch, split_rate, num_classes=classes, model_args=args, input_shape=shape,
                        generator=torch.Generator().manual_seed(3))
    assert _shapes(slim) == _shapes(fh.slim)
    assert count_params(slim) == count_params(fh.slim) < count_params(dense)
    assert slim.slimkit_spec == dense.slimkit_spec  # rebuilds from the source, like an extracted network
    assert [p.widths() for p in slim.slimkit_plans] == [fh.plan.widths()]


def _small(seed: int) -> nn.Module:
    return slim_network("cifar_resnet", 0.5, num_classes=7, model_args={"depth": 8, "width": 16, "image_size": 8},
                        generator=torch.Generator().manual_seed(seed))


def test_seeded_init_is_reproducible_differs_across_seeds_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = _small(1), _small(1), _small(2)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the same computation rerun: bit-equal
    convs = [k for k in sa if k.endswith("conv1.weight") or k == "fc.weight"]
    assert convs and all(not torch.equal(sa[k], sc[k]) for k in convs)


def test_init_follows_the_slim_layers_fan_as_the_source_would():
    # cifar_resnet initialises convs with kaiming_normal_(mode="fan_out", relu): std sqrt(2 / (C_out*9)).
    # At split 0.5, layer3's conv (64 -> 32 outputs) must be drawn for 32 outputs, not cut from a 64-output draw
    w = _small(0).layer3[0].conv2.weight.detach()  # (32, 32, 3, 3): 9216 draws, the sample std is within ~1 %
    assert w.shape == (32, 32, 3, 3)
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.05)
    # small_vgg keeps PyTorch's default init: conv/linear weights and biases within 1/sqrt(fan_in) of the
    # slim layer; the dense layer's bound (fan_in twice as large) is exceeded
    vgg = slim_network("small_vgg", 0.5, generator=torch.Generator().manual_seed(0))
    for layer, slim_fan, dense_fan in ((vgg.features[4], 16 * 9, 32 * 9), (vgg.classifier[3], 64, 128)):
        for t in (layer.weight.detach(), layer.bias.detach()):
            assert float(t.abs().max()) <= 1 / math.sqrt(slim_fan)
            assert float(t.abs().max()) > 1 / math.sqrt(dense_fan)


class _OwnInit(nn.Module):
    """A user's network initialising itself three ways: a fan-dependent torch.nn.init call, a bare draw with
    a std it computed itself, and a truncated-normal recipe written with in-place ops (timm's style)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.a = nn.Conv2d(1, 64, 3, padding=1, bias=False)
        self.b = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.fc = nn.Linear(64, num_classes)
        nn.init.kaiming_normal_(self.a.weight, mode="fan_out")
        self.b.weight.data.normal_(0, 0.5)
        w = self.fc.weight.data
        w.uniform_(-0.9, 0.9)
        w.erfinv_()
        w.mul_(0.01)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


def test_a_users_own_init_is_replayed_where_it_can_be_and_kept_where_it_cannot():
    slim = slim_network(f"{__name__}:_OwnInit", 0.5, input_shape=(1, 6, 6), generator=torch.Generator().manual_seed(0))
    a, b, fc = slim.a.weight.detach(), slim.b.weight.detach(), slim.fc.weight.detach()
    assert a.shape == (32, 1, 3, 3) and b.shape == (32, 32, 3, 3) and fc.shape == (3, 32)
    assert float(a.std()) == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.15)  # the slim fan_out
    assert float(b.std()) == pytest.approx(0.5, rel=0.05)  # the source's own number
    # erfinv of uniform(-0.9, 0.9) times 0.01 stays within 0.01 * erfinv(0.9) = 0.0116; replaying the
    # uniform draw alone would give values up to 0.9
    assert float(fc.abs().max()) < 0.012


def test_save_then_load_round_trips_it(tmp_path):
    slim = _small(4)
    path = save(slim, tmp_path / "scratch.pt", split={"mode": "kels", "rate": 0.5})
    back = load(path)
    sd, sb = slim.state_dict(), back.state_dict()
    assert sd.keys() == sb.keys() and all(torch.equal(sd[k], sb[k]) for k in sd)
    assert [p.to_json() for p in back.slimkit_plans] == [p.to_json() for p in slim.slimkit_plans]
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(x), slim(x))


@pytest.mark.parametrize("rate", [0, 1, 1.5, -0.2, float("nan"), "half"])
def test_a_split_rate_outside_0_1_is_refused_before_the_source_is_built(rate):
    with pytest.raises(SlimkitError, match=r"^split rate must be .*\(0, 1\)"):
        slim_network("no_such_model", rate)  # the rate is checked first: the unknown source is never looked up


def test_a_refused_construct_is_refused_with_its_reason():
    # torchvision's ConvNeXt normalises over channels (LayerNorm): no exact rule (core/constructs.py)
    with pytest.raises(SlimkitError, match=r"^layer features\.0\.1: LayerNorm over channels .*cannot cut this network exactly$"):
        slim_network("convnext_tiny", 0.5, num_classes=3, input_shape=(3, 32, 32))
