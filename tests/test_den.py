"""DEN: every step proven on its own, plus the pipeline, the task specs and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from slimkit import create_model, load
from slimkit.core.errors import SlimkitError
from slimkit.engine.testhooks import stop_after
from slimkit.methods.den import steps as D
from slimkit.methods.den.config import DENConfig
from slimkit.methods.den.sequence import run_den
from slimkit.methods.den.tasks import auroc, make_tasks


def _net(hidden=(12, 6), heads=(2,), seed=0):
    torch.manual_seed(seed)
    return create_model("den_mlp", hidden=hidden, heads=heads)


def _data(n=64, seed=0, col=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return TensorDataset(x, (x.flatten(1)[:, col] > 0).long())


def test_selection_is_a_breadth_first_search_through_nonzero_weights():
    net = _net(hidden=(5, 4), heads=(2, 3))
    with torch.no_grad():
        for m in [*net.hidden, *net.heads]:
            m.weight.zero_()
        net.heads[1].weight[0, 2] = 1.0   # head 2 reads top unit 2 only
        net.hidden[1].weight[2, 0] = 0.5  # top unit 2 reads layer-0 units 0 and 3
        net.hidden[1].weight[2, 3] = -0.1
        net.hidden[1].weight[1, 4] = 1.0  # unit 1 is not selected, so unit 4 below is not reached
    assert D.select_units(net, 2) == [[0, 3], [2]]
    masks = D.selected_masks(net, [[0, 3], [2]], 2)
    assert masks["hidden.1.weight"].nonzero().tolist() == [[2, 0], [2, 3]]
    assert masks["hidden.0.weight"].sum() == 2 * 64  # rows 0 and 3, every input


def test_fit_changes_only_the_masked_entries():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    masks = D.selected_masks(net, [[1, 3], [0]], 1)
    D.train_task(net, 1, _data(), masks, epochs=3, lr=0.1, penalties=D.Penalties(l2=1e-3))
    after = net.state_dict()
    for name, m in masks.items():
        changed = after[name] != before[name]
        if m is not None:
            assert not (changed & ~m).any(), name  # nothing outside the mask moved
            assert changed.any(), name
    assert torch.equal(after["stamp0"], before["stamp0"])


def test_l1_and_group_lasso_reach_exact_zeros():
    net = _net()
    D.train_task(net, 1, _data(), {n: None for n, _ in net.named_parameters()}, epochs=5, lr=0.1,
          penalties=D.Penalties(l1=0.5))
    assert (net.hidden[0].weight == 0).float().mean() > 0.5
    g = torch.Generator().manual_seed(1)
    D.add_head(net, 2, g)
    D.grow(net, 3, 2, g)
    D.train_task(net, 2, _data(col=5), D.new_unit_masks(net, 2), epochs=5, lr=0.1, penalties=D.Penalties(group=10.0))
    dead = D.dead_units(net, 2)
    assert dead == [[12, 13, 14], [6, 7, 8]]  # a strong group lasso zeroes every new unit's incoming row


def test_growth_is_invisible_to_earlier_tasks():
    net = _net(heads=(2,))
    x = _data().tensors[0]
    y1 = net(x, 1).detach()
    g = torch.Generator().manual_seed(0)
    D.add_head(net, 3, g)
    added = D.grow(net, 4, 2, g)
    assert added == [[12, 13, 14, 15], [6, 7, 8, 9]]
    assert D.widths(net) == [16, 10] and net.stamps()[0].tolist() == [1] * 12 + [2] * 4
    with torch.no_grad():
        assert torch.equal(net(x, 1), y1)  # timestamped inference: task 1 never sees task-2 units
        for m in net.hidden:
            m.weight.add_(torch.randn_like(m.weight) * D.new_unit_masks(net, 2)[f"hidden.{list(net.hidden).index(m)}.weight"])
        assert torch.equal(net(x, 1), y1)  # and training new units (their masks) cannot change it either
    assert net.slimkit_spec.args["hidden"] == (16, 10) and net.slimkit_spec.args["heads"] == (2, 3)


def test_removal_is_physical_exact_and_keeps_timestamps(tmp_path):
    net = _net(heads=(2,))
    g = torch.Generator().manual_seed(0)
    D.add_head(net, 2, g)
    D.grow(net, 4, 2, g)
    with torch.no_grad():  # kill units 13 and 15 of layer 0 and unit 7 of layer 1 the way group lasso does
        for i, units in ((0, [13, 15]), (1, [7])):
            net.hidden[i].weight[units] = 0
            net.hidden[i].bias[units] = 0
    assert D.dead_units(net, 2) == [[13, 15], [7]]
    x = _data().tensors[0]
    want = [net(x, t).detach() for t in (1, 2)]
    D.remove_units(net, D.dead_units(net, 2))
    assert D.widths(net) == [14, 9]
    assert net.stamps()[0].tolist() == [1] * 12 + [2, 2] and net.stamps()[1].tolist() == [1] * 6 + [2, 2, 2]
    with torch.no_grad():
        for t, w in zip((1, 2), want):
            assert torch.allclose(net(x, t), w, atol=1e-6)
    back = load(__import__("slimkit").save(net, tmp_path / "den.pt"))  # checkpoints rebuild the grown widths
    with torch.no_grad():
        assert torch.equal(back(x, 2), net(x, 2)) and torch.equal(back.stamp0, net.stamp0)
    with pytest.raises(SlimkitError, match="empty hidden layer"):
        D.remove_units(net, [list(range(14)), []])


def test_split_restores_old_units_exactly_and_copies_keep_the_new_weights():
    net = _net(heads=(2,))
    task1 = _data()
    D.train_task(net, 1, task1, {n: None for n, _ in net.named_parameters()}, epochs=3, lr=0.1)
    x = task1.tensors[0]
    y1 = net(x, 1).detach()
    snap = D.snapshot(net)
    g = torch.Generator().manual_seed(0)
    D.add_head(net, 2, g)
    D.train_task(net, 2, _data(col=7), {n: None for n, _ in net.named_parameters() if not n.startswith("heads.0")},
          epochs=3, lr=0.1)  # everything old drifts
    rho = D.drift(net, snap)
    assert all((r > 0).all() for r in rho)
    with torch.no_grad():
        assert not torch.allclose(net(x, 1), y1)  # task 1 was forgotten ...
    moved_w0 = net.hidden[0].weight.detach().clone()
    y2 = net(x, 2).detach()
    dup = D.split_units(net, snap, sigma=0.0, task=2)
    assert dup == [list(range(12)), list(range(6))]
    assert D.widths(net) == [24, 12]
    with torch.no_grad():
        assert torch.equal(net(x, 1), y1)  # ... and is back exactly: sigma 0 duplicates every drifted unit
        assert torch.equal(net.hidden[0].weight[12:], moved_w0)  # the copies hold the task-2 weights
        assert torch.equal(net.hidden[0].weight[:12], snap["hidden.0.weight"])
    assert net.stamps()[0].tolist() == [1] * 12 + [2] * 12
    # a threshold above every drift duplicates nothing
    assert D.split_units(net, D.snapshot(net), sigma=1e9, task=2) == [[], []]
    with pytest.raises(SlimkitError, match="sigma"):
        D.split_units(net, snap, sigma=-1.0, task=2)
    del y2


def test_auroc_matches_the_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (40,), generator=g).float()  # many ties
    y = torch.randint(0, 2, (40,), generator=g)
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    assert auroc(s, y) == pytest.approx(float(pairs.mean()))


def test_task_specs():
    split = make_tasks("split")
    assert len(split) == 5 and all(t.classes == 2 and t.binary for t in split)
    assert sorted(split[1].train.tensors[1].unique().tolist()) == [0, 1]
    ovr = make_tasks("onevsrest:3")
    assert len(ovr) == 3 and ovr[2].train.tensors[1].sum() < len(ovr[2].train) / 5
    perm = make_tasks("permuted:3", seed=1)
    assert len(perm) == 3 and perm[0].classes == 10 and not perm[0].binary
    x0, x1 = perm[0].train.tensors[0], perm[1].train.tensors[0]
    assert not torch.equal(x0, x1) and torch.equal(x0.flatten(1).sort(1).values, x1.flatten(1).sort(1).values)
    for bad, msg in [("split:6", "at most split:5"), ("onevsrest:11", "more tasks"), ("permuted", "permuted:N"),
                     ("rotated:3", "unknown task spec"), ("split:0", "positive")]:
        with pytest.raises(SlimkitError, match=msg):
            make_tasks(bad)


def test_den_run_writes_everything_and_keeps_earlier_tasks(tmp_path):
    cfg = DENConfig(tasks="split:3", hidden=(24, 12), epochs=3, expand_on="train", tau=0.0, k=4, sigma=0.0, group=0.01,
                    baselines=("dnn", "stl", "mtl"))
    s = run_den(cfg, tmp_path / "r", progress=False, echo=lambda m: None)
    out = tmp_path / "r"
    for f in ("task1.pt", "task3.pt", "metrics.jsonl", "results.json", "summary.md", "den.png"):
        assert (out / f).is_file(), f
    den = s["results"]["den"]
    assert len(den["R"]) == 3 and [len(r) for r in den["R"]] == [1, 2, 3]
    # tau 0 expands at every later task; sigma 0 restores every drifted old unit: no forgetting at all
    assert all(t["expanded"] for t in s["den_tasks"][1:])
    assert den["forgetting"] == 0.0 and den["R"][2][0] == den["R"][0][0]
    assert s["results"]["stl"]["params"] > s["results"]["dnn"]["params"]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in recs} == {"den", "dnn", "stl", "mtl"}
    net = load(out / "task3.pt")
    assert net.slimkit_spec.args["hidden"] == tuple(s["den_tasks"][-1]["widths"])
    x = torch.randn(8, *net.slimkit_spec.input_shape)
    for t in (1, 2, 3):  # each task's deployable network answers as the grown network does for that task
        sub = load(out / "deploy" / f"task{t}.pt")
        with torch.no_grad():
            torch.testing.assert_close(sub(x), net(x, t), rtol=1e-5, atol=1e-6)
    text = (out / "summary.md").read_text()
    for word in ("R[i][j]", "forgetting", "selected", "duplicated", "STL"):
        assert word in text


def test_den_resume_equals_uninterrupted(tmp_path):
    """Stopped after task 2 and again after the first baseline, then resumed: the same results and networks."""
    cfg = DENConfig(tasks="split:3", hidden=(16, 8), epochs=2, expand_on="train", tau=0.0, k=3, sigma=0.1,
                    baselines=("dnn", "stl"))
    quiet = lambda m: None  # noqa: E731
    full = run_den(cfg, tmp_path / "full", progress=False, echo=quiet)
    with stop_after(2):
        assert run_den(cfg, tmp_path / "cut", progress=False, echo=quiet) is None
    assert (tmp_path / "cut" / "task2.pt").exists() and not (tmp_path / "cut" / "task3.pt").exists()
    with stop_after(2):
        assert run_den(cfg, tmp_path / "cut", progress=False, echo=quiet, resume=True) is None  # task 3, dnn
    cut = run_den(cfg, tmp_path / "cut", progress=False, echo=quiet, resume=True)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert strip(cut["den_tasks"]) == strip(full["den_tasks"])
    assert cut["results"] == full["results"]
    a = torch.load(tmp_path / "full" / "task3.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "task3.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("task", r.get("method")) for r in recs] == [1, 2, 3, "dnn", "stl"]  # each step logged once


def test_holdout_is_a_seeded_share_of_every_class():
    from slimkit.methods.den.sequence import _holdout

    y = torch.tensor([0] * 10 + [1] * 5 + [2])  # 20% of 10 is 2, of 5 is 1; a class of one keeps its image
    x = torch.arange(len(y), dtype=torch.float32)[:, None]
    rest, held = _holdout(TensorDataset(x, y), 0.2, seed=3)
    assert sorted(held.tensors[1].tolist()) == [0, 0, 1]
    assert sorted(rest.tensors[0].flatten().tolist() + held.tensors[0].flatten().tolist()) == list(range(16))
    again = _holdout(TensorDataset(x, y), 0.2, seed=3)[1]
    assert torch.equal(again.tensors[0], held.tensors[0])


@pytest.mark.slow
def test_val_rule_expands_where_the_training_loss_rule_cannot(tmp_path):
    """10 images a class are fitted to a training loss far below tau, so the paper's rule never expands, while the
    split (anchored hard towards W^1, no unit duplicated) leaves task 2 well below a network trained on task 2
    alone (STL, computed by its own baseline run). The validation rule sees that on held-out images and expands;
    the new units lift task 2."""
    common = dict(tasks="permuted:2", train_per_class=10, hidden=(64,), drift_lambda=1.0, sigma=100.0, seed=0)
    quiet = lambda m: None  # noqa: E731
    old = run_den(DENConfig(expand_on="train", baselines=("stl",), **common), tmp_path / "train", progress=False,
                  echo=quiet)
    new = run_den(DENConfig(expand_on="val", baselines=(), **common), tmp_path / "val", progress=False, echo=quiet)
    t2_old, t2_new = old["den_tasks"][1], new["den_tasks"][1]
    assert t2_old["loss_selective"] < DENConfig.tau and not t2_old["expanded"]
    stl_task2 = old["results"]["stl"]["R"][1][1]
    assert old["results"]["den"]["R"][1][1] < stl_task2 - 0.05  # where expansion should have fired
    assert t2_new["expanded"] and t2_new["added"] > 0 and t2_new["val_acc"] < t2_new["val_ref"] - DENConfig.tau_val
    assert new["results"]["den"]["R"][1][1] > old["results"]["den"]["R"][1][1] + 0.03
    assert new["den_tasks"][1]["widths"][0] > 64 and old["den_tasks"][1]["widths"][0] == 64


def test_den_resume_refusals(cli, tmp_path):
    r = cli("den", "--resume", tmp_path / "nothing")
    assert r.code == 2 and "holds no den run" in r.err
    cfg = DENConfig(tasks="split:2", hidden=(8, 4), epochs=1, baselines=())
    with stop_after(1):
        run_den(cfg, tmp_path / "r", progress=False, echo=lambda m: None)
    before = (tmp_path / "r" / "state.pt").read_bytes()
    r = cli("den", "--resume", tmp_path / "r", "--tasks", "split:2", "--arch", "mlp:8,4", "--epochs", "2",
            "--baselines", "none")
    assert r.code == 2 and "it was run with epochs=1" in r.err, r.err
    assert (tmp_path / "r" / "state.pt").read_bytes() == before


@pytest.mark.parametrize("argv,msg", [
    (["--tasks", "split:7"], "at most split:5"),
    (["--tasks", "nope"], "unknown task spec"),
    (["-k", "0"], "positive integer"),
    (["--sigma", "-0.5"], "non-negative"),
    (["--tau", "nan"], "non-negative"),
    (["--val-fraction", "1"], "val_fraction must be in (0, 1)"),
    (["--arch", "resnet18"], "--arch must be mlp"),
    (["--arch", "conv"], "--arch must be mlp"),
    (["--baselines", "dnn,bogus"], "unknown baseline"),
])
def test_den_bad_input(cli, tmp_path, argv, msg):
    r = cli("den", *argv, "--out", tmp_path / "r")
    assert r.code == 2 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], r.err
    assert not (tmp_path / "r").exists()


def test_conv_units_are_channels_through_every_step(tmp_path):
    torch.manual_seed(0)
    net = create_model("den_conv", channels=(6, 8), hidden=(5,), heads=(2,))
    task1, task2 = _data(n=48), _data(n=48, col=9)
    D.train_task(net, 1, task1, {n: None for n, _ in net.named_parameters()}, 3, 0.05, penalties=D.Penalties(l1=1e-2))
    x = task1.tensors[0]
    y1 = net(x, 1).detach()
    snap = D.snapshot(net)
    g = torch.Generator().manual_seed(0)
    D.add_head(net, 2, g)
    D.grow(net, 3, 2, g)
    assert D.widths(net) == [9, 11, 8] and net.slimkit_spec.args["channels"] == (9, 11)
    with torch.no_grad():
        assert torch.equal(net(x, 1), y1)  # new channels are invisible to task 1
    D.train_task(net, 2, task2, D.new_unit_masks(net, 2), 3, 0.05, penalties=D.Penalties(group=5.0))
    dead = D.dead_units(net, 2)
    assert sum(map(len, dead)) > 0
    want = net(x, 2).detach()
    D.remove_units(net, dead)  # conv channels removed by the surgery, exactly
    with torch.no_grad():
        assert torch.allclose(net(x, 2), want, atol=1e-6) and torch.equal(net(x, 1), y1)
    D.train_task(net, 2, task2, {n: None for n, _ in net.named_parameters() if not n.startswith("heads.0")}, 3, 0.05)
    assert not torch.allclose(net(x, 1), y1)
    D.split_units(net, snap, 0.0, 2)
    with torch.no_grad():
        assert torch.equal(net(x, 1), y1)
    back = load(__import__("slimkit").save(net, tmp_path / "c.pt"))
    with torch.no_grad():
        assert torch.equal(back(x, 2), net(x, 2))


def test_conv_den_run(tmp_path, cli):
    r = cli("den", "--tasks", "split:2", "--arch", "conv:8,8", "--epochs", "2", "--expand-on", "train", "--tau", "0",
            "-k", "2", "--baselines", "dnn", "--out", tmp_path / "c")
    assert r.code == 0, r.err
    assert "conv 8-8" in (tmp_path / "c" / "summary.md").read_text()


def test_den_on_an_image_folder(tmp_path, cli):
    import numpy as np
    from PIL import Image

    from slimkit.data.digits import digits

    for split in ("train", "test"):
        x, y = digits(split, image_size=8).tensors
        for i in range(0, len(y), 6 if split == "train" else 4):
            d = tmp_path / "imgs" / split / f"c{int(y[i])}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(((x[i, 0].numpy() + 1) * 127.5).astype(np.uint8)).convert("RGB").save(d / f"{i}.png")
    r = cli("den", "--data", tmp_path / "imgs", "--tasks", "split:2", "--arch", "mlp:16,8", "--epochs", "2",
            "--baselines", "none", "--out", tmp_path / "r")
    assert r.code == 0, r.err
    net = load(tmp_path / "r" / "task2.pt")
    assert net.slimkit_spec.input_shape == (3, 8, 8)  # image folders are read as RGB


@pytest.mark.parametrize("arch,kw", [("den_mlp", dict(hidden=(12, 6))), ("den_conv", dict(channels=(6, 8), hidden=(5,)))])
def test_task_network_is_the_physical_subnetwork_of_its_units(arch, kw):
    torch.manual_seed(0)
    net = create_model(arch, heads=(2,), **kw)
    g = torch.Generator().manual_seed(0)
    for t in (2, 3):
        D.add_head(net, 3, g)
        D.grow(net, 2, t, g)
    x = _data(n=16).tensors[0]
    for t in (1, 2, 3):
        sub = D.task_network(net, t)
        n_units = [int((s <= t).sum()) for s in net.stamps()]
        assert D.widths(sub) == n_units and len(sub.heads) == 1  # physically smaller: later units are gone
        with torch.no_grad():
            torch.testing.assert_close(sub(x), net(x, t), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(sub(x, 1), sub(x), rtol=0, atol=0)
    with pytest.raises(SlimkitError, match="task 4 does not exist"):
        D.task_network(net, 4)
