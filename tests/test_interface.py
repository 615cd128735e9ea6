"""The shape of the interface: the layout the README describes, --json and --quiet in every verb, and
verbs that take network objects as well as paths."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn, rel_err
from torch import nn

import slimkit
from slimkit import create_model, load, save

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "slimkit"
MAX_LINES = 450  # "no file over ~400 lines"


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_two_modules_share_a_name_and_none_is_long():
    names = Counter(p.name for p in _modules() if p.name != "__init__.py")
    assert [n for n, c in names.items() if c > 1] == []
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_package_is_a_regular_package():
    # setuptools' find (pyproject) skips a folder without __init__.py: `pip install .` would lose it
    dirs = {p.parent for p in _modules()}
    assert sorted(str(d.relative_to(ROOT)) for d in dirs if not (d / "__init__.py").is_file()) == []


def test_the_readme_module_table_matches_the_tree():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture"):]
    section = section[:section.index("\n## ", 4)]
    listed = set(re.findall(r"`(slimkit/[\w/]+\.py)`", section))
    tree = {str(p.relative_to(ROOT)) for p in _modules() if p.name != "__init__.py"}
    assert sorted(tree - listed) == [] and sorted(listed - tree) == []


@pytest.fixture(scope="module")
def net_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("iface")
    return save(randomize_bn(create_model("cifar_resnet", depth=8, width=8, num_classes=10, in_chans=1,
                                          image_size=8)), d / "net.pt")


def _verbs(net: Path, tmp: Path) -> dict[str, list]:
    tiny = ["--epochs", "1", "--warmup-epochs", "0", "--train-per-class", "3", "--image-size", "8"]
    return {
        "extract": ["extract", net, "--split-rate", "0.5", "-o", tmp / "s.pt"],
        "export": ["export", net, "-o", tmp / "n.onnx"],
        "bench": ["bench", net, "--batch", "1", "--runs", "2", "--warmup", "1"],
        "compare": ["compare", net, "--split-rate", "0.5", "--batch", "1", "--runs", "2", "--warmup", "1",
                    "--out", tmp / "c"],
        "models": ["models", "--filter", "cifar"],
        "train": ["train", "--arch", "small_vgg", *tiny, "--out", tmp / "t"],
        "evolve": ["evolve", "--arch", "small_vgg", *tiny, "--generations", "1", "--out", tmp / "e"],
        "den": ["den", "--tasks", "split:2", "--arch", "mlp:8,4", "--epochs", "1", "--baselines", "none",
                "--out", tmp / "d"],
        "prune": ["prune", net, "--train-per-class", "3", "--finetune-epochs", "1", "--out", tmp / "p"],
        "routes": ["routes", "--arch", "small_vgg", *tiny, "--budget", "2", "--seeds", "0", "--routes", "dense,scratch",
                   "--batch", "1", "--runs", "2", "--warmup", "1", "--out", tmp / "r"],
    }


@pytest.mark.parametrize("verb", ["extract", "export", "bench", "compare", "models", "train", "evolve", "den", "prune",
                                  "routes"])
def test_json_is_one_report_on_stdout_in_every_verb(cli, net_file, tmp_path, verb):
    argv = _verbs(net_file, tmp_path)[verb]
    r = cli(*argv, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)  # the whole of stdout is one JSON document
    if verb in ("train", "evolve", "den", "prune", "routes"):
        out = Path(argv[-1])
        assert report["out"] == str(out) and report["verb"] == verb
        assert sorted(report["files"]) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    elif verb == "models":
        assert {d["name"] for d in report} >= {"cifar_resnet"}
    elif verb == "bench":
        assert [x["model"] for x in report["results"]] == ["net.pt"]
    else:
        assert report["source"] == str(net_file)


def test_merge_reports_json_and_quiet_silences_progress(cli, tmp_path):
    tiny = ["--arch", "small_vgg", "--epochs", "1", "--warmup-epochs", "0", "--train-per-class", "3",
            "--image-size", "8"]
    for s in (1, 2):
        assert cli("train", *tiny, "--seed", str(s), "--out", tmp_path / f"t{s}", "--quiet").code == 0
    r = cli("merge", tmp_path / "t1" / "last.pt", tmp_path / "t2" / "last.pt", "--train-per-class", "3",
            "--gate-epochs", "1", "--finetune-epochs", "1", "--out", tmp_path / "m", "--json", "--quiet")
    assert r.code == 0, r.err
    assert r.err == ""  # --quiet: nothing on stderr when all goes well
    result = json.loads(r.out)["result"]
    assert 0 <= result["merged"] <= 1 and result["params"] == result["teacher_params"]  # the teachers' size


def test_quiet_keeps_stderr_empty_and_stdout_the_same(cli, tmp_path):
    argv = ["evolve", "--arch", "small_vgg", "--epochs", "1", "--warmup-epochs", "0", "--train-per-class", "3",
            "--image-size", "8", "--generations", "2"]
    loud = cli(*argv, "--out", tmp_path / "a")
    quiet = cli(*argv, "--out", tmp_path / "b", "--quiet")
    assert loud.code == quiet.code == 0
    assert "generation 2/2" in loud.err and quiet.err == ""
    assert quiet.out.replace(str(tmp_path / "b"), "X") == loud.out.replace(str(tmp_path / "a"), "X")


class _Users(nn.Module):
    """A network slimkit never saw: no ModelSpec, no registry name."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_export_and_bench_take_a_users_module_object(tmp_path):
    import onnxruntime as ort

    model = randomize_bn(_Users()).eval()
    with pytest.raises(slimkit.SlimkitError, match="input shape is unknown"):
        slimkit.export(model, tmp_path / "u.onnx")
    rep = slimkit.export(model, tmp_path / "u.onnx", input_shape=(3, 16, 16))
    assert rep.source == "<_Users object>" and rep.max_rel_diff <= 1e-4
    x = torch.randn(2, 3, 16, 16)
    got = ort.InferenceSession(str(tmp_path / "u.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert rel_err(torch.from_numpy(got), model(x).detach()) < 1e-4
    assert model.training is False and not hasattr(model, "slimkit_spec")  # the caller's object is untouched
    bench = slimkit.bench([model], batch=(1,), runs=2, warmup=1, input_shape=(3, 16, 16), progress=False)
    assert [r.model for r in bench.results] == ["_Users"]


def test_extract_and_compare_of_an_object_equal_those_of_its_file(net_file, tmp_path):
    model = load(net_file)
    a = slimkit.extract(net_file, split_rate=0.5, out=tmp_path / "a.pt")
    b = slimkit.extract(model, split_rate=0.5, out=tmp_path / "b.pt")
    sa, sb = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(sa["state_dict"][k], sb["state_dict"][k]) for k in sa["state_dict"])  # the same cut rerun
    assert [(r.dense["params"], r.dense["macs"], r.slim["params"], r.slim["macs"]) for r in (a, b)].count(
        (a.dense["params"], a.dense["macs"], a.slim["params"], a.slim["macs"])) == 2
    with pytest.raises(slimkit.SlimkitError, match="needs out="):
        slimkit.extract(model, split_rate=0.5)
    with pytest.raises(slimkit.SlimkitError, match="not built by slimkit.create_model"):
        slimkit.extract(_Users(), split_rate=0.5, out=tmp_path / "u.pt")
    rep = slimkit.compare(model, split_rate=0.5, batches=(1,), runs=2, warmup=1, out=tmp_path / "c")
    assert rep.dense["params"] == a.dense["params"] and rep.slim["params"] == a.slim["params"]
    assert (tmp_path / "c" / "compare.json").is_file()


def test_merge_takes_teacher_objects_and_gives_the_run_of_their_files(tmp_path):
    from slimkit import MergeConfig, TrainConfig, TrainRunConfig

    for s in (1, 2):
        slimkit.train(TrainRunConfig(arch="small_vgg", image_size=8, train_per_class=4,
                                     train=TrainConfig(epochs=1, batch_size=16, seed=s)), tmp_path / f"t{s}",
                      progress=False)
    files = [tmp_path / "t1" / "last.pt", tmp_path / "t2" / "last.pt"]
    cfg = MergeConfig(train_per_class=4, gate=TrainConfig(epochs=1, lr=0.01, batch_size=16),
                      finetune=TrainConfig(epochs=1, lr=0.01, warmup_epochs=0, batch_size=16))
    a = slimkit.merge(cfg, files, tmp_path / "ma", progress=False)
    b = slimkit.merge(cfg, [load(f) for f in files], tmp_path / "mb", progress=False)
    assert a == b  # the same computation from objects as from files
    sa = torch.load(tmp_path / "ma" / "last.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "mb" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
