"""The zoo: every torchvision classifier and 59 timm models (40+ CNN families) either extract exactly or are refused.

Each cuttable model is traced, planned (KELS, split rate 0.5) and cut; the slim network equals the
dense network with everything outside the plan zeroed (eval mode, random BN statistics, <= 1e-5
relative), keeps about sr^2 = 1/4 of the parameters, and its ONNX export run in ONNX Runtime equals
torch. The whole `slimkit extract` verb (files in and out) runs on two of them. Every other model must be refused, before tracing, with its expected reason: the
refusal set is asserted, so a new refusal (or a model that starts to cut) fails this test.
Refused models are built on the meta device: the refusal needs no weights.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_bn, rel_err

from slimkit import SlimkitError, count_params, create_model, load
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import apply_masks, kels_count, kels_plan, plan_masks
from slimkit.core.surgery import cut

SPLIT = 0.5
SHAPE = (3, 32, 32)  # small inputs keep the zoo within the test budget
SHAPES = {"inception_v3": (3, 80, 80), "timm/inception_v3": (3, 80, 80), "timm/inception_v4": (3, 80, 80),
          "googlenet": (3, 64, 64), "timm/ghostnetv2_100": (3, 64, 64),
          # their adaptive pools (6x6, 7x7) export to ONNX only from a multiple of that size
          **{n: (3, 224, 224) for n in ("alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
                                        "vgg19_bn", "timm/vgg11")},
          "timm/vit_tiny_patch16_224": (3, 224, 224), "maxvit_t": (3, 224, 224)}  # a refused model is built on meta: its size costs nothing
# aux classifiers run only in training mode: they are not traced, so they would stay whole
ARGS = {"googlenet": {"aux_logits": False, "init_weights": False}, "inception_v3": {"aux_logits": False, "init_weights": False}}

ATTENTION = "attention"
LAYERNORM = "LayerNorm over channels"
# model -> what its one-line refusal must name (the construct); everything else must cut exactly
REFUSED = {
    **{n: LAYERNORM for n in ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")},
    **{n: ATTENTION for n in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "swin_t", "swin_s", "swin_b",
                              "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t")},
    "timm/convnext_atto": LAYERNORM,
    "timm/ecaresnet26t": "Conv1d",
    "timm/nf_resnet26": "weight standardisation",
    "timm/efficientvit_b0": ATTENTION,
    "timm/gcresnet33ts": ATTENTION,
    "timm/vit_tiny_patch16_224": ATTENTION,
}

TIMM_CUT = [
    "resnet18", "resnet50d", "seresnet18", "resnext26ts", "seresnext26d_32x4d", "regnetx_002", "regnety_002",
    "regnetz_b16", "efficientnet_b0", "efficientnetv2_rw_t", "tinynet_e", "mobilenetv1_100", "mobilenetv2_050",
    "mobilenetv3_small_050", "mobilenetv4_conv_small", "mnasnet_small", "semnasnet_050", "fbnetc_100", "fbnetv3_b",
    "spnasnet_100", "hardcorenas_a", "lcnet_050", "ghostnet_050", "ghostnetv2_100", "repghostnet_050", "mobileone_s0",
    "repvgg_a0", "gernet_s", "resnetv2_50", "densenet121", "vgg11", "dla34", "hrnet_w18_small", "inception_v3",
    "inception_v4", "legacy_xception", "xception41", "selecsls42b", "ese_vovnet19b_slim_dw", "hgnetv2_b0", "darknet17",
    # cut through channel labels (slimkit/core/channelmap.py): splits, shuffles, slices, fixed filters, layer scale
    "cspresnet50", "cspdarknet53", "cs3darknet_s", "mixnet_s", "res2net50_14w_8s", "skresnet18", "rexnet_100",
    "dpn48b", "resnest14d", "tresnet_m", "densenetblur121d", "fastvit_t8",
]
TIMM_REFUSED = [n[5:] for n in REFUSED if n.startswith("timm/")]
# cut through channel labels with some layers above ceil(sr*C): a shuffle ties positions across halves
# and blocks; ReXNet's partial residual cuts a layer into cells of odd width, each rounded up (README)
MORE_THAN_CEIL = {"shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "timm/rexnet_100"}
HUGE = {"regnet_y_128gf"}  # 644 M parameters: no ONNX export (a 600 MB file)
# over ~10 s each on a 2-core CPU: still run by `make test`, skipped by `make test-fast`
SLOW = {
    "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "densenet161",
    "densenet169", "densenet201", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_m", "efficientnet_v2_l", "regnet_x_8gf", "regnet_x_16gf", "regnet_x_32gf", "regnet_y_8gf",
    "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf", "resnet101", "resnet152", "resnext101_32x8d",
    "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2", "timm/vgg11", "timm/densenet121",
    "timm/res2net50_14w_8s", "timm/dpn48b", "timm/rexnet_100", "timm/tresnet_m", "timm/cspdarknet53",
    "timm/cspresnet50", "timm/densenetblur121d",
}


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _timm_names() -> list[str]:
    try:
        import timm  # noqa: F401
    except ImportError:  # `make venv` installs the timm extra; without it the timm half is skipped visibly
        return []
    return ["timm/" + n for n in TIMM_CUT + TIMM_REFUSED]


def _param(name: str):
    return pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [], id=name)


ZOO = _torchvision_names() + _timm_names()


def test_zoo_covers_torchvision_and_30_timm_families():
    assert not set(REFUSED) & {"timm/" + n for n in TIMM_CUT}
    assert len(_torchvision_names()) >= 80
    pytest.importorskip("timm")
    assert len(TIMM_CUT) + len(TIMM_REFUSED) >= 30
    assert set(REFUSED) <= set(ZOO)


@pytest.mark.parametrize("name", [_param(n) for n in ZOO])
def test_zoo_model(name, tmp_path):
    shape = SHAPES.get(name, SHAPE)
    args = {"num_classes": 10, **ARGS.get(name, {})}
    if name in REFUSED:
        with torch.device("meta"):  # no weights needed to refuse
            model = create_model(name, input_shape=shape, **args)
        with pytest.raises(SlimkitError) as info:
            ChannelGraph(model, shape)
        msg = str(info.value)
        assert REFUSED[name] in msg and msg.startswith("layer ") and "\n" not in msg, msg
        return

    dense = randomize_bn(create_model(name, input_shape=shape, **args), seed=3)
    graph = ChannelGraph(copy.deepcopy(dense), shape)  # traced once: plan, masks and cut read it
    plan = kels_plan(graph, SPLIT)
    masked = apply_masks(copy.deepcopy(dense), plan_masks(graph, plan))
    slim = cut(graph, plan)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        y_slim, y_masked, y_dense = slim(x), masked(x), dense(x)
    assert rel_err(y_slim, y_masked) <= 1e-5
    assert rel_err(y_dense, y_masked) > 1e-3  # the reset part mattered: the check can fail

    if graph.labelled:  # cut through channel labels: float64 as extract verifies, and the paper's widths
        with torch.inference_mode():
            y64 = copy.deepcopy(slim).double()(x.double())
            assert rel_err(y64, copy.deepcopy(masked).double()(x.double())) <= 1e-9
        layers = dict(dense.named_modules())
        for layer, kept in plan.keep.items():
            m = layers[layer]
            want = kels_count(m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features, SPLIT)
            assert len(kept) >= want if name in MORE_THAN_CEIL else len(kept) == want, (layer, len(kept), want)

    ratio = count_params(slim) / count_params(dense)
    assert 0.2 <= ratio <= 0.35, f"parameters kept {ratio:.3f}, expected about sr^2 = 0.25"
    if name not in HUGE:  # a 600 MB ONNX file would take minutes to write and check
        _check_onnx(slim, shape)


def test_zoo_extract_cli_end_to_end(cli, tmp_path):
    """The whole verb on a torchvision family beyond the core list and on a timm model: files in, files out."""
    for name in ("regnet_y_400mf", "timm/mobilenetv3_small_050"):
        if name.startswith("timm/"):
            pytest.importorskip("timm")
        dense = randomize_bn(create_model(name, num_classes=10, input_shape=SHAPE), seed=1)
        src = tmp_path / f"{name.replace('/', '_')}.pt"
        torch.save(dense.state_dict(), src)  # a plain state_dict, as a user would have it
        out = tmp_path / "slim.pt"
        r = cli("extract", src, "--arch", name, "--input-shape", "3,64,64", "--split-rate", "0.5", "-o", out, "--force")
        assert r.code == 0, r.err
        assert f"{name} (state_dict checkpoint" in r.out and "MACs @ 3x64x64" in r.out
        slim = load(out)
        assert slim.slimkit_spec.arch == name and slim.slimkit_spec.input_shape == (3, 64, 64)
        assert count_params(slim) < 0.35 * count_params(dense)


def test_zoo_refusal_on_the_cli_is_one_line(cli, tmp_path):
    pytest.importorskip("timm")
    name = "timm/convnext_atto"
    torch.save(create_model(name, num_classes=4).state_dict(), tmp_path / "s.pt")
    r = cli("extract", tmp_path / "s.pt", "--arch", name, "--split-rate", "0.5", "-o", tmp_path / "o.pt")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert "LayerNorm over channels" in r.err and r.err.startswith("slimkit extract: error: layer stem.1: ")
    assert not (tmp_path / "o.pt").exists()


def _check_onnx(slim: torch.nn.Module, shape) -> None:
    """ONNX Runtime runs the exported slim network; to_verified_onnx refuses it unless it equals torch."""
    from slimkit.deploy.export import to_verified_onnx

    onnx = to_verified_onnx(slim, shape)
    assert onnx.max_rel_diff <= 1e-4 and len(onnx.data) > 0
