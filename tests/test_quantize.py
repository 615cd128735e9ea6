"""`slimkit export --int8`: ONNX Runtime's static QDQ quantization, calibrated, checked by accuracy; refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_bn

from slimkit import create_model, load, save
from slimkit.data.digits import digits
from slimkit.deploy.quantize import choose_int8_settings
from slimkit.engine.evaluate import accuracy

KE = Path(__file__).resolve().parents[1] / "models" / "digits_resnet20_ke.pt"


def image_folder(root: Path, classes: int, per_class: int, size: int = 20, split: str = "train") -> Path:
    """An ImageFolder split of random RGB images (PNG), seeded."""
    from PIL import Image

    g = torch.Generator().manual_seed(classes * 100 + per_class)
    for c in range(classes):
        d = root / split / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()).save(d / f"{i}.png")
    return root


def ill_calibration(path: Path, shape=(1, 16, 16)) -> Path:
    """16 inputs 100x smaller than real digits: activation ranges far too narrow, INT8 saturates."""
    np.save(path, (np.random.default_rng(0).standard_normal((16, *shape)) * 0.01).astype(np.float32))
    return path


def onnx_accuracy(path: Path, dataset) -> float:
    """Top-1 of an ONNX file in ONNX Runtime, computed here (not by slimkit)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, y = dataset.tensors
    pred = sess.run(None, {"input": x.numpy()})[0].argmax(1)
    return float((torch.from_numpy(pred) == y).float().mean())


@pytest.fixture(scope="module")
def cifar_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    net = randomize_bn(create_model("cifar_resnet", depth=8, width=8, num_classes=2, image_size=16))
    return save(net, tmp / "cifar.pt"), image_folder(tmp / "calib", classes=2, per_class=10)


@pytest.mark.parametrize("machine, flags, activations, reduce_range", [
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "uint8", False),  # VNNI: no VPMADDUBSW saturation
    ("x86_64", {"avx2", "amx_int8"}, "uint8", False),
    ("x86_64", {"avx2", "avx_vnni"}, "uint8", False),
    ("x86_64", {"avx2", "avx512f"}, "uint8", True),  # AVX-512 without VNNI: ORT's guide says reduce_range
    ("x86_64", set(), "uint8", True),
    ("aarch64", {"asimddp"}, "int8", False),  # not x86: ORT's default S8S8
])
def test_int8_settings_follow_onnx_runtimes_guide(machine, flags, activations, reduce_range):
    s = choose_int8_settings(machine, flags)
    assert (s.activations, s.weights, s.per_channel, s.reduce_range, s.format) == (
        activations, "int8", True, reduce_range, "QDQ")
    assert s.why


@pytest.mark.slow
def test_int8_export_from_an_image_folder(cli, cifar_ckpt, tmp_path):
    import onnx
    import onnxruntime as ort

    ck, calib = cifar_ckpt
    out = tmp_path / "m.int8.onnx"
    r = cli("export", ck, "-o", out, "--int8", "--calib", calib, "--calib-size", "16", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["precision"] == "int8" and rep["bytes"] == out.stat().st_size
    cal, check = rep["int8"]["calibration"], rep["int8"]["check"]
    assert (cal["images"], cal["split"], cal["source"]) == (16, "train", str(calib))  # 16 of its 20 train images
    assert check["int8_accuracy"] is None and 0 <= check["agreement"] <= 1
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    props = {p.key: p.value for p in proto.metadata_props}
    settings = json.loads(props["slimkit.int8"])
    assert props["slimkit.precision"] == "int8" and settings == rep["int8"]["settings"]
    assert settings["activations"] in ("uint8", "int8") and settings["per_channel"] and settings["why"]
    assert json.loads(props["slimkit.int8_calibration"])["images"] == 16
    # weights are stored as int8: most stored numbers are int8 (biases int32, scales float)
    sizes = {}
    for t in proto.graph.initializer:
        sizes[t.data_type] = sizes.get(t.data_type, 0) + int(np.prod(t.dims))
    assert sizes[onnx.TensorProto.INT8] > 0.9 * sum(sizes.values())
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)})[0]
    assert y.shape == (3, 2) and np.isfinite(y).all()
    from slimkit.deploy.exporting import ExportReport

    assert "accuracy was not checked (no --data)" in ExportReport(**rep).summary()
    # bench runs it on the CPU provider, and refuses a GPU provider its U8 activations were not made for
    assert cli("bench", out, "--batch", "1", "--runs", "1", "--warmup", "1").code == 0
    r = cli("bench", out, "--provider", "tensorrt", "--batch", "1")
    assert r.code == 2 and "m.int8.onnx: INT8 for provider tensorrt is not supported" in r.err


@pytest.mark.slow
def test_int8_export_of_the_trained_digits_network_keeps_its_accuracy(cli, tmp_path):
    """Calibrated on the digits training split, checked on the test split it never saw."""
    out = tmp_path / "ke.int8.onnx"
    r = cli("export", KE, "-o", out, "--int8", "--calib", "digits", "--calib-size", "64", "--data", "digits",
            "--max-drop", "1", "--json")
    assert r.code == 0, r.err
    check = json.loads(r.out)["int8"]["check"]
    test = digits("test", image_size=16)
    fp32 = accuracy(load(KE), test)  # torch, independent of ONNX Runtime
    int8 = onnx_accuracy(out, test)
    assert int8 == pytest.approx(check["int8_accuracy"])
    assert fp32 - int8 <= 0.01  # within 1 point of the trained network's own accuracy
    assert check["n"] == len(test) and check["fp32_accuracy"] == pytest.approx(fp32, abs=1 / len(test))


def _refused(r, out: Path, *words: str) -> None:
    assert r.code == 2, (r.code, r.err)
    assert len(r.err.strip().splitlines()) == 1, r.err
    for w in words:
        assert w in r.err, r.err
    assert not out.exists() and not list(out.parent.glob(out.name + "*"))


def test_int8_refusals(cli, cifar_ckpt, tmp_path):
    ck, calib = cifar_ckpt
    out = tmp_path / "x.onnx"

    def export(*extra):
        return cli("export", ck, "-o", out, *extra)

    _refused(export("--int8"), out, "--int8 needs --calib")
    _refused(export("--int8", "--calib", calib, "--calib-size", "8"), out, "--calib-size", "at least 16")
    _refused(export("--int8", "--calib", calib, "--provider", "tensorrt"), out, "provider tensorrt", "--provider cpu")
    _refused(export("--int8", "--calib", calib, "--provider", "torch"), out, "provider torch cannot run an INT8 file")
    _refused(export("--int8", "--calib", calib, "--fp16"), out, "--int8 and --fp16")
    _refused(export("--calib", calib), out, "go with --int8")
    # calibration images that do not fit the network
    np.save(tmp_path / "small.npy", np.zeros((20, 3, 8, 8), np.float32))
    _refused(export("--int8", "--calib", tmp_path / "small.npy"), out, "shape (20, 3, 8, 8)", "(N, 3, 16, 16)")
    np.save(tmp_path / "gray.npy", np.zeros((20, 1, 16, 16), np.float32))
    _refused(export("--int8", "--calib", tmp_path / "gray.npy"), out, "shape (20, 1, 16, 16)")
    three = image_folder(tmp_path / "three", classes=3, per_class=6)
    _refused(export("--int8", "--calib", three), out, "3 class folders but the network has 2 classes")
    few = image_folder(tmp_path / "few", classes=2, per_class=5)
    _refused(export("--int8", "--calib", few), out, "has 10 images; at least 16")
    _refused(cli("export", KE, "-o", out, "--int8", "--calib", calib), out, "image folders give RGB images",
             "reads 1 channels")


@pytest.mark.slow
def test_int8_accuracy_drop_beyond_max_drop_is_refused(cli, tmp_path):
    out = tmp_path / "ke.int8.onnx"
    r = cli("export", KE, "-o", out, "--int8", "--calib", ill_calibration(tmp_path / "ill.npy"), "--data", "digits",
            "--max-drop", "1")
    _refused(r, out, "INT8 accuracy on digits (n=359)", "> --max-drop 1", "nothing written")


@pytest.mark.slow
def test_int8_of_an_aligned_network_quantizes_the_padded_graph(cli, tmp_path):
    """sr 0.8 of widths 16/32/64 gives 13/26/52; --align 16 pads them back to 16/32/64, then INT8."""
    import onnx

    torch.manual_seed(0)
    ck = save(randomize_bn(create_model("cifar_resnet", depth=8, width=16, num_classes=2, image_size=16)),
              tmp_path / "m.pt")
    assert cli("extract", ck, "--split-rate", "0.8", "-o", tmp_path / "m.slim.pt").code == 0
    calib = image_folder(tmp_path / "calib", classes=2, per_class=8)
    out = tmp_path / "a.int8.onnx"
    r = cli("export", tmp_path / "m.slim.pt", "-o", out, "--align", "16", "--int8", "--calib", calib, "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["align"]["multiple"] == 16 and rep["precision"] == "int8"
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["slimkit.align"] == "16" and props["slimkit.precision"] == "int8" and "slimkit.int8" in props
    # the int8 conv weights have the padded widths, none of the unaligned ones
    inits = {t.name: t for t in proto.graph.initializer}
    widths = {int(inits[n.input[0]].dims[0]) for n in proto.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in inits and len(inits[n.input[0]].dims) == 4}
    assert widths == {16, 32, 64}
