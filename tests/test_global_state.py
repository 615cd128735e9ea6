"""No hidden global state: a library call leaves the process as it found it (STYLE.md).

Each verb runs on a tiny problem between two snapshots of what a user's session holds: torch's
global generator (its initial seed and state), the thread count, the cudnn flags and matplotlib's
backend. The session is first put in a state no verb would leave behind by chance (a seed drawn
from, one thread, non-default cudnn flags, the pdf backend), so a verb that seeds, sets or switches
any of them is caught.
"""
from __future__ import annotations

import pytest
import torch

import slimkit
from slimkit.core.globalstate import keep_global_state, seed_global
from slimkit.engine import testhooks

QUIET = dict(progress=False, echo=lambda s: None)


def _snapshot() -> dict:
    import matplotlib

    cudnn = torch.backends.cudnn
    return {"initial_seed": torch.initial_seed(), "rng": torch.get_rng_state(), "threads": torch.get_num_threads(),
            "cudnn": (cudnn.deterministic, cudnn.benchmark, cudnn.enabled), "backend": matplotlib.get_backend(),
            "test_hook": testhooks.active()}


def _same(a: dict, b: dict) -> None:
    assert torch.equal(a.pop("rng"), b.pop("rng")), "the global generator's state changed"
    assert a == b


@pytest.fixture
def session():
    """A user's session: seeded and drawn from, one thread, cudnn deterministic without benchmark, pdf backend."""
    import matplotlib

    backend, threads = matplotlib.get_backend(), torch.get_num_threads()
    cudnn = torch.backends.cudnn
    flags = (cudnn.deterministic, cudnn.benchmark)
    matplotlib.use("pdf")
    torch.set_num_threads(1)
    cudnn.deterministic, cudnn.benchmark = True, False
    torch.manual_seed(1234)
    torch.rand(3)
    try:
        yield
    finally:
        matplotlib.use(backend)
        torch.set_num_threads(threads)
        cudnn.deterministic, cudnn.benchmark = flags


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny trained networks (train's own run is checked in the test below)."""
    d = tmp_path_factory.mktemp("gs")
    for s in (1, 2):
        slimkit.train(slimkit.TrainRunConfig(arch="small_vgg", image_size=8, train_per_class=2,
                                             train=slimkit.TrainConfig(epochs=1, batch_size=16, seed=s)), d / f"t{s}", **QUIET)
    return [d / "t1" / "last.pt", d / "t2" / "last.pt"]


def _call(verb: str, trained, tmp):
    tiny = slimkit.TrainConfig(epochs=1, batch_size=16, warmup_epochs=0)
    if verb == "train":
        return slimkit.train(slimkit.TrainRunConfig(arch="mlp", image_size=8, train_per_class=2, train=tiny), tmp / "r", **QUIET)
    if verb == "evolve":
        return slimkit.evolve(slimkit.EvolveConfig(arch="mlp", generations=2, image_size=8, train_per_class=2, train=tiny),
                              tmp / "r", **QUIET)
    if verb == "merge":
        return slimkit.merge(slimkit.MergeConfig(train_per_class=2, gate=tiny, finetune=tiny), trained, tmp / "r", **QUIET)
    if verb == "den":
        return slimkit.den(slimkit.DENConfig(tasks="split:2", hidden=(8, 4), epochs=1, baselines=("mtl",)), tmp / "r",
                           **QUIET)
    if verb == "prune":
        return slimkit.prune(slimkit.PruneRunConfig(ckpt=str(trained[0]), criterion="taylor", train_per_class=2,
                                                    finetune=tiny), tmp / "r", **QUIET)
    if verb == "routes":
        return slimkit.routes(slimkit.RoutesConfig(arch="mlp", image_size=8, train_per_class=2, budget=2, epochs=1,
                                                   seeds=(0,), routes=("dense", "scratch", "prune"), batch_size=16,
                                                   warmup_epochs=0, latency_batches=(1,), runs=2, warmup=1),
                              tmp / "r", **QUIET)
    if verb == "extract":
        return slimkit.extract(trained[0], split_rate=0.5, out=tmp / "s.pt")
    if verb == "export":
        return slimkit.export(trained[0], tmp / "n.onnx")
    if verb == "bench":
        return slimkit.bench([trained[0]], batch=(1,), runs=2, warmup=1, progress=False)
    return slimkit.compare(trained[0], split_rate=0.5, batches=(1,), runs=2, warmup=1, out=tmp / "c")


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["train", "evolve", "merge", "den", "prune", "routes", "extract", "export", "bench",
                                  "compare"])
def test_a_verb_leaves_the_session_as_it_found_it(verb, trained, session, tmp_path):
    before = _snapshot()
    _call(verb, trained, tmp_path)
    _same(_snapshot(), before)


def test_keep_global_state_restores_what_the_block_changed():
    torch.manual_seed(99)
    before = _snapshot()
    with keep_global_state():
        seed_global(7)
        torch.rand(5)
        torch.set_num_threads(torch.get_num_threads() + 1)
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
        torch.backends.cudnn.deterministic = not torch.backends.cudnn.deterministic
        assert torch.initial_seed() == 7 and _snapshot()["threads"] == before["threads"] + 1
    _same(_snapshot(), before)


def test_keep_global_state_restores_on_an_error_and_seed_global_reproduces_a_draw():
    before = _snapshot()
    with pytest.raises(RuntimeError), keep_global_state():
        torch.set_num_threads(torch.get_num_threads() + 1)
        raise RuntimeError("boom")
    _same(_snapshot(), before)
    with keep_global_state():
        seed_global(3)
        a = torch.rand(4)
    with keep_global_state():
        torch.manual_seed(3)  # what seed_global stands for on the CPU
        b = torch.rand(4)
    assert torch.equal(a, b)


def test_test_hooks_are_installed_only_inside_their_block():
    assert testhooks.active() is None
    with testhooks.stop_after(2) as hook:
        assert testhooks.active() is hook
        with testhooks.crash_at(None) as inner:
            assert testhooks.active() is inner
        assert testhooks.active() is hook and [hook.passed_point(), hook.passed_point()] == [False, True]
    assert testhooks.active() is None
