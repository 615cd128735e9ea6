"""Crash anywhere, lose nothing: every training verb stopped at every write boundary, then resumed.

A run is first done without interruption while the hook counts its write boundaries (config,
each metrics line, each state, each checkpoint, summary, plot). Then, for every boundary k, a run
is stopped right after write k (and, separately, in the middle of write k: half a metrics line, or
a temporary file never renamed) and resumed. The resumed run must end with the same weights (bit
for bit: the same computation reruns), the same metrics (timings aside), the same summary and the
same files as the uninterrupted one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slimkit import load
from slimkit.engine.loop import TrainConfig
from slimkit.engine.testhooks import SimulatedCrash, crash_at
from slimkit.engine.train import TrainRunConfig, train
from slimkit.methods.den.config import DENConfig
from slimkit.methods.den.sequence import run_den
from slimkit.methods.ke.evolve import EvolveConfig, evolve
from slimkit.methods.merge.merging import MergeConfig, merge

QUIET = dict(progress=False, echo=lambda s: None)
TIMINGS = ("seconds", "train_seconds")


def _train_cfg(seed: int = 0) -> TrainRunConfig:
    return TrainRunConfig(arch="mlp", image_size=8, train_per_class=3, train=TrainConfig(epochs=2, batch_size=16, seed=seed))


def _evolve_cfg() -> EvolveConfig:
    return EvolveConfig(arch="mlp", generations=2, image_size=8, train_per_class=3,
                        train=TrainConfig(epochs=2, batch_size=16, warmup_epochs=1))


def _merge_cfg() -> MergeConfig:
    return MergeConfig(train_per_class=3, gate=TrainConfig(epochs=2, lr=0.01, batch_size=16),
                       finetune=TrainConfig(epochs=2, lr=0.01, warmup_epochs=1, batch_size=16))


def _den_cfg() -> DENConfig:
    return DENConfig(tasks="split:2", hidden=(8, 4), epochs=1, expand_on="train", tau=0.0, k=2, sigma=0.1,
                     baselines=("dnn",))


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: one thread runs them fastest, and resume equality holds at any count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    cfg = lambda s: TrainRunConfig(arch="small_vgg", image_size=8, train_per_class=3,  # noqa: E731
                                   train=TrainConfig(epochs=1, batch_size=16, seed=s))
    for s in (1, 2):
        train(cfg(s), d / f"t{s}", **QUIET)
    return [d / "t1" / "last.pt", d / "t2" / "last.pt"]


def _runner(verb: str, teachers):
    """run(out, resume) for one verb, and the checkpoint holding its final weights."""
    if verb == "train":
        return (lambda out, resume: train(_train_cfg(), out, resume=resume, **QUIET)), "last.pt"
    if verb == "evolve":
        return (lambda out, resume: evolve(_evolve_cfg(), out, resume=resume, **QUIET)), "gen2/last.pt"
    if verb == "merge":
        return (lambda out, resume: merge(_merge_cfg(), teachers, out, resume=resume, **QUIET)), "last.pt"
    return (lambda out, resume: run_den(_den_cfg(), out, resume=resume, **QUIET)), "task2.pt"


def _outcome(out: Path, final: str) -> dict:
    """What a finished run leaves: its files, final weights, metrics (timings aside) and summary."""
    recs = [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
            "weights": torch.load(out / final, weights_only=True)["state_dict"],
            "metrics": recs, "summary": (out / "summary.md").read_text()}


def _same(a: dict, b: dict, where: str) -> None:
    assert a["files"] == b["files"], where
    assert a["metrics"] == b["metrics"], where
    assert a["summary"] == b["summary"], where
    wa, wb = a["weights"], b["weights"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), where


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["train", "evolve", "merge", "den"])
def test_a_crash_at_any_write_boundary_resumes_to_the_uninterrupted_run(verb, teachers, tmp_path):
    run, final = _runner(verb, teachers)
    with crash_at(None) as hook:
        run(tmp_path / "full", False)
    n, names = hook.count, hook.names
    assert {"config.json", "metrics line", "state.pt", "summary.md"} <= set(names), names
    want = _outcome(tmp_path / "full", final)
    kinds = {name.split("/")[-1].split("task")[0]: k for k, name in reversed(list(enumerate(names, 1)))}
    # stopped after every write; torn in the middle of the first write of each kind (the same code tears them all)
    for torn, points in ((False, range(1, n + 1)), (True, sorted(kinds.values()))):
        for k in points:
            out = tmp_path / f"cut{k}{'t' if torn else ''}"
            with pytest.raises(SimulatedCrash), crash_at(k, torn=torn):
                run(out, False)
            # before config.json exists there is no run to resume: the user starts it again
            run(out, (out / "config.json").exists())
            _same(_outcome(out, final), want, f"{verb}: crash at write {k} of {n}{' (torn)' if torn else ''}")


def test_evolve_resumed_at_a_generation_boundary_starts_the_next_generation_fresh(tmp_path):
    """Stopped right after generation 1's state (its last write): generation 2 must not inherit the
    finished generation's optimizer momentum."""
    with crash_at(None) as hook:
        evolve(_evolve_cfg(), tmp_path / "full", **QUIET)
    gen1_writes = 1 + 2 * 2 + 5  # config; 2 epochs x (metrics, state); checkpoint, metrics, summary, plot, state
    with pytest.raises(SimulatedCrash), crash_at(gen1_writes):
        evolve(_evolve_cfg(), tmp_path / "cut", **QUIET)
    st = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    assert (st["generation"], st["epochs_done"], st["optimizer"]) == (2, 0, None)
    evolve(_evolve_cfg(), tmp_path / "cut", resume=True, **QUIET)
    _same(_outcome(tmp_path / "cut", "gen2/last.pt"), _outcome(tmp_path / "full", "gen2/last.pt"), "boundary")
    assert hook.count > gen1_writes


def _slimkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "slimkit", *map(str, args)]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_kill_9_of_a_real_evolve_process_then_resume(tmp_path):
    argv = ["evolve", "--arch", "mlp", "--generations", "2", "--epochs", "3", "--image-size", "8",
            "--train-per-class", "3", "--batch-size", "16", "--device", "cpu"]
    subprocess.run(_slimkit(*argv, "--out", tmp_path / "full"), check=True, capture_output=True, env=ONE_THREAD)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_slimkit(*argv, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ONE_THREAD)
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:  # kill it once it is inside generation 1 or 2
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = out / "gen2" / "last.pt"
    assert not done.exists(), "the run finished before it was killed; kill it earlier"
    r = subprocess.run(_slimkit("evolve", "--resume", out, *argv[1:]), capture_output=True, text=True, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    _same(_outcome(out, "gen2/last.pt"), _outcome(tmp_path / "full", "gen2/last.pt"), "kill -9")


@pytest.mark.parametrize("damage,msg", [
    ("state", "state.pt is unreadable"),
    ("future", "newer than this slimkit reads"),
    ("metrics", "metrics.jsonl has"),
    ("config", "config.json is not valid JSON"),
])
def test_a_damaged_run_directory_is_refused_and_left_alone(damage, msg, cli, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(SimulatedCrash), crash_at(1 + 2 * 2):  # after epoch 2's state
        train(TrainRunConfig(arch="mlp", image_size=8, train_per_class=3,
                             train=TrainConfig(epochs=4, batch_size=16)), out, **QUIET)
    if damage == "state":
        (out / "state.pt").write_bytes((out / "state.pt").read_bytes()[:100])
    elif damage == "future":
        st = torch.load(out / "state.pt", weights_only=True)
        torch.save({**st, "format": 99}, out / "state.pt")
    elif damage == "metrics":
        (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    else:
        (out / "config.json").write_text((out / "config.json").read_text()[:20])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = cli("train", "--resume", out, "--arch", "mlp", "--image-size", "8", "--train-per-class", "3",
            "--epochs", "4", "--batch-size", "16", "--device", "cpu")
    assert r.code == 2 and r.err.count("\n") == 1 and msg in r.err, r.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_takes_the_recorded_flags_and_refuses_contradictions(cli, tmp_path):
    out = tmp_path / "r"
    argv = ["--arch", "mlp", "--generations", "2", "--epochs", "2", "--image-size", "8", "--train-per-class", "3",
            "--batch-size", "16", "--lr", "0.02", "--device", "cpu"]
    with pytest.raises(SimulatedCrash), crash_at(1 + 2 * 2):  # stopped after generation 1's first two epochs
        cli("evolve", *argv, "--out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = cli("evolve", "--resume", out, "--lr", "0.05")  # the run used 0.02
    assert r.code == 2 and r.err.count("\n") == 1 and "--lr 0.02" in r.err and "0.05" in r.err, r.err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    r = cli("evolve", "--resume", out, "--lr", "0.02")  # agreeing flags are fine; the rest come from config.json
    assert r.code == 0, r.err
    evolve(EvolveConfig(arch="mlp", generations=2, image_size=8, train_per_class=3,
                        train=TrainConfig(epochs=2, batch_size=16, lr=0.02)), tmp_path / "full", **QUIET)
    _same(_outcome(out, "gen2/last.pt"), _outcome(tmp_path / "full", "gen2/last.pt"), "resume from config.json")


def test_merge_resume_remembers_its_teachers(cli, teachers, tmp_path):
    out = tmp_path / "m"
    flags = ["--train-per-class", "3", "--gate-epochs", "1", "--finetune-epochs", "1", "--batch-size", "16",
             "--device", "cpu"]
    with pytest.raises(SimulatedCrash), crash_at(3):  # config, teachers' record, big.pt
        cli("merge", *teachers, *flags, "--out", out)
    r = cli("merge", "--resume", out)
    assert r.code == 0, r.err
    assert (out / "last.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["efficientnet_b0", "timm/resnet18"])
def test_zoo_networks_evolve_at_the_chosen_size_resume_and_extract(arch, cli, tmp_path):
    """A torchvision family other than ResNet/VGG and a timm CNN train through the same engine at
    --image-size 32 (not their 224 default), resume from any point to the uninterrupted run, and cut."""
    if arch.startswith("timm/"):
        pytest.importorskip("timm")
    cfg = EvolveConfig(arch=arch, generations=2, image_size=32, train_per_class=2,
                       train=TrainConfig(epochs=1, batch_size=10, warmup_epochs=0))
    evolve(cfg, tmp_path / "full", **QUIET)
    assert load(tmp_path / "full" / "gen2" / "last.pt").slimkit_spec.input_shape == (3, 32, 32)
    with pytest.raises(SimulatedCrash), crash_at(4):  # config, epoch 1's metrics and state, gen 1's checkpoint
        evolve(cfg, tmp_path / "cut", **QUIET)
    evolve(cfg, tmp_path / "cut", resume=True, **QUIET)
    _same(_outcome(tmp_path / "cut", "gen2/last.pt"), _outcome(tmp_path / "full", "gen2/last.pt"), arch)
    # the trained efficientnet_b0 differs from its masked self by 7.4e-4 in float32 (round-off through
    # activations ~1e3 and saturating SE gates); extract verifies in float64, where the cut is exact
    r = cli("extract", tmp_path / "full" / "gen2" / "last.pt", "--split-rate", "0.5", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["verify_dtype"] == "float64" and rep["max_rel_diff"] <= 1e-9
