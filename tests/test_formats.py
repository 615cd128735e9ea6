"""The files users have: safetensors, and training checkpoints written the way timm's train.py,
torchvision's reference scripts and PyTorch Lightning write them, each extracting to the same slim
network as the plain state_dict of the same weights; EMA weights on request; clear refusals."""
from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn

from slimkit import SlimkitError, create_model, load, read
from slimkit.methods.ke.extract import extract

ARCH, ARGS = "cifar_resnet", dict(num_classes=5, depth=8, width=8, in_chans=3, image_size=16)
MODEL_ARGS = {"depth": 8, "width": 8, "image_size": 16}


@torch.no_grad()
def _nets() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A trained-looking network and an EMA of it whose weights differ from the live ones."""
    live = randomize_bn(create_model(ARCH, **ARGS), seed=1)
    ema = randomize_bn(create_model(ARCH, **ARGS), seed=2)
    g = torch.Generator().manual_seed(3)
    for p in ema.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    return live, ema


def _train_state(net: torch.nn.Module) -> tuple[dict, dict]:
    """Optimizer and scheduler state after one step, as a training script holds them."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    net.train()
    net(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    sched.step()
    net.eval()
    return opt.state_dict(), sched.state_dict()


def _averaged(ema: torch.nn.Module) -> dict:
    """torchvision's model_ema: the state of an AveragedModel (keys module.*, plus n_averaged)."""
    avg = torch.optim.swa_utils.AveragedModel(ema, use_buffers=True)
    avg.update_parameters(ema)
    return avg.state_dict()


def _write(kind: str, path: Path, live: torch.nn.Module, ema: torch.nn.Module) -> Path:
    sd, ema_sd = live.state_dict(), ema.state_dict()
    work = create_model(ARCH, **ARGS)  # a copy that trains one step, for real optimizer state
    work.load_state_dict(sd)
    opt, sched = _train_state(work)
    if kind == "plain":
        torch.save(sd, path)
    elif kind == "legacy":  # torch.save's pre-1.6 (non-zip) format
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif kind == "ddp_compiled":  # torch.compile of a DDP model: module._orig_mod.*
        torch.save({"module._orig_mod." + k: v for k, v in sd.items()}, path)
    elif kind == "timm":  # timm train.py / CheckpointSaver._save
        args = argparse.Namespace(model=ARCH, lr=0.1, epochs=10, model_ema=True, model_ema_decay=0.9998, mean=None,
                                  sched="cosine", opt="sgd", batch_size=2)
        torch.save({"epoch": 4, "arch": "cifar_resnet", "state_dict": sd, "optimizer": opt, "version": 2,
                    "args": args, "state_dict_ema": ema_sd, "metric": 71.25}, path)
    elif kind == "torchvision":  # references/classification/train.py
        args = argparse.Namespace(model=ARCH, lr=0.1, epochs=10, model_ema=True, model_ema_decay=0.99998,
                                  output_dir=".", data_path="/data")
        torch.save({"model": sd, "optimizer": opt, "lr_scheduler": sched, "epoch": 4, "args": args,
                    "model_ema": _averaged(ema)}, path)
    elif kind in ("lightning_model", "lightning_net"):  # Trainer.save_checkpoint of a LightningModule
        prefix = kind.split("_")[1] + "."  # self.model = ... or self.net = ...
        ema_state = {"decay": 0.999, "ema_state_dict": {prefix + k: v for k, v in ema_sd.items()}}
        torch.save({
            "epoch": 4, "global_step": 40, "pytorch-lightning_version": "2.4.0",
            "state_dict": {prefix + k: v for k, v in sd.items()},
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 5, "completed": 4}}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}": {
                "best_model_score": torch.tensor(0.9), "best_model_path": "/ckpts/best.ckpt", "dirpath": "/ckpts"},
                "EMA": ema_state},
            "optimizer_states": [opt], "lr_schedulers": [sched],
            "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1, "arch": ARCH, "depth": 8}}, path)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        raise AssertionError(kind)
    return path


FORMATS = ["plain", "legacy", "ddp_compiled", "timm", "torchvision", "lightning_model", "lightning_net", "safetensors"]
EMA_FORMATS = {"timm": None, "torchvision": None, "lightning_model": None}


def _slim_weights(path: Path, tmp: Path, **kw) -> dict[str, torch.Tensor]:
    out = tmp / f"{path.name}.{kw.get('ema', False)}.{kw.get('state_key')}.slim.pt"
    extract(path, split_rate=0.5, arch=ARCH, model_args=MODEL_ARGS, out=out, **kw)
    return load(out).state_dict()


@pytest.fixture(scope="module")
def nets():
    return _nets()


@pytest.fixture(scope="module")
def reference(nets, tmp_path_factory):
    """Slim weights of the plain state_dicts of the live and the EMA network."""
    tmp = tmp_path_factory.mktemp("ref")
    live, ema = nets
    torch.save(live.state_dict(), tmp / "live.pt")
    torch.save(ema.state_dict(), tmp / "ema.pt")
    return {"live": _slim_weights(tmp / "live.pt", tmp), "ema": _slim_weights(tmp / "ema.pt", tmp)}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:  # the same cut of the same weights: the same computation rerun
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# a name that says nothing about the format: the reader goes by content
SUFFIX = {"safetensors": ".bin", "timm": ".pth.tar", "lightning_model": ".ckpt", "lightning_net": ".ckpt"}


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_extracts_to_the_plain_state_dicts_slim_network(kind, nets, reference, tmp_path):
    path = _write(kind, tmp_path / f"{kind}{SUFFIX.get(kind, '.pt')}", *nets)
    _same(_slim_weights(path, tmp_path), reference["live"])
    if kind in EMA_FORMATS:
        ema = _slim_weights(path, tmp_path, ema=True)
        _same(ema, reference["ema"])
        assert not torch.equal(ema["conv1.weight"], reference["live"]["conv1.weight"])  # EMA != live weights


def test_ema_recorded_in_the_slim_checkpoints_provenance(nets, tmp_path):
    path = _write("torchvision", tmp_path / "tv.pth", *nets)
    out = tmp_path / "tv.slim.pt"
    extract(path, split_rate=0.5, arch=ARCH, model_args=MODEL_ARGS, out=out, ema=True)
    assert read(out).meta["provenance"]["source_weights"] == "model_ema"


def test_state_key_names_any_entry_also_nested(nets, reference, tmp_path):
    path = _write("lightning_model", tmp_path / "l.ckpt", *nets)
    _same(_slim_weights(path, tmp_path, state_key="callbacks.EMA.ema_state_dict"), reference["ema"])
    _same(_slim_weights(path, tmp_path, state_key="state_dict"), reference["live"])


@pytest.mark.slow
def test_torchvision_resnet18_lightning_checkpoint_at_a_small_input(tmp_path):
    net = randomize_bn(create_model("resnet18", num_classes=7, input_shape=(3, 32, 32)))
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": {"model." + k: v for k, v in net.state_dict().items()}, "epoch": 1, "global_step": 9,
                "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"num_classes": 7}, "optimizer_states": [],
                "lr_schedulers": [], "loops": {}, "callbacks": {}}, tmp_path / "l.ckpt")
    slim = {}
    for name in ("plain.pt", "l.ckpt"):
        r = extract(tmp_path / name, split_rate=0.5, arch="resnet18", input_shape=(3, 32, 32),
                    out=tmp_path / f"{name}.slim.pt")
        assert r.input_shape == [3, 32, 32] and r.slim["params"] < r.dense["params"] / 3
        slim[name] = load(tmp_path / f"{name}.slim.pt").state_dict()
    _same(slim["l.ckpt"], slim["plain.pt"])


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_mnasnet_loads_with_or_without_module_versions(writer, tmp_path):
    # torchvision's MNASNet refuses a state_dict without its module version (v2 is today's layout);
    # a torch.save keeps the versions, safetensors has none: the architecture's own are used
    net = randomize_bn(create_model("mnasnet0_5", num_classes=3, input_shape=(3, 32, 32)))
    path = tmp_path / "m.bin"
    if writer == "torch":
        torch.save(net.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    back = load(path, arch="mnasnet0_5", input_shape=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), net(x))


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _bad_files(tmp: Path, live: torch.nn.Module, ema: torch.nn.Module) -> dict[str, tuple[Path, list[str], str]]:
    sd = live.state_dict()
    out = {}
    p = tmp / "two.pt"
    torch.save({"model": sd, "state_dict": ema.state_dict(), "epoch": 1}, p)
    out["two candidates"] = (p, [], r"2 candidate weight sets \(model, state_dict\) and none is named; pick one "
                                     r"with --state-key KEY")
    p = tmp / "noema.pth.tar"
    torch.save({"epoch": 1, "state_dict": sd, "optimizer": {}, "args": argparse.Namespace(lr=0.1)}, p)
    out["--ema without EMA"] = (p, ["--ema"], r"no EMA weights \(its entries: epoch, state_dict, optimizer, args; "
                                              r"weight sets: state_dict\)")
    p = tmp / "prefix.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}}, p)
    out["prefix fits no architecture"] = (p, ["--arch", "small_vgg"], "every weight's key starts with 'model.' but "
                                          "neither with it nor with any part of it stripped do the keys fit small_vgg")
    p = tmp / "bad.safetensors"
    p.write_bytes((40).to_bytes(8, "little") + b'{"conv1.weight": {"dtype": "F32", "sha' + bytes(64))
    out["corrupt safetensors header"] = (p, [], "has a corrupt safetensors header")
    p = tmp / "bad_unnamed.bin"  # the same bytes without the telling name: detected by content
    p.write_bytes((40).to_bytes(8, "little") + b'{"conv1.weight": {"dtype": "F32", "sha' + bytes(64))
    out["corrupt header, any name"] = (p, [], "has a corrupt safetensors header")
    p = tmp / "evil.pth.tar"
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1), "metric": _Evil()}, p)
    out["code in an extra entry"] = (p, [], "never executes code from a file")
    p = tmp / "key.pt"
    torch.save({"model": sd, "epoch": 3}, p)
    out["unknown --state-key"] = (p, ["--state-key", "model_ema"], r"has no entry 'model_ema' \(its entries: model, "
                                                                   r"epoch\); weight sets found: model")
    out["--state-key not weights"] = (p, ["--state-key", "epoch"], "entry 'epoch' of .* is not a set of weights")
    return out


BAD = ["two candidates", "--ema without EMA", "prefix fits no architecture", "corrupt safetensors header",
       "corrupt header, any name", "code in an extra entry", "unknown --state-key", "--state-key not weights"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(case, cli, nets, tmp_path, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    path, flags, message = _bad_files(tmp_path, *nets)[case]
    before = sorted(tmp_path.iterdir())
    argv = ["--arch", ARCH, "--model-args", "depth=8,width=8,image_size=16"] if "--arch" not in flags else []
    r = cli("extract", path, "--split-rate", "0.5", *argv, *flags)
    assert r.code == 2, r.err
    assert len(r.err.strip().splitlines()) == 1 and re.search(message, r.err), r.err
    assert sorted(tmp_path.iterdir()) == before  # nothing written (and no PWNED)


def test_ema_and_state_key_together_and_on_a_slimkit_checkpoint(tmp_path):
    from slimkit import save

    torch.save({"state_dict": create_model("mlp").state_dict()}, tmp_path / "p.pt")
    with pytest.raises(SlimkitError, match="give --ema or --state-key, not both"):
        read(tmp_path / "p.pt", arch="mlp", ema=True, state_key="state_dict")
    save(create_model("mlp"), tmp_path / "s.pt")
    with pytest.raises(SlimkitError, match="slimkit checkpoint, which holds one set of weights; drop --ema"):
        read(tmp_path / "s.pt", ema=True)
    assert read(tmp_path / "s.pt", ema=True, plain_only=True).kind == "slimkit"  # bench: flags for other files


def test_plain_types_are_allowed_only_while_loading(tmp_path):
    torch.save({"state_dict": create_model("mlp").state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "t.pt")
    before = set(torch.serialization.get_safe_globals())
    assert read(tmp_path / "t.pt", arch="mlp").kind == "state_dict"
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(pickle.UnpicklingError, match="Namespace"):  # torch's own loader still refuses it
        torch.load(tmp_path / "t.pt", weights_only=True)


VERBS = {
    "extract": ["--split-rate", "0.5"],
    "export": ["-o", "x.onnx"],
    "bench": ["--runs", "1", "--warmup", "1"],
    "compare": ["--split-rate", "0.5", "--runs", "1", "--warmup", "1"],
    "merge": ["--out", "m"],
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_reading_a_network_takes_ema_and_state_key(verb, cli, nets, tmp_path, monkeypatch):
    # the flags reach the one reader: the same refusals, before anything is written
    monkeypatch.chdir(tmp_path)
    path = _write("timm", tmp_path / "t.pth.tar", *nets)
    torch.save({"state_dict": nets[0].state_dict(), "epoch": 1}, tmp_path / "noema.pt")
    files = {"noema": [tmp_path / "noema.pt"], "timm": [path]}
    if verb == "merge":  # two teachers
        files = {"noema": [tmp_path / "noema.pt", path], "timm": [path, tmp_path / "noema.pt"]}
    flags = ["--arch", ARCH, "--model-args", "depth=8,width=8,image_size=16"] if verb != "merge" else \
        ["--arch", ARCH]
    before = sorted(tmp_path.iterdir())
    for argv, message in [
        ([*files["noema"], "--ema"], "noema.pt has no EMA weights (its entries: state_dict, epoch"),
        ([*files["timm"], "--state-key", "optimizer"], "entry 'optimizer' of "),
        ([*files["timm"], "--ema", "--state-key", "state_dict"], "give --ema or --state-key, not both"),
    ]:
        r = cli(verb, *argv, *flags, *VERBS[verb])
        assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.slow
def test_bench_and_export_read_training_checkpoints_and_their_ema(cli, nets, tmp_path):
    path = _write("timm", tmp_path / "t.pth.tar", *nets)
    st = tmp_path / "w.safetensors"
    _write("safetensors", st, *nets)
    for files, ema in (([path, st], []), ([path], ["--ema"])):
        r = cli("bench", *files, "--arch", ARCH, "--model-args", "depth=8,width=8,image_size=16", *ema,
                "--batch", "1", "--runs", "2", "--warmup", "1")
        assert r.code == 0, r.err
        assert all(f"| {f.name} | torch-cpu | 1 |" in r.out for f in files)
    r = cli("bench", st, "--arch", ARCH, "--ema", "--runs", "1", "--warmup", "1")
    assert r.code == 2 and "w.safetensors is one plain set of weights (" in r.err and "no EMA weights; drop --ema" in r.err
    for ema in (False, True):
        out = tmp_path / f"t{ema}.onnx"
        r = cli("export", path, "-o", out, "--arch", ARCH, "--model-args", "depth=8,width=8,image_size=16",
                *(["--ema"] if ema else []))
        assert r.code == 0, r.err
    import onnxruntime as ort

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for ema, net in ((False, nets[0]), (True, nets[1])):  # each file computes its own weights' function
        sess = ort.InferenceSession(str(tmp_path / f"t{ema}.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        with torch.inference_mode():
            want = net(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_the_format_follows_the_content_not_the_name(nets, tmp_path):
    live = nets[0]
    torch.save(live.state_dict(), tmp_path / "really_torch.safetensors")  # a torch.save under a safetensors name
    back = read(tmp_path / "really_torch.safetensors", arch=ARCH, model_args=MODEL_ARGS)
    _same(back.model.state_dict(), live.state_dict())
    (tmp_path / "short.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(SlimkitError, match=r"short.safetensors has a corrupt safetensors header: its first 8 bytes give "
                                           r"a header of 1000000 bytes in a file of 10"):
        read(tmp_path / "short.safetensors", arch=ARCH)
