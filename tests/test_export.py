"""ONNX export: ONNX Runtime == PyTorch on every registry model, dense and slim; refusals."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import randomize_bn, rel_err

from slimkit import apply_plan, create_model, list_models, load, save
from slimkit.core.errors import SlimkitError
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import kels_plan
from slimkit.deploy.exporting import export_onnx


def _shape(name):
    if name.startswith("vgg"):
        # the ONNX exporter handles adaptive pooling only when the output (7x7) divides the input;
        # at 224x224 VGG's features end at exactly 7x7
        return (3, 224, 224)
    return (3, 64, 64) if name in list_models("torchvision") else create_model(name).slimkit_spec.input_shape


def _params(name):
    return pytest.param(name, marks=[pytest.mark.slow] if name in list_models("torchvision") else [], id=name)


@pytest.mark.parametrize("slim", [False, True], ids=["dense", "slim"])
@pytest.mark.parametrize("name", [_params(n) for n in list_models()])
def test_onnx_equals_torch(tmp_path, name, slim):
    model = randomize_bn(create_model(name, num_classes=6), seed=2)
    shape = _shape(name)
    if slim:
        model = apply_plan(model, kels_plan(ChannelGraph(model, shape), 0.5), input_shape=shape)
    ck = save(model, tmp_path / "m.pt")
    rep = export_onnx(ck, tmp_path / "m.onnx", input_shape=",".join(map(str, shape)))
    assert rep.max_rel_diff <= 1e-4
    # independent check at another batch size than the traced one (dynamic batch axis)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *shape)
    got = torch.from_numpy(sess.run(["logits"], {"input": x.numpy()})[0])
    with torch.inference_mode():
        assert rel_err(got, load(ck)(x)) <= 1e-4


def test_onnx_file_is_self_contained_named_and_tagged(tmp_path):
    ck = tmp_path / "d.pt"
    dense = create_model("cifar_resnet", depth=8, width=8)
    save(apply_plan(dense, kels_plan(ChannelGraph(dense, (3, 32, 32)), 0.5)), ck, split={"mode": "kels", "rate": 0.5})
    export_onnx(ck, tmp_path / "d.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "d.pt"]  # no external-data file
    proto = onnx.load(str(tmp_path / "d.onnx"))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["slimkit.arch"] == "cifar_resnet"
    assert json.loads(props["slimkit.split"]) == {"mode": "kels", "rate": 0.5}
    assert len(props["slimkit.source_sha256"]) == 64
    assert json.loads(props["slimkit.plans"])[0]["widths"]["conv1"] == 4


def test_fp16_keeps_float32_io_and_reports_its_error(tmp_path):
    ck = save(randomize_bn(create_model("cifar_resnet", depth=8, width=8)), tmp_path / "m.pt")
    rep = export_onnx(ck, tmp_path / "h.onnx", fp16=True)
    assert rep.precision == "fp16" and rep.io_dtype == "float32" and rep.tolerance == 1e-2  # the stated fp16 bound
    assert 0 < rep.max_rel_diff < 1e-2
    sess = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float)"
    out = sess.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0]
    assert out.dtype == np.float32
    rep = export_onnx(ck, tmp_path / "hh.onnx", fp16_io=True)
    assert rep.io_dtype == "float16"
    sess = ort.InferenceSession(str(tmp_path / "hh.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float16)"


def _overflowing_mlp():
    """An MLP whose logits are ~1e6: finite in fp32, beyond fp16's largest value (65504)."""
    model = create_model("mlp", num_classes=3, hidden=(16,), in_chans=1, image_size=4)
    with torch.no_grad():
        model.net[-1].weight.fill_(3e4)  # representable in fp16; the sum over 16 hidden units is not
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, half = model(x), model.half()(x.half())
    assert torch.isfinite(ref).all() and ref.abs().max() > 65504 and not torch.isfinite(half).all()
    return model.float()


def test_fp16_export_whose_output_overflows_is_refused_and_nothing_written(cli, tmp_path):
    ck = save(_overflowing_mlp(), tmp_path / "big.pt")
    r = cli("export", ck, "-o", tmp_path / "h.onnx", "--fp16")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "inf/NaN" in r.err and "fp16 overflows" in r.err and "nothing written" in r.err
    assert not (tmp_path / "h.onnx").exists()
    r = cli("export", ck, "-o", tmp_path / "f.onnx")  # the same network in fp32 verifies and is written
    assert r.code == 0 and (tmp_path / "f.onnx").exists(), r.err


def test_fp16_export_beyond_its_stated_bound_is_refused(tmp_path):
    # a BN whose variance is tiny amplifies fp16's rounding of its input far beyond FP16_RTOL
    from slimkit.deploy.export import FP16_RTOL, to_verified_onnx

    model = randomize_bn(create_model("cifar_resnet", depth=8, width=8), seed=1)
    with torch.no_grad():
        model.bn1.running_var.fill_(1e-7)
        model.bn1.eps = 1e-9
    with pytest.raises(SlimkitError, match=rf"relative .* > {FP16_RTOL:g}\); nothing written"):
        to_verified_onnx(model, (3, 32, 32), fp16=True)


def test_fp16_is_verified_on_the_gpu_provider_when_a_gpu_is_usable():
    from slimkit.deploy.export import verification_providers

    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert verification_providers(True, every, cuda=True)[0] == "CUDAExecutionProvider"
    # onnxruntime-gpu lists CUDA on a machine without a GPU: the listing alone is not enough
    assert verification_providers(True, every, cuda=False) == ["CPUExecutionProvider"]
    assert verification_providers(True, ["CPUExecutionProvider"], cuda=True) == ["CPUExecutionProvider"]
    assert verification_providers(False, every, cuda=True) == ["CPUExecutionProvider"]  # fp32: the reference


@pytest.fixture
def small_ckpt(tmp_path):
    return save(create_model("cifar_resnet", depth=8, width=8), tmp_path / "c.pt")


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--input-shape", "1,32,32"], "does not fit cifar_resnet"),
        (["--input-shape", "3,x,32"], "must be C,H,W integers"),
        (["--input-shape", "3,32"], "three positive integers C,H,W"),
        (["--opset", "99"], "opset must be between"),
    ],
)
def test_export_refusals(cli, small_ckpt, tmp_path, extra, expected):
    r = cli("export", small_ckpt, "-o", tmp_path / "o.onnx", *extra)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and expected in r.err, r.err
    assert not (tmp_path / "o.onnx").exists()


def test_export_not_a_model_and_existing_output(cli, small_ckpt, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    r = cli("export", tmp_path / "junk.pt", "-o", tmp_path / "o.onnx")
    assert r.code == 2 and "not" in r.err and not (tmp_path / "o.onnx").exists()
    (tmp_path / "o.onnx").write_bytes(b"mine")
    r = cli("export", small_ckpt, "-o", tmp_path / "o.onnx")
    assert r.code == 2 and "already exists" in r.err and (tmp_path / "o.onnx").read_bytes() == b"mine"
    r = cli("export", small_ckpt, "-o", tmp_path / "o.onnx", "--force")
    assert r.code == 0 and "verified in ONNX Runtime" in r.out


def test_export_never_overwrites_its_input(cli, small_ckpt, tmp_path):
    before = small_ckpt.read_bytes()
    r = cli("export", small_ckpt, "-o", small_ckpt, "--force")
    assert r.code == 2 and r.err.count("\n") == 1 and "is the input" in r.err, r.err
    assert small_ckpt.read_bytes() == before
