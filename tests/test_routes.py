"""The routes' verbs (issue 21): `train --slim`, `--teacher`, `prune` and `routes`, end to end through the CLI.

The library pieces are tested in test_slim.py (slim_network), test_prune.py (importance_plan, prune) and
test_distill.py (kd_loss); here: the verbs build what they promise (the fit hypothesis's widths, the
channels the criterion ranks highest, distillation that is really used), refuse bad input in one line
with nothing written, and `routes` resumes after a crash at any write to the same table.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_bn

from slimkit import count_params, create_model, load, save
from slimkit.core.graph import prunable_layers

PDATA = ("--data", "digits", "--train-per-class", "2", "--batch-size", "16")  # prune's data flags
DATA = (*PDATA, "--warmup-epochs", "0")
TINY = (*DATA, "--epochs", "1")
SMALL = ("--model-args", "depth=8,width=8")


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in prunable_layers(model).items()}


@pytest.mark.parametrize("arch, extra, rate", [
    ("cifar_resnet", SMALL, "0.5"),
    ("cifar_resnet", SMALL, "0.3"),
    ("small_vgg", ("--image-size", "8"), "0.5"),
    pytest.param("resnet18", ("--image-size", "16"), "0.5", marks=pytest.mark.slow),  # a torchvision source
])
def test_train_slim_builds_the_extracted_fit_hypothesis(cli, tmp_path, arch, extra, rate):
    r = cli("train", "--arch", arch, *extra, *TINY, "-o", tmp_path / "dense")
    assert r.code == 0, r.err
    r = cli("extract", tmp_path / "dense" / "last.pt", "--split-rate", rate, "-o", tmp_path / "fit.pt")
    assert r.code == 0, r.err
    r = cli("train", "--arch", arch, *extra, *TINY, "--slim", rate, "-o", tmp_path / "slim")
    assert r.code == 0, r.err
    fit, slim = load(tmp_path / "fit.pt"), load(tmp_path / "slim" / "last.pt")
    assert _shapes(slim) == _shapes(fit)
    assert count_params(slim) == count_params(fit) < count_params(load(tmp_path / "dense" / "last.pt"))
    assert torch.load(tmp_path / "slim" / "last.pt", weights_only=True)["meta"]["split"] == {"mode": "kels",
                                                                                              "rate": float(rate)}


def test_train_slim_resumes_to_the_uninterrupted_run(cli, tmp_path):
    from slimkit.engine.testhooks import stop_after

    args = ("train", *SMALL, *DATA, "--epochs", "3", "--slim", "0.5")
    assert cli(*args, "-o", tmp_path / "a").code == 0
    with stop_after(1):
        assert cli(*args, "-o", tmp_path / "b").code == 0
    assert not (tmp_path / "b" / "last.pt").exists()
    assert cli("train", "--resume", tmp_path / "b").code == 0
    a, b = load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k  # the same computation rerun: bit-identical


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A digits network (1x16x16, 10 classes) with non-trivial weights and BN statistics."""
    d = tmp_path_factory.mktemp("routes")
    torch.manual_seed(0)
    model = randomize_bn(create_model("cifar_resnet", depth=8, width=8, in_chans=1, image_size=16, num_classes=10))
    return save(model, d / "dense.pt")


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kd_weight_zero_trains_exactly_as_without_a_teacher_and_a_positive_weight_uses_it(cli, dense, tmp_path):
    base = ("train", *SMALL, *DATA, "--epochs", "2", "--slim", "0.5")
    assert cli(*base, "-o", tmp_path / "plain").code == 0
    assert cli(*base, "--teacher", dense, "--kd-weight", "0", "-o", tmp_path / "w0").code == 0
    r = cli(*base, "--teacher", dense, "--kd-weight", "0.7", "--kd-temperature", "3", "-o", tmp_path / "w7")
    assert r.code == 0, r.err
    plain, w0, w7 = (_metrics(tmp_path / d) for d in ("plain", "w0", "w7"))
    assert [m["loss"] for m in w0] == [m["loss"] for m in plain]  # weight 0: cross-entropy, the same steps
    assert w7[0]["loss"] != plain[0]["loss"]
    assert "distilled from" in (tmp_path / "w7" / "summary.md").read_text()


def test_prune_keeps_the_channels_its_criterion_ranks_highest_at_the_kels_widths(cli, dense, tmp_path):
    from slimkit.core.plan import kels_count
    from slimkit.methods.routes.prune import importance_plan

    model = load(dense)
    for criterion in ("l2", "kels"):
        out = tmp_path / criterion
        r = cli("prune", dense, "--criterion", criterion, "--split-rate", "0.5", *PDATA, "--finetune-epochs", "1",
                "-o", out)
        assert r.code == 0, r.err
        pruned = load(out / "last.pt")
        want = importance_plan(model, None, 0.5, criterion)
        assert pruned.slimkit_plans[-1].keep == want.keep
        dense_layers, pruned_layers = prunable_layers(model), prunable_layers(pruned)
        for name, m in pruned_layers.items():  # every layer at its KELS width (the classifier keeps its classes)
            c = dense_layers[name].weight.shape[0]
            assert m.weight.shape[0] in (c if name == "fc" else kels_count(c, 0.5),), name
        meta = torch.load(out / "last.pt", weights_only=True)["meta"]
        assert meta["pruned"]["criterion"] == criterion
    # fine-tuning trained the cut network: its weights moved away from the cut of the source
    from slimkit.methods.routes.prune import prune

    cut = prune(model, 0.5, "l2")
    moved = [not torch.equal(a, b) for a, b in zip(cut.state_dict().values(), load(tmp_path / "l2" / "last.pt").state_dict().values())]
    assert any(moved)


def test_prune_resumes_to_the_uninterrupted_run_and_refuses_a_changed_checkpoint(cli, dense, tmp_path):
    import shutil

    from slimkit.engine.testhooks import stop_after

    src = shutil.copyfile(dense, tmp_path / "src.pt")
    args = ("prune", src, "--criterion", "taylor", *PDATA, "--finetune-epochs", "3", "--taylor-batches", "1")
    assert cli(*args, "-o", tmp_path / "a").code == 0
    with stop_after(1):
        assert cli(*args, "-o", tmp_path / "b").code == 0
    assert not (tmp_path / "b" / "last.pt").exists()
    assert cli("prune", "--resume", tmp_path / "b").code == 0  # the cut is recomputed, the weights come from the state
    a, b = load(tmp_path / "a" / "last.pt").state_dict(), load(tmp_path / "b" / "last.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with stop_after(1):
        assert cli(*args, "-o", tmp_path / "c").code == 0
    save(create_model("cifar_resnet", depth=8, width=8, in_chans=1, image_size=16, num_classes=10), src, force=True)
    r = cli("prune", "--resume", tmp_path / "c")
    assert r.code == 2 and r.err.count("\n") == 1 and "ckpt_sha256" in r.err, r.err
    r = cli("prune", *PDATA, "-o", tmp_path / "d")  # neither a checkpoint nor --resume
    assert r.code == 2 and r.err.count("\n") == 1 and "give the trained network to prune" in r.err, r.err
    assert not (tmp_path / "d").exists()


@pytest.fixture()
def five_class_teacher(tmp_path):
    return save(create_model("cifar_resnet", depth=8, width=8, in_chans=1, image_size=16, num_classes=5),
                tmp_path / "t5.pt")


@pytest.mark.parametrize("case", ["criterion", "rate0", "rate1", "teacher_classes", "teacher_input", "teacher_loss",
                                  "no_ckpt", "wrong_data"])
def test_prune_bad_input_is_one_line_exit_2_nothing_written(cli, dense, tmp_path, case):
    t5 = save(create_model("cifar_resnet", depth=8, width=8, in_chans=1, image_size=16, num_classes=5), tmp_path / "t5.pt")
    t8 = save(create_model("cifar_resnet", depth=8, width=8, in_chans=1, image_size=8, num_classes=10), tmp_path / "t8.pt")
    args, match = {
        "criterion": (("--criterion", "fpgm"), "unknown pruning criterion 'fpgm'; available: l1, l2, taylor, kels"),
        "rate0": (("--split-rate", "0"), "split rate"),
        "rate1": (("--split-rate", "1.5"), "split rate"),
        "teacher_classes": (("--teacher", t5), "it takes 1x16x16 inputs and has 5 classes, the student takes 1x16x16 and has 10"),
        "teacher_input": (("--teacher", t8), "it takes 1x8x8 inputs"),
        "teacher_loss": (("--teacher", dense, "--loss", "cskd"), "give one of them (--loss ce or smooth)"),
        "no_ckpt": (("--arch", "cifar_resnet"), "no such file"),
        "wrong_data": (("--data", str(tmp_path / "nowhere")), "nowhere"),
    }[case]
    src = tmp_path / "missing.pt" if case == "no_ckpt" else dense
    out = tmp_path / "p"
    r = cli("prune", src, *PDATA, "--finetune-epochs", "1", *args, "-o", out)
    assert r.code == 2 and r.err.count("\n") == 1 and match in r.err, r.err
    assert r.err.startswith("slimkit prune: error: ")
    assert not out.exists()


@pytest.mark.parametrize("case", ["teacher_classes", "slim_rate", "slim_construct"])
def test_train_bad_input_is_one_line_exit_2_nothing_written(cli, tmp_path, case, five_class_teacher):
    args, match = {
        "teacher_classes": ((*SMALL, "--slim", "0.5", "--teacher", five_class_teacher), "has 5 classes"),
        "slim_rate": ((*SMALL, "--slim", "1"), "(0, 1)"),
        "slim_construct": (("--arch", "convnext_tiny", "--image-size", "32", "--slim", "0.5"),
                           "layer features.0.1: LayerNorm over channels"),
    }[case]
    out = tmp_path / "t"
    r = cli("train", *TINY, *args, "-o", out)
    assert r.code == 2 and r.err.count("\n") == 1 and match in r.err, r.err
    assert not out.exists()


ROUTES = ("routes", *SMALL, "--data", "digits", "--train-per-class", "2", "--batch-size", "16", "--warmup-epochs", "0",
          "--epochs", "1", "--budget", "2", "--seeds", "0", "--batch", "1", "--runs", "2", "--warmup", "1")


@pytest.mark.parametrize("args, match", [
    (("--budget", "1"), "--budget 1 is smaller than the routes need: Knowledge Evolution needs at least two "
                        "generations of --epochs 1, so the minimum budget is 2 epochs"),
    (("--epochs", "2", "--budget", "5"), "--budget 5 is not a whole number of KE generations of --epochs 2; use 4 or 6"),
    (("--split-rate", "1"), "split rate"),
    (("--routes", "ke,magic"), "unknown route 'magic'"),
    (("--criterion", "random"), "unknown pruning criterion 'random'"),
    (("--loss", "cskd"), "give --loss ce or smooth, or leave distill out of --routes"),
])
def test_routes_bad_input_is_one_line_exit_2_nothing_written(cli, tmp_path, args, match):
    out = tmp_path / "r"
    r = cli(*ROUTES, *args, "-o", out)
    assert r.code == 2 and r.err.count("\n") == 1 and match in r.err, r.err
    assert not out.exists()


def _table(out) -> dict:
    rep = json.loads((out / "routes.json").read_text())
    rows = {r["route"]: (r["accs"], r["params"], r["macs"], r["spent"]) for r in rep["rows"]}
    return {"rows": rows, "pick": rep["pick"]["route"], "pick_sd": rep["pick"]["sd"]}


@pytest.mark.slow
def test_routes_writes_the_table_and_resumes_after_a_crash_to_the_same_table(cli, tmp_path, monkeypatch):
    from slimkit.engine.testhooks import SimulatedCrash, crash_at

    with crash_at(None) as hook:
        r = cli(*ROUTES, "-o", tmp_path / "whole")
    assert r.code == 0, r.err
    whole = _table(tmp_path / "whole")
    assert set(whole["rows"]) == {"dense1", "dense", "ke_dense", "ke", "scratch", "prune", "distill"}
    slim_params = {whole["rows"][k][1] for k in ("ke", "scratch", "prune", "distill")}
    assert len(slim_params) == 1 and slim_params.pop() < whole["rows"]["dense"][1]  # one slim architecture
    pick = torch.load(tmp_path / "whole" / "pick.pt", weights_only=True)
    assert count_params(load(tmp_path / "whole" / "pick.pt")) == whole["rows"]["ke"][1]
    assert pick["meta"] is not None
    md = (tmp_path / "whole" / "routes.md").read_text()
    assert "Pick: **" in md and "2 (dense) + 1 fine-tune" in md
    n = hook.count
    names = hook.names
    # a crash at a write in each sub-run and in the parent: first, KE, prune, distill, the latency record, the last
    points = sorted({1, names.index("gen1/last.pt") + 1, n // 2, n - 3, n - 1, n})
    for k in points:
        out = tmp_path / f"crash{k}"
        if k == points[-1]:  # started by a relative path in one directory, resumed by another from its parent
            monkeypatch.chdir(tmp_path)
        with pytest.raises(SimulatedCrash), crash_at(k):
            cli(*ROUTES, "-o", out.relative_to(tmp_path) if k == points[-1] else out)
        dense_ckpt = out / "seed0" / "dense" / "last.pt"
        before = dense_ckpt.stat().st_mtime_ns if dense_ckpt.exists() else None
        if k == points[-1]:
            monkeypatch.chdir(tmp_path.parent)
            out = out.relative_to(tmp_path.parent)
        r = cli("routes", "--resume", out)
        assert r.code == 0, (k, names[k - 1], r.err)
        assert _table(out) == whole, (k, names[k - 1])
        resumed = load(out / "pick.pt").state_dict()
        for key, value in load(tmp_path / "whole" / "pick.pt").state_dict().items():
            assert torch.equal(resumed[key], value), (k, names[k - 1], key)  # the same computation: bit-exact
        if before is not None:  # a finished sub-run is not run again
            assert dense_ckpt.stat().st_mtime_ns == before, (k, names[k - 1])
