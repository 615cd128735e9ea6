"""Aligned widths without retraining (deploy/align.py, `slimkit export --align`).

The aligned network must compute the slim network's function (float64), its padded channels must be
exactly zero at every conv/linear input and output (checked by forward hooks against the slim
network's activations, not by reading which channels the code padded), its widths must be multiples
of N or the dense width, and the ONNX file must equal the unpadded slim network.
"""
from __future__ import annotations

import json
import math

import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import randomize_bn, rel_err

from slimkit import apply_plan, create_model, load, save
from slimkit.core.errors import SlimkitError
from slimkit.core.graph import ChannelGraph, is_grouped, prunable_layers
from slimkit.core.plan import kels_plan
from slimkit.deploy.align import align_network, choose_alignment, layer_widths
from slimkit.deploy.exporting import export_onnx

SMALL = (3, 32, 32)
# (arch, input shape, constructs it covers); torchvision nets at a small input, the slow ones marked
CASES = [
    pytest.param("cifar_resnet", None, id="cifar_resnet"),  # residual adds
    pytest.param("small_vgg", None, id="small_vgg"),  # flatten into a Linear
    pytest.param("mlp", None, id="mlp"),  # Linear layers only
    pytest.param("resnet18", SMALL, id="resnet18"),
    pytest.param("mobilenet_v2", SMALL, id="mobilenet_v2"),  # depthwise convs, ReLU6
    pytest.param("densenet121", SMALL, id="densenet121", marks=pytest.mark.slow),  # concatenations
    pytest.param("resnext50_32x4d", SMALL, id="resnext50_32x4d", marks=pytest.mark.slow),  # grouped convs
    pytest.param("efficientnet_b0", SMALL, id="efficientnet_b0", marks=pytest.mark.slow),  # SE gates, SiLU
]


def _nets(arch, shape, sr, seed=0):
    kw = {"input_shape": shape} if shape else {}
    dense = randomize_bn(create_model(arch, num_classes=10, **kw), seed=seed)
    shape = tuple(dense.slimkit_spec.input_shape)
    slim = apply_plan(dense, kels_plan(ChannelGraph(dense, shape), sr))
    return dense, slim, shape


def _io(model, x):
    """Every conv/linear layer's input and output, (B, C, -1) in float64, by layer name."""
    acts, hooks = {}, []
    for name, m in prunable_layers(model).items():
        def hook(mod, inp, out, name=name):
            acts[name] = [t.detach().reshape(t.shape[0], t.shape[1], -1) for t in (inp[0], out)]
        hooks.append(m.register_forward_hook(hook))
    with torch.inference_mode():
        y = model(x)
    for h in hooks:
        h.remove()
    return y, acts


def _zero_channels(t):
    return t.eq(0).all(dim=2).all(dim=0)  # (C,): channel j is exactly zero for every image and position


def _check_aligned(dense, slim, aligned, shape, multiple):
    """The aligned network equals the slim one, its extra channels are exactly zero, its widths aligned."""
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ys, acts_s = _io(slim.double(), x)
    ya, acts_a = _io(aligned.double(), x)
    torch.testing.assert_close(ya, ys, rtol=1e-10, atol=1e-10 * float(ys.abs().max()))
    padded = 0
    for name, (ins, outs) in acts_s.items():
        for s, a, where in ((ins, acts_a[name][0], "input"), (outs, acts_a[name][1], "output")):
            zs, za = _zero_channels(s), _zero_channels(a)
            extra = a.shape[1] - s.shape[1]
            padded += extra
            # the channels the aligned network adds are exactly zero, and the others are the slim ones in order
            assert int(za.sum()) - int(zs.sum()) == extra, f"{name} {where}: {extra} padded, zero count differs"
            torch.testing.assert_close(a[:, ~za], s[:, ~zs], rtol=1e-10, atol=1e-10 * max(float(s.abs().max()), 1))
    wd, ws, wa = layer_widths(dense), layer_widths(slim), layer_widths(aligned)
    grouped = {n for n, m in prunable_layers(dense).items() if is_grouped(m)}
    for n in wd:
        assert ws[n] <= wa[n] <= wd[n], (n, wd[n], ws[n], wa[n])
        if ws[n] == wd[n]:
            assert wa[n] == wd[n], f"{n} is not cut but was changed"
        else:
            assert wa[n] % multiple == 0 or wa[n] == wd[n], (n, wd[n], ws[n], wa[n])
            if not grouped:  # one segment per group: exactly the smallest aligned width
                assert wa[n] == min(wd[n], math.ceil(ws[n] / multiple) * multiple), (n, wd[n], ws[n], wa[n])
    n_params = [sum(p.numel() for p in m.parameters()) for m in (slim, aligned)]
    assert n_params[1] >= n_params[0]
    return padded


@pytest.mark.parametrize("sr", [0.5, 0.8])
@pytest.mark.parametrize("arch, shape", CASES)
def test_aligned_network_equals_slim_with_zero_padding(arch, shape, sr):
    dense, slim, shape = _nets(arch, shape, sr)
    padded = 0
    for multiple in (8, 16):
        aligned = align_network(slim, multiple)
        assert aligned.slimkit_align == multiple and aligned.slimkit_spec == slim.slimkit_spec
        padded += _check_aligned(dense, slim, aligned, shape, multiple)
    if sr == 0.8:
        assert padded > 0  # ceil(0.8 C) is unaligned somewhere: the check above saw real padding


def test_align_one_and_dense_are_unchanged_copies():
    dense, slim, _ = _nets("cifar_resnet", None, 0.8)
    for net in (slim, dense):
        same = align_network(net, 1 if net is slim else 16)
        assert same is not net and layer_widths(same) == layer_widths(net)
        for (k, a), (_, b) in zip(same.state_dict().items(), net.state_dict().items()):
            assert torch.equal(a, b), k  # a copy, not a computation


def test_twice_cut_network_aligns_and_round_trips_through_a_checkpoint(tmp_path):
    # two plans, the second in the first cut's index space: the aligned plan must compose them
    dense, slim, shape = _nets("cifar_resnet", None, 0.8)
    slimmer = apply_plan(slim, kels_plan(ChannelGraph(slim, shape), 0.7))
    aligned = align_network(slimmer, 8)
    _check_aligned(dense, slimmer, aligned, shape, 8)
    ck = save(aligned, tmp_path / "a.pt")
    back = load(ck)
    assert layer_widths(back) == layer_widths(aligned) and len(back.slimkit_plans) == 1
    x = torch.randn(2, *shape)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), slimmer.float()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, shape, multiple", [("cifar_resnet", None, 16),
                                                   pytest.param("mobilenet_v2", SMALL, 8, marks=pytest.mark.slow)])
def test_aligned_onnx_equals_torch_slim(tmp_path, arch, shape, multiple):
    _, slim, shape = _nets(arch, shape, 0.8, seed=3)
    ck = save(slim, tmp_path / "slim.pt")
    rep = export_onnx(ck, tmp_path / "a.onnx", align=multiple)
    assert rep.align["multiple"] == multiple and rep.align["padded_layers"] > 0
    assert any(w[1] < w[2] for w in rep.align["widths"].values())  # widths before/after reported
    proto = onnx.load(str(tmp_path / "a.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["slimkit.align"] == str(multiple) and props["slimkit.align_mode"] == "fixed"
    sess = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *shape)
    got = torch.from_numpy(sess.run(["logits"], {"input": x.numpy()})[0])
    with torch.inference_mode():
        assert rel_err(got, load(ck)(x)) <= 1e-4
    # the file holds the padded widths: its first conv has the aligned number of filters
    first = next(i for i in proto.graph.initializer if len(i.dims) == 4)
    assert first.dims[0] % multiple == 0


@pytest.mark.parametrize("value", ["0", "-8", "x", "1.5", "", "auto8", "8,16"])
def test_align_bad_values_are_refused_in_one_line_and_nothing_written(cli, tmp_path, value):
    ck = save(create_model("cifar_resnet", depth=8, width=8), tmp_path / "c.pt")
    r = cli("export", ck, "-o", tmp_path / "o.onnx", "--align", value)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "--align" in r.err and "positive integer" in r.err and "'auto'" in r.err and repr(value) in r.err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("value", [0, -1, 2.5, "x", None, True])
def test_align_bad_values_refused_by_the_library(tmp_path, value):
    _, slim, _ = _nets("mlp", None, 0.8)
    with pytest.raises(SlimkitError, match="positive integer"):
        align_network(slim, value)
    if value is not None:  # None means: do not align
        with pytest.raises(SlimkitError, match="positive integer"):
            export_onnx(slim, tmp_path / "o.onnx", align=value)
        assert not (tmp_path / "o.onnx").exists()


def test_choose_alignment_returns_a_timed_candidate():
    _, slim, shape = _nets("cifar_resnet", None, 0.8)
    best, rows = choose_alignment(slim, shape, batches=(1, 2), candidates=(1, 8, 16, 32), warmup=1, runs=3)
    assert best in (1, 8, 16, 32) and [r["align"] for r in rows] == [1, 8, 16, 32]
    assert all(set(r["p50_ms"]) == {"1", "2"} and r["score_ms"] > 0 for r in rows)
    # cifar_resnet's widths are 16/32/64: multiples of 16 and 32 reach the same (dense-capped) widths
    assert rows[3].get("same_as") == 16 and rows[3]["p50_ms"] == rows[2]["p50_ms"]


def _timed(scores: dict[int, float], spread: float = 0.01) -> list[dict]:
    return [{"align": a, "score_ms": v, "p50_ms": {"1": v, "8": v}, "p90_ms": {"1": v * (1 + spread), "8": v * (1 + spread)}}
            for a, v in scores.items()]


@pytest.mark.parametrize("scores, block, spread, kept", [
    ({1: 10.0, 8: 7.0, 16: 7.2, 32: 7.1}, 16, 0.01, 16),  # the block within 5% of the fastest: the block
    ({1: 10.0, 8: 7.0, 16: 7.6, 32: 7.1}, 16, 0.01, 8),   # 8.6% behind: the fastest
    ({1: 10.0, 8: 7.0, 16: 7.6, 32: 7.1}, 16, 0.10, 16),  # ...unless the timings themselves spread 10%
    ({1: 10.0, 8: 7.0, 16: 7.2, 32: 7.1}, None, 0.01, 8),  # no CPU block (a GPU provider): the fastest
    ({1: 10.0, 8: 7.3, 16: 7.0, 32: 7.1}, 8, 0.01, 8),    # AVX2's block 8 within 5% of 16
    ({1: 6.0, 8: 7.3, 16: 7.0}, 16, 0.01, 1),             # unpadded clearly fastest: no padding
])
def test_auto_keeps_the_cpus_block_when_it_is_within_noise_of_the_fastest(scores, block, spread, kept):
    from slimkit.deploy.align import pick_alignment

    got, why = pick_alignment(_timed(scores, spread), block)
    assert got == kept, why
    assert why.startswith(str(kept))


@pytest.mark.slow
def test_export_align_auto_records_its_choice(cli, tmp_path):
    _, slim, _ = _nets("cifar_resnet", None, 0.8)
    ck = save(slim, tmp_path / "slim.pt")
    r = cli("export", ck, "-o", tmp_path / "a.onnx", "--align", "auto", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "a.onnx")).metadata_props}
    assert props["slimkit.align_mode"] == "auto" and int(props["slimkit.align"]) == rep["align"]["multiple"]
    timings = json.loads(props["slimkit.align_timings"])
    assert [c["align"] for c in timings["candidates"]] == [1, 8, 16, 32]
    assert int(props["slimkit.align"]) in (1, 8, 16, 32)
