"""Merging: big student == mean of teachers, gates, compression == gated student, the pipeline, resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import randomize_bn, rel_err

from slimkit import create_model, load, save
from slimkit.core.errors import SlimkitError
from slimkit.engine.loop import TrainConfig
from slimkit.engine.testhooks import stop_after
from slimkit.engine.train import TrainRunConfig, train
from slimkit.methods.merge.merging import MergeConfig, merge
from slimkit.methods.merge.transform import (
    BETA,
    GAMMA,
    LOG_ALPHA_INIT,
    ZETA,
    GatedStudent,
    compress,
    concat_teachers,
    gate_plan,
)

ARCHS = [
    ("cifar_resnet", dict(depth=8, width=8, num_classes=5, in_chans=1, image_size=8)),
    ("small_vgg", dict(num_classes=4)),
    ("mlp", dict(num_classes=3, hidden=(12, 6))),
    ("resnet18", dict(num_classes=5)),
    ("resnet34", dict(num_classes=3)),
    ("resnet50", dict(num_classes=4)),
]


def _teachers(arch: str, kw: dict, seeds=(1, 2)):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(randomize_bn(create_model(arch, **kw), seed=s))
    return out


def _inputs(model, n=3, seed=7):
    return torch.randn(n, *model.slimkit_spec.input_shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,kw", ARCHS, ids=[a for a, _ in ARCHS])
def test_big_student_logits_equal_the_mean_of_the_teachers(arch, kw):
    a, b = _teachers(arch, kw)
    big = concat_teachers(a, b)
    x = _inputs(a)
    with torch.no_grad():
        assert rel_err(big(x), (a(x) + b(x)) / 2) <= 1e-5
    # double width everywhere inside, the classes unchanged; the teachers are untouched
    assert sum(p.numel() for p in big.parameters()) > 2 * sum(p.numel() for p in a.parameters())
    assert big(x).shape == a(x).shape
    with torch.no_grad():
        assert rel_err(a(x), _teachers(arch, kw)[0](x)) == 0.0


@pytest.mark.slow
def test_big_student_of_vgg11_bn_equals_the_mean():
    a, b = _teachers("vgg11_bn", dict(num_classes=3))
    big = concat_teachers(a, b)
    x = _inputs(a, n=2)
    with torch.no_grad():
        assert rel_err(big(x), (a(x) + b(x)) / 2) <= 1e-5


def test_big_student_structure():
    a, b = _teachers("cifar_resnet", dict(depth=8, width=8, num_classes=5, in_chans=1, image_size=8))
    big = concat_teachers(a, b)
    w = big.stem[0].weight if hasattr(big, "stem") else next(m for m in big.modules() if isinstance(m, torch.nn.Conv2d)).weight
    first_a = next(m for m in a.modules() if isinstance(m, torch.nn.Conv2d)).weight
    assert w.shape[0] == 2 * first_a.shape[0] and w.shape[1] == first_a.shape[1]  # stacked over the shared image
    convs = [(n, m) for n, m in big.named_modules() if isinstance(m, torch.nn.Conv2d)]
    name, inner = convs[1]
    ca = dict(a.named_modules())[name].weight
    o, i = ca.shape[:2]
    assert torch.equal(inner.weight[:o, :i], ca) and torch.equal(inner.weight[o:, i:], dict(b.named_modules())[name].weight)
    assert inner.weight[:o, i:].abs().sum() == 0 and inner.weight[o:, :i].abs().sum() == 0  # cross blocks start at 0
    bn_name = next(n for n, m in a.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn, bna, bnb = (dict(m.named_modules())[bn_name] for m in (big, a, b))
    assert torch.equal(bn.running_mean, torch.cat([bna.running_mean, bnb.running_mean]))
    assert torch.equal(bn.running_var, torch.cat([bna.running_var, bnb.running_var]))


@pytest.mark.parametrize("arch,kw,layer", [
    ("densenet121", dict(num_classes=3), "concat"),
    ("mobilenet_v2", dict(num_classes=3), "features.1.conv.0.0"),
])
def test_unsupported_architectures_are_refused_naming_the_layer(arch, kw, layer):
    a, b = _teachers(arch, kw)
    with pytest.raises(SlimkitError, match="layer ") as e:
        concat_teachers(a, b)
    assert layer in str(e.value)


def test_mismatched_teachers_are_refused():
    a = create_model("cifar_resnet", depth=8, width=8, num_classes=5)
    with pytest.raises(SlimkitError, match="differ in num_classes"):
        concat_teachers(a, create_model("cifar_resnet", depth=8, width=8, num_classes=6))
    with pytest.raises(SlimkitError, match="differ in architecture"):
        concat_teachers(a, create_model("small_vgg", num_classes=5))
    with pytest.raises(SlimkitError, match="differ in image_size"):
        concat_teachers(a, create_model("cifar_resnet", depth=8, width=8, num_classes=5, image_size=16))


def test_gates_follow_the_hard_concrete_definition():
    a, b = _teachers("cifar_resnet", dict(depth=8, width=8, num_classes=5, in_chans=1, image_size=8))
    g = GatedStudent(concat_teachers(a, b))
    # one gate vector per channel group: a residual stream is one group gating several BN outputs
    assert any(len(t) > 1 for t in g.targets)
    assert all(len(la) == grp.size for la, grp in zip(g.log_alpha, g.groups))
    p0 = 1 / (1 + math.exp(-(LOG_ALPHA_INIT - BETA * math.log(-GAMMA / ZETA))))
    assert all(torch.allclose(p, torch.full_like(p, p0)) for p in g.p_open())
    assert abs(float(g.penalty().detach()) - len(g.groups) * (0.5 - p0) ** 2) < 1e-6
    z_eval = min(1.0, max(0.0, (1 / (1 + math.exp(-LOG_ALPHA_INIT))) * (ZETA - GAMMA) + GAMMA))
    assert all(torch.allclose(z, torch.full_like(z, z_eval)) for z in g.eval().gates())
    x = _inputs(a)
    with torch.no_grad():
        assert torch.equal(g.eval()(x), g.eval()(x))  # deterministic in eval
        g.train()
        torch.manual_seed(0)
        y1 = g(x)
        y2 = g(x)
        assert not torch.equal(y1, y2)  # stochastic in training
        z = torch.cat(g.gates(deterministic=False))
        assert z.min() >= 0 and z.max() <= 1


def test_fully_open_gates_leave_the_big_student_unchanged():
    a, b = _teachers("resnet18", dict(num_classes=5))
    big = concat_teachers(a, b)
    g = GatedStudent(big).eval()
    with torch.no_grad():
        for la in g.log_alpha:
            la.fill_(20.0)  # z = clamp(1.2 - 0.1) = 1
        x = _inputs(a, n=2)
        assert rel_err(g(x), big(x)) <= 1e-6


@pytest.mark.parametrize("arch,kw", ARCHS[:4], ids=[a for a, _ in ARCHS[:4]])
def test_compressed_student_equals_the_gated_student_with_dropped_gates_closed(arch, kw):
    a, b = _teachers(arch, kw)
    g = GatedStudent(concat_teachers(a, b)).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for la in g.log_alpha:
            la.copy_(torch.randn(la.shape, generator=gen) * 3)  # some gates fractional, some shut, some open
    small, plan = compress(g, a)
    # exactly the teachers' architecture
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in a.state_dict().items()}
    assert small.slimkit_spec == a.slimkit_spec
    # every gated group keeps exactly half, the largest log alpha
    for grp, la in zip(g.groups, g.log_alpha):
        p = grp.producers[0]
        kept_roots = sorted(r for loc, r in zip(p.local, p.root) if loc in set(plan.keep[p.name]))
        assert len(kept_roots) == grp.size // 2
        assert la[kept_roots].min() >= la[[i for i in range(grp.size) if i not in kept_roots]].max()
    x = _inputs(a)
    with torch.no_grad():
        before = g(x)
        for grp, la in zip(g.groups, g.log_alpha):
            p = grp.producers[0]
            kept = set(plan.keep[p.name])
            drop = [r for loc, r in zip(p.local, p.root) if loc not in kept]
            la[drop] = -50.0  # closed: z = 0
        want = g(x)
    assert rel_err(small(x), want) <= 1e-5
    assert rel_err(small(x), before) > 1e-3  # the dropped channels did matter: the check is not vacuous


def test_gate_plan_is_consistent_across_a_residual_stream():
    a, b = _teachers("resnet18", dict(num_classes=5))
    g = GatedStudent(concat_teachers(a, b))
    with torch.no_grad():
        for la in g.log_alpha:
            la.copy_(torch.randn(la.shape))
    plan = gate_plan(g)
    stream = next(grp for grp in g.groups if len(grp.producers) > 2)
    kept = {plan.keep[p.name] for p in stream.producers}
    assert len(kept) == 1  # every tensor added into the stream keeps the same channels


def test_big_student_checkpoint_round_trip(tmp_path):
    a, b = _teachers("cifar_resnet", dict(depth=8, width=8, num_classes=5, in_chans=1, image_size=8))
    big = concat_teachers(a, b)
    back = load(save(big, tmp_path / "big.pt"))
    x = _inputs(a)
    with torch.no_grad():
        assert torch.equal(back(x), big(x))
    with pytest.raises(SlimkitError, match="dense teachers"):
        concat_teachers(back, back)


# --- the pipeline ----------------------------------------------------------------------------------

def _train_cfg(seed: int) -> TrainRunConfig:  # a small conv net keeps the pipeline tests fast
    return TrainRunConfig(arch="small_vgg", image_size=8, train_per_class=6,
                          train=TrainConfig(epochs=2, batch_size=16, seed=seed))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    for s in (1, 2):
        train(_train_cfg(s), d / f"t{s}", progress=False, echo=lambda s: None)
    return d / "t1" / "last.pt", d / "t2" / "last.pt"


def _merge_cfg(**kw) -> MergeConfig:
    base = dict(train_per_class=6, gate=TrainConfig(epochs=2, lr=0.01, batch_size=16),
                finetune=TrainConfig(epochs=2, lr=0.01, warmup_epochs=1, batch_size=16))
    return MergeConfig(**{**base, **kw})


def test_merge_writes_a_complete_run(teachers, tmp_path):
    summary = merge(_merge_cfg(), list(teachers), tmp_path / "m", progress=False, echo=lambda s: None)
    out = tmp_path / "m"
    for f in ("big.pt", "compressed.pt", "last.pt", "metrics.jsonl", "summary.md", "gates.png", "curves.png"):
        assert (out / f).is_file(), f
    t = load(teachers[0])
    last = load(out / "last.pt")
    assert last.slimkit_spec == t.slimkit_spec
    assert summary["params"] == summary["teacher_params"] == sum(p.numel() for p in t.parameters())
    # the big student's accuracy is the ensemble's: its logits are the mean of the teachers'
    assert summary["big_student"] == summary["ensemble"]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gates = [r for r in recs if r.get("phase") == "gates"]
    assert len(gates) == 2 and all(0 <= v <= 1 for r in gates for v in r["open_fraction"].values())
    assert gates[1]["lambda"] == pytest.approx(1.0 + math.sqrt(1.0))  # lambda += step * sqrt(lambda)
    text = (out / "summary.md").read_text()
    for row in ("teacher A", "teacher B", "ensemble", "big student", "compressed", "fine-tuned"):
        assert row in text
    compressed = load(out / "compressed.pt")
    assert compressed.slimkit_spec == t.slimkit_spec


@pytest.mark.parametrize("stop", [1, 3], ids=["in-gate-phase", "in-finetune-phase"])
def test_merge_resume_equals_uninterrupted(teachers, tmp_path, stop):
    merge(_merge_cfg(), list(teachers), tmp_path / "full", progress=False, echo=lambda s: None)
    with stop_after(stop):
        merge(_merge_cfg(), list(teachers), tmp_path / "cut", progress=False, echo=lambda s: None)
    assert not (tmp_path / "cut" / "last.pt").exists()
    merge(_merge_cfg(), list(teachers), tmp_path / "cut", resume=True, progress=False, echo=lambda s: None)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_refuses_missing_data_without_writing(cli, tmp_path):
    r = cli("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert r.code == 2 and "does not exist" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_train_resume_equals_uninterrupted(tmp_path):
    train(_train_cfg(3), tmp_path / "full", progress=False, echo=lambda s: None)
    with stop_after(1):
        train(_train_cfg(3), tmp_path / "cut", progress=False, echo=lambda s: None)
    train(_train_cfg(3), tmp_path / "cut", resume=True, progress=False, echo=lambda s: None)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_train_and_merge(cli, tmp_path, teachers):
    r = cli("train", "--image-size", "8", "--train-per-class", "5", "--epochs", "1", "--seed", "4", "--out", tmp_path / "t")
    assert r.code == 0, r.err
    assert (tmp_path / "t" / "last.pt").is_file() and "test accuracy" in r.err  # commentary: stderr
    r = cli("merge", *teachers, "--train-per-class", "6", "--gate-epochs", "1", "--finetune-epochs", "1",
            "--out", tmp_path / "m")
    assert r.code == 0, r.err
    assert "merged student after fine-tuning" in r.err and (tmp_path / "m" / "last.pt").is_file()


def _bad_merge_inputs(tmp_path, teachers):
    other = save(create_model("mlp", num_classes=10), tmp_path / "mlp.pt")
    classes = save(create_model("small_vgg", num_classes=7, in_chans=1, image_size=8), tmp_path / "c7.pt")
    shape = save(create_model("small_vgg", num_classes=10, in_chans=1, image_size=16), tmp_path / "s16.pt")
    torch.save(load(teachers[1]).state_dict(), tmp_path / "plain.pt")
    t1, t2 = teachers
    common = ["--train-per-class", "6", "--out", tmp_path / "out"]
    return {
        "arch": (["merge", t1, other, *common], "differ in architecture"),
        "classes": (["merge", t1, classes, *common], "differ in num_classes"),
        "shape": (["merge", t1, shape, *common], "differ in image_size"),
        "plain-no-arch": (["merge", t1, tmp_path / "plain.pt", *common], "--arch"),
        "gate-epochs-0": (["merge", t1, t2, "--gate-epochs", "0", *common], "positive integer"),
        "finetune-epochs-neg": (["merge", t1, t2, "--finetune-epochs", "-3", *common], "positive integer"),
        "one-teacher": (["merge", t1, *common], "exactly two"),
        "same-teacher": (["merge", t1, t1, *common], "independently trained"),
        "no-out": (["merge", t1, t2], "--out"),
    }


@pytest.mark.parametrize("case", ["arch", "classes", "shape", "plain-no-arch", "gate-epochs-0",
                                  "finetune-epochs-neg", "one-teacher", "same-teacher", "no-out"])
def test_merge_bad_input_one_line_exit_2_nothing_written(cli, tmp_path, teachers, case):
    argv, expected = _bad_merge_inputs(tmp_path, teachers)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli(*argv)
    assert r.code == 2 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output directory created


def test_merge_ddp_two_cpu_processes(tmp_path, teachers):
    """torchrun with 2 gloo processes: gates and fine-tuning train data-parallel, rank 0 writes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29519", "-m", "slimkit", "merge", *map(str, teachers),
           "--train-per-class", "6", "--gate-epochs", "2", "--finetune-epochs", "1", "--out", str(tmp_path / "d")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("wrote") == 1  # rank 0 only
    recs = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("phase") for r in recs if r["kind"] == "epoch"] == ["gates", "gates", "finetune"]
    assert load(tmp_path / "d" / "last.pt").slimkit_spec == load(teachers[0]).slimkit_spec


@pytest.mark.parametrize("verb", ["train", "evolve", "merge", "den"])
@pytest.mark.parametrize("device,msg", [("cuda", "CUDA is not available"), ("tpu", "unknown device")])
def test_device_refusals(cli, tmp_path, teachers, verb, device, msg):
    if torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has a GPU")
    extra = [*teachers, "--train-per-class", "6"] if verb == "merge" else []
    r = cli(verb, *extra, "--device", device, "--out", tmp_path / "r")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and msg in r.err, r.err
    assert not (tmp_path / "r").exists()


def test_device_auto_is_cpu_here_and_bit_identical_to_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    train(_train_cfg(5), tmp_path / "a", progress=False, echo=lambda s: None, device="auto")
    train(_train_cfg(5), tmp_path / "c", progress=False, echo=lambda s: None, device="cpu")
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state_dict"]
    c = torch.load(tmp_path / "c" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_cuda_layout_and_autocast_rehearsed_on_cpu(teachers, tmp_path, monkeypatch):
    """channels_last weights and inputs and bf16 autocast (what CUDA runs do), on the CPU: gates, compression,
    fine-tuning and resume in the gate phase must still work and agree."""
    import slimkit.engine.loop as L
    import slimkit.methods.merge.merging as M

    monkeypatch.setattr(L, "_autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    monkeypatch.setattr(L, "_layout", lambda x, device: x.contiguous(memory_format=torch.channels_last))
    monkeypatch.setattr(M, "prepare_model", lambda m, device: m.to(device).to(memory_format=torch.channels_last))
    quiet = lambda s: None  # noqa: E731
    s = merge(_merge_cfg(), list(teachers), tmp_path / "full", progress=False, echo=quiet)
    with stop_after(1):
        merge(_merge_cfg(), list(teachers), tmp_path / "cut", progress=False, echo=quiet)
    merge(_merge_cfg(), list(teachers), tmp_path / "cut", resume=True, progress=False, echo=quiet)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) and a[k].is_contiguous() for k in a)
    assert load(tmp_path / "full" / "last.pt").slimkit_spec == load(teachers[0]).slimkit_spec
    assert s["big_student"] == s["ensemble"]


TINY_NET = """
from torch import nn


def tiny(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
"""


def test_a_student_without_an_image_size_argument_keeps_the_teachers_input_shape(tmp_path, monkeypatch):
    # torchvision, timm and a user's own network take no image-size argument: trained at --image-size 8,
    # the input shape lives only in the checkpoint's spec, and the merged student was recorded at
    # its source's default, 3x224x224
    import sys

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "mergenets_tiny.py").write_text(TINY_NET)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    arch = "mergenets_tiny:tiny"
    try:
        for s in (1, 2):
            save(_teachers(arch, {"num_classes": 10, "input_shape": (3, 8, 8)}, seeds=(s,))[0], tmp_path / f"t{s}.pt")
        teachers = [tmp_path / "t1.pt", tmp_path / "t2.pt"]
        cfg = _merge_cfg(train_per_class=2, gate=TrainConfig(epochs=1, lr=0.01, batch_size=16),
                         finetune=TrainConfig(epochs=2, lr=0.01, warmup_epochs=1, batch_size=16))
        # stopped in the fine-tuning phase and resumed: the student is rebuilt from state.pt there
        with stop_after(2):
            merge(cfg, teachers, tmp_path / "m", arch=arch, progress=False, echo=lambda s: None)
        merge(cfg, teachers, tmp_path / "m", arch=arch, resume=True, progress=False, echo=lambda s: None)
        for name in ("compressed.pt", "last.pt"):
            assert load(tmp_path / "m" / name, arch=arch).slimkit_spec.input_shape == (3, 8, 8), name
    finally:
        sys.modules.pop("mergenets_tiny", None)
