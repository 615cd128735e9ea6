"""`slimkit compare`: one command, dense vs fit hypothesis, files written, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimkit import create_model, save
from slimkit.core.errors import SlimkitError
from slimkit.data.digits import digits
from slimkit.deploy.compare import compare
from slimkit.engine.evaluate import accuracy

DEMO = Path(__file__).resolve().parents[1] / "models" / "digits_resnet20.pt"


def test_compare_on_the_bundled_digits_model(cli, tmp_path):
    r = cli("compare", DEMO, "--split-rate", "0.5", "--data", "digits", "--batch", "1,4", "--runs", "3",
            "--warmup", "1", "--out", tmp_path / "c")
    assert r.code == 0, r.err
    rep = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert (tmp_path / "c" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "c" / "compare.md").read_text().startswith("## cifar_resnet")
    assert rep["slim"]["params"] < 0.3 * rep["dense"]["params"]
    assert rep["slim"]["onnx_bytes"] < rep["dense"]["onnx_bytes"]
    assert [row["batch"] for row in rep["latency"]] == [1, 4]
    for row in rep["latency"]:
        assert row["speedup"] == pytest.approx(row["dense_p50_ms"] / row["slim_p50_ms"])
        assert row["mac_ratio"] == pytest.approx(rep["slim"]["macs"] / rep["dense"]["macs"])
    # accuracy is measured, not copied: recompute the dense one independently
    from slimkit import load

    test = digits("test", image_size=16)
    assert rep["dense"]["accuracy"] == pytest.approx(accuracy(load(DEMO), test))
    assert rep["dense"]["n"] == len(test)
    assert "| accuracy (digits" in r.out and "speed-up" in r.out
    assert rep["notes"] == [] and "Note:" not in r.out  # widths 8/16/32: aligned


def test_compare_notes_unaligned_widths(tmp_path):
    """sr 0.8 of widths 16/32/64 gives 13/26/52: the report says so, and what to do about it."""
    from slimkit.deploy.compare import unaligned_widths
    from slimkit.models.checkpoint import read
    from slimkit.models.hypothesis import fit_hypothesis

    ck = save(create_model("cifar_resnet", depth=8, width=16, num_classes=3), tmp_path / "m.pt")
    fh = fit_hypothesis(read(ck), 0.8)
    assert unaligned_widths(fh.dense, fh.slim) == ([13, 26, 52], 9)  # 7 convs + 2 shortcut convs
    assert unaligned_widths(fh.dense, fh.slim, block=1) == ([], 0)
    rep = compare(ck, 0.8, batches=[1], warmup=1, runs=1, out=tmp_path / "c")
    assert len(rep.notes) == 1 and "(13, 26, 52)" in rep.notes[0] and "--align auto" in rep.notes[0]
    assert "Note: 9 slim conv layer(s)" in (tmp_path / "c" / "compare.md").read_text()


def test_compare_with_torch_provider_and_image_folder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / "test" / cls).mkdir(parents=True)
        for i in range(3):
            arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / "data" / "test" / cls / f"{i}.png")
    net = create_model("cifar_resnet", depth=8, width=8, num_classes=2)
    with torch.no_grad():
        net.fc.bias.copy_(torch.tensor([1e4, 0.0]))  # dense and slim both answer class "a": 3 of 6 right
    ck = save(net, tmp_path / "m.pt")
    rep = compare(ck, 0.5, data=str(tmp_path / "data"), batches=[2], provider="torch", warmup=1, runs=2)
    assert rep.provider == "torch-cpu" and rep.dense["n"] == 6
    assert rep.dense["accuracy"] == rep.slim["accuracy"] == 0.5
    assert (tmp_path / "m.compare" / "compare.md").exists()
    # a network with 3 classes cannot be scored on 2 class folders: the labels would not line up
    ck3 = save(create_model("cifar_resnet", depth=8, width=8, num_classes=3), tmp_path / "m3.pt")
    with pytest.raises(SlimkitError, match="2 class folders but the network has 3 classes"):
        compare(ck3, 0.5, data=str(tmp_path / "data"), batches=[1], warmup=1, runs=1)
    assert not (tmp_path / "m3.compare").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--provider", "nope"], "unknown provider"),
        (["--data", "/nonexistent/dir"], "does not exist"),
        (["--batch", "0"], "positive"),
    ],
)
def test_compare_refusals(cli, tmp_path, extra, expected):
    r = cli("compare", DEMO, "--split-rate", "0.5", "--out", tmp_path / "c", "--runs", "1", "--warmup", "1", *extra)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and expected in r.err, r.err
    assert not (tmp_path / "c").exists()


def test_compare_does_not_clobber(cli, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "compare.md").write_text("mine")
    r = cli("compare", DEMO, "--split-rate", "0.5", "--out", tmp_path / "c", "--runs", "1", "--warmup", "1")
    assert r.code == 2 and "already exists" in r.err
    assert (tmp_path / "c" / "compare.md").read_text() == "mine"


def test_layer_costs_add_up_to_the_macs(tmp_path):
    from slimkit.core.cost import count_macs
    from slimkit.deploy.profile import layer_costs

    for name, kw in (("cifar_resnet", dict(depth=8, width=8)), ("mobilenet_v2", {})):
        model = create_model(name, **kw)
        shape = model.slimkit_spec.input_shape
        cost = layer_costs(model, shape)
        assert sum(c["macs"] for c in cost.values()) == count_macs(model, shape)
        assert ("depthwise conv" in cost) == (name == "mobilenet_v2")


def test_compare_profile_explains_unaligned_widths(cli, tmp_path):
    """sr 0.8 of a 16/32/64-wide net: with --profile the slim convs that left ORT's blocked kernels show up."""
    ck = save(create_model("cifar_resnet", depth=8, width=16, num_classes=3), tmp_path / "m.pt")
    rep = compare(ck, 0.8, batches=[2], warmup=1, runs=3, out=tmp_path / "c", profile=True)
    kinds = {r["kind"]: r for r in rep.profile}
    assert {"all dense convs", "total"} <= set(kinds) and all(r["batch"] == 2 for r in rep.profile)
    total = kinds["total"]
    parts = [r for r in rep.profile if r["kind"] not in ("all dense convs", "total")]
    assert total["dense_ms"] == pytest.approx(sum(r["dense_ms"] for r in parts))
    assert total["mac_ratio"] == pytest.approx(rep.slim["macs"] / rep.dense["macs"])
    assert kinds["all dense convs"]["activation_ratio"] > kinds["all dense convs"]["mac_ratio"]
    assert "### Where the time goes" in (tmp_path / "c" / "compare.md").read_text()
    r = cli("compare", ck, "--split-rate", "0.8", "--provider", "torch", "--profile", "--out", tmp_path / "t")
    assert r.code == 2 and "needs --provider cpu" in r.err and not (tmp_path / "t").exists()
    if kinds["conv, blocked NCHWc"]["dense_ms"] == 0:
        pytest.skip("this CPU's ONNX Runtime runs no conv in its blocked NCHWc layout")
    assert kinds["conv, plain NCHW"]["dense_ms"] == 0  # 16/32/64: every dense conv blocked
    assert kinds["conv, plain NCHW"]["slim_ms"] > 0  # 13/26/52: some slim convs are not


def test_default_compare_dirs_of_two_versions_differ(tmp_path):
    from slimkit.deploy.compare import default_compare_dir

    a, b = default_compare_dir(tmp_path / "a.v1.pt"), default_compare_dir(tmp_path / "a.v2.pt")
    assert (a.name, b.name) == ("a.v1.compare", "a.v2.compare")
    assert default_compare_dir(tmp_path / "net").name == "net.compare"
