"""Knowledge Evolution: reset semantics, resume == uninterrupted, reproducibility, outputs, refusals."""
from __future__ import annotations

import json

import pytest
import torch

from slimkit import create_model, load
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import apply_masks, kels_plan, plan_masks
from slimkit.engine.loop import TrainConfig
from slimkit.engine.testhooks import stop_after
from slimkit.methods.ke.evolve import EvolveConfig, evolve, reinit_reset


def _cfg(**kw):
    train = TrainConfig(epochs=2, batch_size=16, warmup_epochs=1, seed=kw.pop("seed", 0))
    return EvolveConfig(arch="cifar_resnet", generations=2, image_size=8, train_per_class=4, train=train, **kw)


def test_reinit_keeps_fit_redraws_reset_and_carries_bn_and_biases():
    from conftest import randomize_bn

    model = randomize_bn(create_model("small_vgg", num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = ChannelGraph(model, model.slimkit_spec.input_shape)
    masks = plan_masks(graph, kels_plan(graph, 0.5))
    reinit_reset(model, masks, torch.Generator().manual_seed(0))
    after = model.state_dict()
    for name, m in masks.items():
        w0, w1 = before[name + ".weight"], after[name + ".weight"]
        assert torch.equal(w1[m], w0[m])  # fit hypothesis untouched
        assert (w1[~m] != w0[~m]).float().mean() > 0.99  # reset hypothesis redrawn
        fan_in = w0[0].numel()
        assert w1[~m].abs().max() <= 1 / fan_in**0.5 + 1e-6  # kaiming-uniform(a=sqrt 5) bound = 1/sqrt(fan_in)
    for k in before:
        if not any(k == n + ".weight" for n in masks):
            assert torch.equal(before[k], after[k]), k  # BN params/stats and biases carried over


def test_resume_equals_uninterrupted(tmp_path):
    full = evolve(_cfg(), tmp_path / "full", progress=False, echo=lambda s: None)
    with stop_after(3):
        evolve(_cfg(), tmp_path / "cut", progress=False, echo=lambda s: None)  # "crash" mid gen 2
    assert not (tmp_path / "cut" / "gen2").exists()
    resumed = evolve(_cfg(), tmp_path / "cut", resume=True, progress=False, echo=lambda s: None)
    a = torch.load(tmp_path / "full" / "gen2" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "gen2" / "last.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["dense_acc"] for r in full] == [r["dense_acc"] for r in resumed]


def test_outputs_and_extraction_of_a_generation(tmp_path, cli):
    recs = evolve(_cfg(), tmp_path / "run", progress=False, echo=lambda s: None)
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines].count("epoch") == 4 and [x["kind"] for x in lines].count("generation") == 2
    epochs = [x for x in lines if x["kind"] == "epoch"]
    assert all({"loss", "lr", "dense_acc", "fit_acc", "seconds"} <= set(x) for x in epochs)
    # the per-epoch fit accuracy (masked network) equals the per-generation one (extracted network)
    gens = [x for x in lines if x["kind"] == "generation"]
    for g in gens:
        last = [x for x in epochs if x["generation"] == g["generation"]][-1]
        assert last["fit_acc"] == g["fit_acc"] and last["dense_acc"] == g["dense_acc"]
    assert "| N2 |" in (run / "summary.md").read_text()
    assert (run / "generations.png").read_bytes()[:4] == b"\x89PNG"
    meta = torch.load(run / "gen2" / "last.pt", weights_only=True)["meta"]
    assert meta["split"] == {"mode": "kels", "rate": 0.5}
    assert meta["metrics"]["fit_test_acc"] == recs[1]["fit_acc"]
    r = cli("extract", run / "gen2" / "last.pt", "--split-rate", "0.5")
    assert r.code == 0, r.err
    assert load(run / "gen2" / "last.slim.pt").slimkit_spec.arch == "cifar_resnet"


def test_same_seed_same_run_different_seed_different_run(tmp_path):
    a = evolve(_cfg(), tmp_path / "a", progress=False, echo=lambda s: None)
    b = evolve(_cfg(), tmp_path / "b", progress=False, echo=lambda s: None)
    wa = torch.load(tmp_path / "a" / "gen2" / "last.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b" / "gen2" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a == [dict(r, seconds=x["seconds"]) for r, x in zip(b, a)]
    evolve(_cfg(seed=1), tmp_path / "c", progress=False, echo=lambda s: None)
    wc = torch.load(tmp_path / "c" / "gen2" / "last.pt", weights_only=True)["state_dict"]
    assert not torch.equal(wa["conv1.weight"], wc["conv1.weight"])


def test_wels_run_evaluates_the_masked_network(tmp_path):
    cfg = EvolveConfig(arch="mlp", split_mode="wels", split_rate=0.8, generations=2, image_size=8, train_per_class=20,
                       train=TrainConfig(epochs=3, batch_size=16, warmup_epochs=1))
    recs = evolve(cfg, tmp_path / "w", progress=False, echo=lambda s: None)
    meta = torch.load(tmp_path / "w" / "gen1" / "last.pt", weights_only=True)["meta"]
    assert meta["split"]["mode"] == "wels"
    # recomputed by hand: the generation's network with its WELS masks, scored on the digits test split
    from slimkit.core.plan import wels_masks
    from slimkit.data.digits import digits

    x, y = digits("test", image_size=8, in_chans=1, seed=0).tensors
    for r in recs:
        model = load(tmp_path / "w" / f"gen{r['generation']}" / "last.pt").eval()
        masked = apply_masks(model, wels_masks(model, cfg.split_rate, seed=cfg.train.seed))
        with torch.no_grad():
            pred = masked(x).argmax(1)
        assert pred.unique().numel() > 1  # not a constant answer, which any mask would score alike
        assert r["fit_acc"] == pytest.approx(int((pred == y).sum()) / len(y), abs=1e-12)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--split-rate", "0"], "split rate"),
        (["--data", "/no/such/dataset"], "does not exist"),
        (["--generations", "0"], "positive integer"),
        ([], "give -o/--out"),
        (["--num-classes", "102"], "the data has 10 classes, fewer than --num-classes 102"),
        (["--num-classes", "5"], "the data has 10 classes, more than --num-classes 5"),
    ],
)
def test_evolve_refusals(cli, tmp_path, argv, expected):
    extra = [] if argv == [] else ["--out", str(tmp_path / "r")]
    r = cli("evolve", *argv, *extra)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and expected in r.err, r.err
    assert not (tmp_path / "r").exists()


def test_resume_with_other_settings_is_refused_and_run_untouched(cli, tmp_path):
    with stop_after(1):
        evolve(_cfg(), tmp_path / "r", progress=False, echo=lambda s: None)
    before = (tmp_path / "r" / "state.pt").read_bytes()
    r = cli("evolve", "--resume", tmp_path / "r", "--image-size", "8", "--train-per-class", "4", "--epochs", "3")
    assert r.code == 2 and "it was run with" in r.err
    assert (tmp_path / "r" / "state.pt").read_bytes() == before


def test_round_to_split_is_recorded_and_used_by_extract(tmp_path, cli):
    cfg = _cfg(round_to=8, eval_every=2, split_rate=0.3)  # ceil(0.3*C): 5/10/20 -> rounded 8/16/24
    cfg.generations = 1
    evolve(cfg, tmp_path / "r", progress=False, echo=lambda s: None)
    meta = torch.load(tmp_path / "r" / "gen1" / "last.pt", weights_only=True)["meta"]
    assert meta["split"] == {"mode": "kels", "rate": 0.3, "round_to": 8}
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["kind"] == "epoch"]
    assert "fit_acc" in epochs[1] and all("fit_acc" in x for x in epochs[1::2])
    r = cli("extract", tmp_path / "r" / "gen1" / "last.pt", "--split-rate", "0.3")
    assert r.code == 0, r.err
    slim = load(tmp_path / "r" / "gen1" / "last.slim.pt")
    assert slim.conv1.out_channels == 8 and slim.layer2[0].conv1.out_channels == 16
    assert slim.layer3[0].conv1.out_channels == 24
    assert torch.load(tmp_path / "r" / "gen1" / "last.slim.pt", weights_only=True)["meta"]["split"]["round_to"] == 8


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes: trains data-parallel, rank 0 writes a complete run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", "-m", "slimkit", "evolve",
           "--generations", "2", "--epochs", "2", "--train-per-class", "8", "--image-size", "8", "--out", str(tmp_path / "d")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert p.stderr.count("generation 2/2") == 1 and p.stdout.count("wrote") == 1  # rank 0 only
    lines = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines].count("epoch") == 4  # logged once, not once per rank
    assert load(tmp_path / "d" / "gen2" / "last.pt").slimkit_spec.arch == "cifar_resnet"


_DDP_SCRIPT = """
import sys
from slimkit.methods.ke.evolve import EvolveConfig, evolve
from slimkit.engine.loop import TrainConfig
from slimkit.engine.testhooks import stop_after

cfg = EvolveConfig(arch="cifar_resnet", generations=2, image_size=8, train_per_class=8,
                   train=TrainConfig(epochs=2, batch_size=16, warmup_epochs=1))
stop = int(sys.argv[3])
with stop_after(stop or None):
    evolve(cfg, sys.argv[1], resume=sys.argv[2] == "resume", progress=False)
"""


@pytest.mark.slow
def test_ddp_resume_equals_uninterrupted_ddp(tmp_path):
    """2 gloo processes stopped mid generation 2, then resumed: the same final weights as an uninterrupted DDP run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run_evolve.py"
    script.write_text(_DDP_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")

    def launch(out, mode, stop):
        cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29518", str(script), str(out), mode, str(stop)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stderr[-2000:]

    launch(tmp_path / "full", "new", 0)
    launch(tmp_path / "cut", "new", 3)  # both ranks stop after epoch 1 of generation 2
    st = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    assert (st["generation"], st["epochs_done"]) == (2, 1) and not (tmp_path / "cut" / "gen2").exists()
    launch(tmp_path / "cut", "resume", 0)
    a = torch.load(tmp_path / "full" / "gen2" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "gen2" / "last.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and DDP really ran: a single-process run of the same settings ends elsewhere
    solo = torch.load(tmp_path / "full" / "gen1" / "last.pt", weights_only=True)["state_dict"]
    cfg = _cfg()
    cfg.train_per_class, cfg.generations = 8, 1
    evolve(cfg, tmp_path / "solo", progress=False, echo=lambda s: None)
    one = torch.load(tmp_path / "solo" / "gen1" / "last.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(solo[k], one[k]) for k in solo)


def test_cskd_term_and_pairs():
    from slimkit.data.digits import digits
    from slimkit.engine.loop import _ClassPairs, cskd_term

    z = torch.randn(5, 10)
    assert float(cskd_term(z, z)) == pytest.approx(0.0, abs=1e-6)  # identical predictions: no penalty
    assert float(cskd_term(z, torch.randn(5, 10))) > 0
    ds = digits("train")
    pairs = _ClassPairs(ds, seed=0)
    y = torch.tensor([0, 3, 3, 9])
    x2 = pairs.partners(y)
    labels = ds.tensors[1]
    for img, c in zip(x2, y):  # every partner is an image of the same class
        match = (ds.tensors[0] == img).flatten(1).all(1)
        assert set(labels[match].tolist()) == {int(c)}


def test_cskd_run(tmp_path):
    cfg = _cfg()
    cfg.train.loss = "cskd"
    evolve(cfg, tmp_path / "k", progress=False, echo=lambda s: None)
    evolve(_cfg(), tmp_path / "ce", progress=False, echo=lambda s: None)  # same seed, cross-entropy
    k = torch.load(tmp_path / "k" / "gen2" / "last.pt", weights_only=True)["state_dict"]
    ce = torch.load(tmp_path / "ce" / "gen2" / "last.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(k[n], ce[n]) for n in k)  # the CS-KD term really trained the network
    first = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("k", "ce")]
    assert first[0]["loss"] > first[1]["loss"]  # CS-KD adds a KL term (>= 0) to the same cross-entropy


@pytest.mark.slow
def test_torchvision_net_on_an_image_folder_end_to_end(cli, tmp_path):
    """resnet18 at 224x224 on an ImageFolder tree: evolve, then extract and compare the last generation."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / "tv" / split / c).mkdir(parents=True)
            for i in range(n):
                img = (torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(img).save(tmp_path / "tv" / split / c / f"{i}.jpg")
    r = cli("evolve", "--arch", "resnet18", "--data", tmp_path / "tv", "--generations", "2", "--epochs", "1",
            "--warmup-epochs", "0", "--batch-size", "4", "--out", tmp_path / "run")
    assert r.code == 0, r.err
    last = tmp_path / "run" / "gen2" / "last.pt"
    assert load(last).slimkit_spec.input_shape == (3, 224, 224)
    r = cli("extract", last, "--split-rate", "0.5")
    assert r.code == 0, r.err
    assert load(tmp_path / "run" / "gen2" / "last.slim.pt").layer4[0].conv1.out_channels == 256
    r = cli("compare", last, "--split-rate", "0.5", "--data", tmp_path / "tv", "--batch", "1", "--runs", "2",
            "--warmup", "1", "--out", tmp_path / "cmp")
    assert r.code == 0, r.err
    rep = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert rep["dense"]["n"] == 4 and rep["slim"]["macs"] < 0.3 * rep["dense"]["macs"]


def test_cuda_layout_and_autocast_rehearsed_on_cpu(tmp_path, monkeypatch):
    """What only CUDA runs do to the model (channels_last weights and inputs, bf16 autocast), done on the CPU:
    re-initialisation, extraction, checkpoints and resume must all still hold."""
    import slimkit.engine.loop as L
    import slimkit.methods.ke.evolve as E

    def prepare(model, device):
        return model.to(device).to(memory_format=torch.channels_last)

    monkeypatch.setattr(L, "_autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    monkeypatch.setattr(L, "_layout", lambda x, device: x.contiguous(memory_format=torch.channels_last))
    monkeypatch.setattr(E, "prepare_model", prepare)
    quiet = lambda s: None  # noqa: E731
    full = evolve(_cfg(), tmp_path / "full", progress=False, echo=quiet)
    with stop_after(3):
        evolve(_cfg(), tmp_path / "cut", progress=False, echo=quiet)
    evolve(_cfg(), tmp_path / "cut", resume=True, progress=False, echo=quiet)
    a = torch.load(tmp_path / "full" / "gen2" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "gen2" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) and a[k].is_contiguous() for k in a)  # checkpoints are written contiguous
    monkeypatch.undo()
    ref = torch.load(tmp_path / "full" / "gen1" / "last.pt", weights_only=True)["state_dict"]
    fp32 = evolve(_cfg(), tmp_path / "fp32", progress=False, echo=quiet)
    c = torch.load(tmp_path / "fp32" / "gen1" / "last.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(ref[k], c[k]) for k in ref)  # the rehearsal really trained in bf16
    assert len(full) == len(fp32) == 2


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    cfg = _cfg()
    cfg.generations = 1
    first = evolve(cfg, tmp_path / "r", progress=False, echo=lambda s: None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r" / "gen1").iterdir()}
    said = []
    again = evolve(cfg, tmp_path / "r", resume=True, progress=False, echo=said.append)
    assert again == first and said == [f"{tmp_path / 'r'} is already complete (1 of 1 generations); nothing to do"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "r" / "gen1").iterdir()} == before
