"""One set of flags (issue 22 item 3): every verb names a network, its output and its training subset
the same way, the old spellings still work with a deprecation line, and the library's defaults are the CLI's."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json

import pytest
from conftest import randomize_bn

from slimkit import create_model, load, save

READING = ("extract", "export", "bench", "compare", "merge", "prune")  # read a network from a checkpoint
BUILDING = ("train", "evolve", "routes")  # build one (--input-shape: the data's channels and --image-size)
WRITING = ("extract", "export", "bench", "compare", "train", "evolve", "merge", "den", "prune", "routes")
TRAINING = ("train", "evolve", "merge", "den", "prune", "routes")
NETWORK = ("--arch", "--num-classes", "--model-args", "--input-shape")


def _verbs() -> dict[str, argparse.ArgumentParser]:
    from slimkit.cli.app import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def _flag(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def _what(a: argparse.Action) -> tuple:
    return type(a), a.type, a.help, a.metavar, a.nargs


def test_every_network_verb_names_it_with_the_same_four_flags():
    verbs = _verbs()
    for flag in NETWORK:
        reading = {v: _flag(verbs[v], flag) for v in READING}
        assert all(reading.values()), (flag, [v for v, a in reading.items() if a is None])
        assert len({_what(a) + (a.default,) for a in reading.values()}) == 1, flag  # one help, parser and default
        building = [_flag(verbs[v], flag) for v in BUILDING]
        assert all(building) and {_what(a) for a in building} == {_what(reading["extract"])}, flag
    assert {_flag(verbs[v], "--arch").default for v in BUILDING} == {"cifar_resnet"}


@pytest.mark.parametrize("verb", READING)
def test_input_shape_is_c_h_w_everywhere_and_the_old_batch_form_warns(verb, capsys):
    p = _verbs()[verb]
    first = ["ckpt"] if verb not in ("merge",) else []
    for text in ("3,32,32", "3x32x32"):
        assert p.parse_args([*first, "--input-shape", text]).input_shape == (3, 32, 32)
    assert capsys.readouterr().err == ""
    assert p.parse_args([*first, "--input-shape", "4,3,32,32"]).input_shape == (3, 32, 32)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"slimkit {verb}: warning: --input-shape N,C,H,W is deprecated")
    for bad in ("3,32", "3,0,32", "a,b,c", "1,1,3,32,32"):
        with pytest.raises(SystemExit) as exc:
            p.parse_args([*first, "--input-shape", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "C,H,W" in err, (bad, err)
    args = p.parse_args([*first, "--model-args", "depth=20,widths=[16,32]"])
    assert args.model_args == {"depth": 20, "widths": [16, 32]}


def test_every_writing_verb_takes_o_out_and_the_old_output_still_works(capsys):
    verbs = _verbs()
    for verb in WRITING:
        a = _flag(verbs[verb], "-o")
        assert a is not None and a.option_strings == ["-o", "--out"] and a.dest == "out", verb
        first = {"extract": ["c"], "export": ["c"], "compare": ["c"], "bench": ["c"], "prune": ["c"]}.get(verb, [])
        assert verbs[verb].parse_args([*first, "-o", "X"]).out == "X"
        assert capsys.readouterr().err == ""
        old = _flag(verbs[verb], "--output")
        if verb not in ("extract", "export"):  # only these two ever spelled it --output
            assert old is None, verb
            continue
        assert old.dest == "out" and old.help == argparse.SUPPRESS, verb
        assert verbs[verb].parse_args([*first, "--output", "Y"]).out == "Y"
        assert capsys.readouterr().err == f"slimkit {verb}: warning: --output is deprecated; use -o/--out\n"
    for verb, p in verbs.items():  # no verb writes through another spelling
        assert not {"--output-dir", "--outdir"} & {o for a in p._actions for o in a.option_strings}, verb


def test_every_training_verb_draws_its_subset_from_subset_seed():
    from slimkit.cli.options import SUBSET_SEED

    verbs = _verbs()
    flags = [_flag(verbs[v], "--subset-seed") for v in TRAINING]
    assert all(flags) and {(_what(a), a.default) for a in flags} == {(_what(flags[0]), SUBSET_SEED)}
    assert all("--seed" not in (_flag(verbs[v], "--train-per-class").help or "") for v in TRAINING)


def _library(verb: str) -> list:
    """The functions and config dataclasses a verb's flags become arguments of."""
    from slimkit.deploy.bench import bench_files
    from slimkit.deploy.compare import compare
    from slimkit.deploy.exporting import export_onnx
    from slimkit.engine.loop import TrainConfig
    from slimkit.engine.train import TrainRunConfig, train
    from slimkit.methods.den.config import DENConfig
    from slimkit.methods.den.sequence import run_den
    from slimkit.methods.ke.evolve import EvolveConfig, evolve
    from slimkit.methods.ke.extract import extract
    from slimkit.methods.merge.merging import MergeConfig, merge
    from slimkit.methods.routes.pruning import PruneRunConfig, prune_run
    from slimkit.methods.routes.run import RoutesConfig, run_routes

    return {"prune": [prune_run, PruneRunConfig], "routes": [run_routes, RoutesConfig],"extract": [extract], "export": [export_onnx], "bench": [bench_files], "compare": [compare],
            "train": [train, TrainRunConfig, TrainConfig], "evolve": [evolve, EvolveConfig, TrainConfig],
            "merge": [merge, MergeConfig], "den": [run_den, DENConfig]}[verb]


def _defaults(obj) -> dict:
    if dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING}
    return {k: p.default for k, p in inspect.signature(obj).parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize("verb", WRITING)
def test_the_library_defaults_equal_the_cli_defaults(verb):
    from slimkit.deploy.bench import parse_batches

    p = _verbs()[verb]
    cli = {a.dest: a.default for a in p._actions if a.option_strings and a.default is not argparse.SUPPRESS}
    cli.update({k: v for k, v in p._defaults.items() if k != "func"})
    cli.pop("resume", None)  # a directory on the command line, a bool (with out=) in the library
    if verb == "bench":
        cli["batch"] = tuple(parse_batches(cli["batch"]))
    if verb == "den":
        cli["baselines"] = tuple(cli["baselines"].split(","))
    if verb == "routes":
        cli["routes"] = tuple(cli["routes"].split(","))
        cli["seeds"] = tuple(int(v) for v in cli["seeds"].split(","))
        cli["latency_batches"] = tuple(parse_batches(cli.pop("batch")))
    if verb == "merge":  # the merge's phases take their own schedule: --lr etc. are MergeConfig.gate's
        for k in ("lr", "warmup_epochs", "batch_size", "epochs", "loss", "weight_decay", "seed"):
            cli.pop(k, None)
    compared = 0
    for obj in _library(verb):
        for name, default in _defaults(obj).items():
            if name in cli:
                want = tuple(default) if isinstance(default, list) else default
                assert cli[name] == want, f"{verb}: --{name.replace('_', '-')} defaults to {cli[name]!r}, " \
                    f"{getattr(obj, '__qualname__', obj)}({name}=...) to {want!r}"
                compared += 1
    assert compared >= 3, verb  # the names do meet
    for name in ("device", "workers"):
        if name in cli:
            assert name in _defaults(_library(verb)[0]), (verb, name)


# --- the flags at work -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def net(tmp_path_factory):
    d = tmp_path_factory.mktemp("flags")
    return save(randomize_bn(create_model("cifar_resnet", depth=8, width=8, num_classes=5)), d / "net.pt")


def test_extract_output_is_deprecated_but_writes(cli, net, tmp_path):
    r = cli("extract", net, "--split-rate", "0.5", "--output", tmp_path / "s.pt")
    assert r.code == 0 and (tmp_path / "s.pt").is_file()
    assert r.err.splitlines()[0] == "slimkit extract: warning: --output is deprecated; use -o/--out"
    r = cli("export", net, "--input-shape", "1,3,16,16")  # still refused without an output, in one line
    assert r.code == 2 and r.err.count("error") == 1 and "-o/--out" in r.err


def test_compare_runs_a_network_at_the_given_input_shape(cli, net, tmp_path):
    """A checkpoint recorded at 3x32x32 compared at 3x24x24: the report says 24."""
    assert tuple(load(net).slimkit_spec.input_shape) == (3, 32, 32)
    r = cli("compare", net, "--split-rate", "0.5", "--batch", "1", "--runs", "2", "--warmup", "1",
            "--input-shape", "3,24,24", "-o", tmp_path / "c", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["input_shape"] == [3, 24, 24]
    from slimkit.core.cost import count_macs

    assert rep["dense"]["macs"] == count_macs(load(net), (3, 24, 24)) < count_macs(load(net), (3, 32, 32))


@pytest.mark.parametrize("verb, ckpt", [("train", "last.pt"), ("evolve", "gen1/last.pt")])
def test_training_verbs_build_model_args_and_resume_reads_them(cli, tmp_path, verb, ckpt):
    tiny = ["--epochs", "1", "--warmup-epochs", "0", "--train-per-class", "2", "--image-size", "8", "--quiet",
            *(["--generations", "1"] if verb == "evolve" else [])]
    out = tmp_path / "t"
    r = cli(verb, "--arch", "cifar_resnet", "--model-args", "depth=8,width=4", *tiny, "-o", out)
    assert r.code == 0, r.err
    assert load(out / ckpt).slimkit_spec.args["width"] == 4
    assert json.loads((out / "config.json").read_text())["model_args"] == {"depth": 8, "width": 4}
    r = cli(verb, "--resume", out, "--model-args", "depth=8,width=8")
    assert r.code == 2 and "--model-args" in r.err and r.err.count("\n") == 1
    assert cli(verb, "--resume", out, "--quiet").code == 0  # the recorded model_args, not the default
    r = cli(verb, "--model-args", "num_classes=3", *tiny, "-o", tmp_path / "u")
    assert r.code == 2 and "--num-classes" in r.err and not (tmp_path / "u").exists()


@pytest.mark.parametrize("verb", BUILDING)
def test_training_verbs_read_input_shape_as_the_datas_channels_and_square_side(cli, tmp_path, verb):
    tiny = ["--epochs", "1", "--warmup-epochs", "0", "--train-per-class", "2", "--quiet",
            *(["--generations", "1"] if verb == "evolve" else []),
            *(["--budget", "2", "--seeds", "0", "--routes", "dense", "--runs", "2", "--warmup", "1"] if verb == "routes"
              else [])]
    out = tmp_path / "t"
    r = cli(verb, "--arch", "small_vgg", "--input-shape", "1,8,8", *tiny, "-o", out)  # digits: one channel
    assert r.code == 0, r.err
    assert json.loads((out / "config.json").read_text())["image_size"] == 8
    ckpt = out / {"train": "last.pt", "evolve": "gen1/last.pt", "routes": "seed0/dense/last.pt"}[verb]
    assert tuple(load(ckpt).slimkit_spec.input_shape) == (1, 8, 8)
    for bad, said in ((["--input-shape", "3,8,8"], "takes 1-channel images, not 3"),
                      (["--input-shape", "1,8,6"], "give H == W"),
                      (["--input-shape", "1,8,8", "--image-size", "16"], "disagree")):
        r = cli(verb, "--arch", "small_vgg", *bad, *tiny, "-o", tmp_path / "u")
        assert r.code == 2 and said in r.err and r.err.count("\n") == 1, r.err
        assert not (tmp_path / "u").exists()


def test_evolve_and_den_draw_the_subset_from_subset_seed(monkeypatch, tmp_path):
    import torch

    import slimkit.methods.ke.evolve as E
    from slimkit.methods.den.tasks import make_tasks

    seen = {}

    class Seen(Exception):
        pass

    def datasets(*args, **kwargs):
        seen.update(kwargs, args=args)
        raise Seen

    monkeypatch.setattr(E, "datasets", datasets)
    cfg = E.EvolveConfig(arch="small_vgg", train_per_class=3, subset_seed=7, image_size=8,
                         train=E.TrainConfig(epochs=1, seed=5))
    with pytest.raises(Seen):
        E.evolve(cfg, tmp_path / "e", device="cpu", workers=0)
    assert seen["subset_seed"] == 7
    # den: --seed draws the permutations, --subset-seed the images
    a = make_tasks("split:2", seed=0, train_per_class=3, subset_seed=1)
    b = make_tasks("split:2", seed=9, train_per_class=3, subset_seed=1)
    c = make_tasks("split:2", seed=0, train_per_class=3, subset_seed=2)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta.train.tensors[0], tb.train.tensors[0], rtol=0, atol=0)
    assert any(ta.train.tensors[0].shape != tc.train.tensors[0].shape or
               not torch.allclose(ta.train.tensors[0], tc.train.tensors[0]) for ta, tc in zip(a, c))


def test_a_run_recorded_before_subset_seed_resumes_with_its_old_subset(tmp_path):
    """An evolve/den run whose config.json predates subset_seed drew its subset from seed: resuming it
    with that subset is accepted, with another refused, naming the value the run used."""
    from slimkit.core.errors import SlimkitError
    from slimkit.engine.rundir import RunDir

    out = tmp_path / "old"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"seed": 3, "train_per_class": 5}))
    RunDir(out, "den", {"seed": 3, "train_per_class": 5, "subset_seed": 3}, True, before={"subset_seed": 3}).check()
    with pytest.raises(SlimkitError, match="subset_seed=3"):
        RunDir(out, "den", {"seed": 3, "train_per_class": 5, "subset_seed": 0}, True,
               before={"subset_seed": 3}).check()


@pytest.mark.parametrize("verb, expected", [("den", 3), ("evolve", 3), ("train", 0)])
def test_resuming_an_old_run_from_the_command_line_takes_its_seed_as_subset_seed(tmp_path, verb, expected):
    """evolve/den flags recorded before --subset-seed: their subset came from --seed, and a resume keeps it
    (train always had --subset-seed: a record without it means the default)."""
    from slimkit.cli import train_verbs

    (tmp_path / "config.json").write_text(json.dumps({"cli": {"seed": 3, "train_per_class": 5}}))
    p = _verbs()[verb]
    argv = ["--resume", str(tmp_path)]
    args = p.parse_args(argv)
    args.verb = verb
    train_verbs.resume_flags(p, args, argv)
    assert (args.seed, args.subset_seed, args.train_per_class) == (3, expected, 5)


def test_merge_builds_plain_state_dict_teachers_with_model_args(tmp_path):
    """--model-args and --input-shape reach merge's teachers as they reach extract's network."""
    import torch

    from slimkit.core.errors import SlimkitError
    from slimkit.methods.merge.merging import _read_teachers

    paths = []
    for i in (1, 2):
        torch.manual_seed(i)
        torch.save(create_model("cifar_resnet", depth=8, width=4, num_classes=3).state_dict(), tmp_path / f"{i}.pt")
        paths.append(tmp_path / f"{i}.pt")
    with pytest.raises(SlimkitError, match="model-args"):  # the default width (16) does not fit the file
        _read_teachers(paths, "cifar_resnet", 3)
    loaded = _read_teachers(paths, "cifar_resnet", 3, model_args={"depth": 8, "width": 4}, input_shape=(3, 24, 24))
    for ld in loaded:
        assert ld.model.slimkit_spec.args["width"] == 4 and tuple(ld.model.slimkit_spec.input_shape) == (3, 24, 24)


def test_the_library_reads_input_shape_as_c_h_w_and_warns_on_the_old_batch_form():
    from slimkit.core.errors import SlimkitError
    from slimkit.deploy.export import parse_input_shape

    assert parse_input_shape("3,8,8") == parse_input_shape((3, 8, 8)) == parse_input_shape("3x8x8") == (3, 8, 8)
    with pytest.warns(FutureWarning, match="N,C,H,W"):
        assert parse_input_shape("2,3,8,8") == (3, 8, 8)
    for bad in ("3,8", "3,0,8", "a,8,8"):
        with pytest.raises(SlimkitError, match="C,H,W"):
            parse_input_shape(bad)
