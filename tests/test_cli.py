"""`slimkit extract`: the headline command, its report, and its refusals."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ke_kels_masks, randomize_bn, rel_err

from slimkit import create_model, load, save
from slimkit.core.plan import apply_masks, wels_masks


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A small dense slimkit checkpoint with non-trivial BN statistics."""
    d = tmp_path_factory.mktemp("ck")
    model = randomize_bn(create_model("cifar_resnet", depth=8, width=8, num_classes=5))
    return save(model, d / "net.pt")


def _snapshot(d: Path) -> dict[str, bytes | None]:
    """Every path under ``d`` with its bytes (None for directories)."""
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


def test_extract_writes_slim_beside_input_and_prints_table(cli, ckpt, tmp_path):
    src = tmp_path / "net.pt"
    src.write_bytes(ckpt.read_bytes())
    r = cli("extract", "--split-rate", "0.5", src)
    assert r.code == 0, r.err
    out = tmp_path / "net.slim.pt"
    assert out.exists()
    for word in ("parameters", "MACs @ 3x32x32", "checkpoint size", "verified: max |slim(x) - masked_dense(x)|", "dense", "slim"):
        assert word in r.out
    slim, dense = load(out), load(src)
    assert sum(p.numel() for p in slim.parameters()) < 0.3 * sum(p.numel() for p in dense.parameters())


def test_extract_json_and_output_equals_masked_dense(cli, ckpt, tmp_path):
    out = tmp_path / "s.pt"
    r = cli("extract", ckpt, "--split-rate", "0.8", "-o", out, "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["split_rate"] == 0.8 and rep["output"] == str(out)
    assert rep["slim"]["params"] < rep["dense"]["params"] and rep["slim"]["macs"] < rep["dense"]["macs"]
    assert rep["max_rel_diff"] <= 1e-5
    assert rep["slim"]["bytes"] == out.stat().st_size
    # the written network, loaded on its own, is the dense one with its reset hypothesis zeroed
    from slimkit.core.graph import ChannelGraph
    from slimkit.core.plan import kels_plan, plan_masks

    dense = load(ckpt)
    masks = plan_masks(ChannelGraph(dense, (3, 32, 32)), kels_plan(ChannelGraph(dense, (3, 32, 32)), 0.8))
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert rel_err(load(out)(x), apply_masks(dense, masks)(x)) <= 1e-5
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["split"] == {"mode": "kels", "rate": 0.8}
    assert len(meta["provenance"]["source_sha256"]) == 64


def test_extract_plain_state_dict_with_arch(cli, tmp_path):
    model = randomize_bn(create_model("resnet18", num_classes=7))
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "sd.pth")
    r = cli("extract", tmp_path / "sd.pth", "--arch", "resnet18", "--num-classes", "7", "--split-rate", "0.5")
    assert r.code == 0, r.err
    assert (tmp_path / "sd.slim.pt").exists() and "resnet18" in r.out


def test_plain_state_dict_with_model_args(cli, tmp_path):
    """A plain state_dict of a non-default cifar_resnet: --model-args says how to build it, for extract and export."""
    model = randomize_bn(create_model("cifar_resnet", depth=8, width=8, num_classes=5, in_chans=1, image_size=16))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    args = ["--arch", "cifar_resnet", "--model-args", "depth=8, width=8, in_chans=1, image_size=16"]
    r = cli("extract", tmp_path / "sd.pt", *args, "--split-rate", "0.5")
    assert r.code == 0, r.err
    slim = load(tmp_path / "sd.slim.pt")
    assert slim.slimkit_spec.args == {"num_classes": 5, "depth": 8, "width": 8, "in_chans": 1, "image_size": 16}
    assert slim.conv1.out_channels == 4
    r = cli("export", tmp_path / "sd.pt", *args, "-o", tmp_path / "sd.onnx")
    assert r.code == 0, r.err
    import onnx

    dims = [d.dim_value for d in onnx.load(str(tmp_path / "sd.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [1, 16, 16]
    r = cli("extract", tmp_path / "sd.pt", "--arch", "cifar_resnet", "--model-args",
            '{"depth": 8, "width": 8, "in_chans": 1}', "--split-rate", "0.5", "-o", tmp_path / "j.pt")
    assert r.code == 0, r.err  # the JSON form


@pytest.mark.slow
def test_extract_official_ke_checkpoint_uses_the_files_masks(cli, tmp_path):
    model = randomize_bn(create_model("resnet18", num_classes=5), seed=4)
    sd = model.state_dict()
    masks = ke_kels_masks(sd, 0.5)
    ke = {"module." + k: v for k, v in sd.items()} | {f"module.{n}.mask": m for n, m in masks.items()}
    torch.save({"arch": "Split_ResNet18", "state_dict": ke, "epoch": 200}, tmp_path / "ke.pth")
    r = cli("extract", tmp_path / "ke.pth")  # no --split-rate: the masks define the split
    assert r.code == 0, r.err
    slim = load(tmp_path / "ke.slim.pt")
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert rel_err(slim(x), apply_masks(model, masks)(x)) <= 1e-5
    # a split rate that disagrees with the file's masks is refused
    r = cli("extract", tmp_path / "ke.pth", "--split-rate", "0.8", "-o", tmp_path / "x.pt")
    assert r.code == 2 and "disagrees" in r.err and not (tmp_path / "x.pt").exists()


def test_extract_ke_wels_checkpoint_has_no_slim_network(cli, tmp_path):
    model = create_model("resnet18", num_classes=5)
    masks = wels_masks(model, 0.5)
    ke = dict(model.state_dict()) | {f"{n}.mask": m.float() for n, m in masks.items()}
    torch.save({"arch": "Split_ResNet18", "state_dict": ke}, tmp_path / "w.pth")
    r = cli("extract", tmp_path / "w.pth")
    assert r.code == 2 and "WELS" in r.err
    assert not (tmp_path / "w.slim.pt").exists()


def test_wels_split_mode_is_explained(cli, ckpt, tmp_path):
    r = cli("extract", ckpt, "--split-rate", "0.5", "--split-mode", "wels", "-o", tmp_path / "o.pt")
    assert r.code == 2 and "WELS has no slim network" in r.err


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


_NEEDS_R18 = {"wrong-classes", "wrong-arch", "unknown-arch", "no-arch"}


def _bad_inputs(tmp: Path, ckpt: Path, case: str) -> dict[str, tuple[list, str]]:
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "trunc.pt").write_bytes(ckpt.read_bytes()[:3000])
    (tmp / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (tmp / "adir").mkdir()
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil()}, tmp / "evil.pt")
    if case in _NEEDS_R18:  # 45 MB: written only where a case reads it, to keep the suite's disk use small
        torch.save(create_model("resnet18", num_classes=6).state_dict(), tmp / "r18.pt")
    (tmp / "exists.pt").write_bytes(b"keep me")
    torch.save(create_model("cifar_resnet", depth=8, width=8, num_classes=5).state_dict(), tmp / "c8.pt")
    return {
        "missing": (["extract", tmp / "nope.pt", "--split-rate", "0.5"], "no such file"),
        "directory": (["extract", tmp / "adir", "--split-rate", "0.5"], "is a directory"),
        "empty": (["extract", tmp / "empty.pt", "--split-rate", "0.5"], "empty"),
        "truncated": (["extract", tmp / "trunc.pt", "--split-rate", "0.5"], "corrupt or truncated"),
        "random": (["extract", tmp / "random.pt", "--split-rate", "0.5"], "not a"),
        "evil-pickle": (["extract", tmp / "evil.pt", "--arch", "mlp", "--split-rate", "0.5"], "never executes code"),
        "wrong-classes": (["extract", tmp / "r18.pt", "--arch", "resnet18", "--num-classes", "10", "--split-rate", "0.5"], "does not fit"),
        "wrong-arch": (["extract", tmp / "r18.pt", "--arch", "resnet34", "--split-rate", "0.5"], "does not fit"),
        "unknown-arch": (["extract", tmp / "r18.pt", "--arch", "resnet9000", "--split-rate", "0.5"], "unknown model 'resnet9000'; closest: resnet"),
        "no-arch": (["extract", tmp / "r18.pt", "--split-rate", "0.5"], "--arch"),
        "rate-0": (["extract", ckpt, "--split-rate", "0"], "split rate"),
        "rate-1": (["extract", ckpt, "--split-rate", "1"], "split rate"),
        "rate-neg": (["extract", ckpt, "--split-rate", "-0.5"], "split rate"),
        "rate-big": (["extract", ckpt, "--split-rate", "1.5"], "split rate"),
        "rate-nan": (["extract", ckpt, "--split-rate", "nan"], "split rate"),
        "rate-text": (["extract", ckpt, "--split-rate", "abc"], "split rate"),
        "no-rate": (["extract", ckpt], "--split-rate is required"),
        "bad-classes": (["extract", ckpt, "--split-rate", "0.5", "--num-classes", "0"], "positive integer"),
        "exists": (["extract", ckpt, "--split-rate", "0.5", "-o", tmp / "exists.pt"], "already exists; pass --force"),
        "out-is-in": (["extract", ckpt, "--split-rate", "0.5", "-o", ckpt, "--force"], "is the input"),
        "needs-model-args": (["extract", tmp / "c8.pt", "--arch", "cifar_resnet", "--split-rate", "0.5"], "--model-args"),
        "model-args-unknown": (["extract", tmp / "c8.pt", "--arch", "cifar_resnet", "--model-args", "depth=8,bogus=1",
                                "--split-rate", "0.5"], "takes no argument bogus"),
        "model-args-syntax": (["extract", tmp / "c8.pt", "--arch", "cifar_resnet", "--model-args", "depth",
                               "--split-rate", "0.5"], "key=value"),
        "model-args-vs-file": (["extract", ckpt, "--model-args", "depth=20", "--split-rate", "0.5"],
                               "was built with depth=8 but --model-args says depth=20"),
        "model-args-classes": (["extract", tmp / "c8.pt", "--arch", "cifar_resnet", "--model-args", "num_classes=5",
                                "--split-rate", "0.5"], "--num-classes, not --model-args"),
    }


CASES = ["missing", "directory", "empty", "truncated", "random", "evil-pickle", "wrong-classes", "wrong-arch",
         "unknown-arch", "no-arch", "rate-0", "rate-1", "rate-neg", "rate-big", "rate-nan", "rate-text", "no-rate",
         "bad-classes", "exists", "out-is-in", "needs-model-args", "model-args-unknown", "model-args-syntax",
         "model-args-vs-file", "model-args-classes"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_nothing_written(cli, ckpt, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    argv, expected = _bad_inputs(tmp_path, ckpt, case)[case]
    before, ckpt_bytes = _snapshot(tmp_path), ckpt.read_bytes()
    r = cli(*argv)
    assert r.code == 2
    assert r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert expected in lines[0]
    assert "Traceback" not in r.err
    assert _snapshot(tmp_path) == before  # nothing written, nothing overwritten, no PWNED
    assert ckpt.read_bytes() == ckpt_bytes


def test_console_script_bad_input_has_no_traceback(tmp_path):
    """The installed entry point, in a real process: one stderr line, exit 2."""
    exe = Path(sys.executable).with_name("slimkit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "slimkit"]
    p = subprocess.run(cmd + ["extract", str(tmp_path / "missing.pt"), "--split-rate", "0.5"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "no such file" in p.stderr and "Traceback" not in p.stderr


def test_import_slimkit_is_light():
    code = (
        "import sys, slimkit; "
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'torchvision', 'torch_pruning') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == ""


def test_extract_never_imports_onnx_or_initialises_cuda(tmp_path, ckpt):
    code = (
        "import sys, torch, slimkit; calls = []; init = torch.cuda._lazy_init; "
        "torch.cuda._lazy_init = lambda: (calls.append(1), init()); "  # every CUDA initialisation passes here
        f"slimkit.extract({str(ckpt)!r}, 0.5, out={str(tmp_path / 'o.pt')!r}); "
        "print('onnx' in sys.modules, 'onnxruntime' in sys.modules, bool(calls))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.split() == ["False", "False", "False"]


def test_models_verb_lists_the_registry(cli):
    r = cli("models")
    assert r.code == 0
    for name in ("resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2", "densenet121", "cifar_resnet"):
        assert name in r.out


class _Broken(torch.nn.Module):
    """A network whose forward fails the way a slimkit bug would surface: an unexpected exception deep inside."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x):  # traces fine (one example); fails on the verification batch
        if x.shape[0] > 1:
            raise RuntimeError("unexpected tensor layout in layer fc")
        return self.fc(x.flatten(1))


def test_an_internal_error_exits_1_and_says_it_is_a_slimkit_bug(cli, tmp_path, monkeypatch):
    from slimkit.models import list_models, register_model

    if "broken_for_tests" not in list_models():
        register_model("broken_for_tests", input_shape=(1, 4, 4))(_Broken)
    path = save(create_model("broken_for_tests"), tmp_path / "b.pt")
    r = cli("extract", path, "--split-rate", "0.5")
    assert r.code == 1 and r.err.count("\n") == 1, r.err
    assert "slimkit bug" in r.err and "unexpected tensor layout" in r.err and "--debug" in r.err
    assert "Traceback" not in r.err and not (tmp_path / "b.slim.pt").exists()
    r = cli("--debug", "extract", path, "--split-rate", "0.5")
    assert r.code == 1 and "Traceback" in r.err and "slimkit bug" in r.err
    monkeypatch.setenv("SLIMKIT_DEBUG", "1")
    assert "Traceback" in cli("extract", path, "--split-rate", "0.5").err
    r = cli("extract", tmp_path / "missing.pt", "--split-rate", "0.5")  # the user's mistake stays exit 2
    assert r.code == 2 and "slimkit bug" not in r.err


def test_a_user_error_keeps_its_cause_and_debug_shows_it(cli, tmp_path):
    from slimkit import SlimkitError
    from slimkit.core.plan import check_split_rate

    with pytest.raises(SlimkitError) as info:
        check_split_rate("half")
    assert isinstance(info.value.__cause__, ValueError)  # float('half') failed: the cause is chained
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02 not a pickle at all")
    r = cli("extract", bad, "--split-rate", "0.5")
    assert r.code == 2 and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    r = cli("--debug", "extract", bad, "--split-rate", "0.5")
    assert r.code == 2 and "Traceback" in r.err
    assert "The above exception was the direct cause of the following exception" in r.err  # torch's own error
    assert r.err.splitlines()[-1].startswith("slimkit extract: error: ") and "slimkit bug" not in r.err
    assert not (tmp_path / "bad.slim.pt").exists()


def test_every_flag_of_every_verb_has_help_and_shows_its_default(cli):
    import argparse

    from slimkit.cli.app import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for verb, sub in verbs.items():
        shown = cli(verb, "--help")
        assert shown.code == 0, verb
        fmt = sub._get_formatter()
        for a in sub._actions:
            if not a.option_strings or a.dest == "help" or a.help == argparse.SUPPRESS:  # help, deprecated spellings
                continue
            assert a.help, f"{verb} {a.option_strings[-1]} has no help"
            assert a.option_strings[-1] in shown.out, (verb, a.option_strings)
            if a.default not in (None, False, argparse.SUPPRESS):
                text = fmt._expand_help(a)
                assert "default" in text and str(a.default).split(",")[0] in text, (verb, a.option_strings, text)
        assert {"--json", "--quiet"} <= {o for a in sub._actions for o in a.option_strings}, verb  # in every verb


def test_a_slim_network_that_is_not_the_masked_one_is_refused_and_nothing_written(cli, ckpt, tmp_path, monkeypatch):
    import slimkit.models.hypothesis as X

    real_cut = X.cut

    def off_by_a_little(graph, plan):  # a surgery bug: one kept weight off by 1e-3 of the largest
        out = real_cut(graph, plan)
        w = next(m.weight for m in graph.model.modules() if isinstance(m, torch.nn.Conv2d))
        with torch.no_grad():
            w[0, 0, 0, 0] += 1e-3 * float(w.abs().max())
        return out

    monkeypatch.setattr(X, "cut", off_by_a_little)
    r = cli("extract", ckpt, "--split-rate", "0.5", "-o", tmp_path / "s.pt")
    assert r.code == 2 and "verification failed" in r.err and "float64" in r.err, r.err
    assert not (tmp_path / "s.pt").exists()
