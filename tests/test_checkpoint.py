"""Checkpoints describe themselves, load safely, and are written atomically without clobbering."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from conftest import randomize_bn, rel_err

from slimkit import SlimkitError, apply_plan, create_model, load, read, save
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import kels_plan


def _slim(model, rate=0.5):
    graph = ChannelGraph(model, model.slimkit_spec.input_shape)
    return apply_plan(model, kels_plan(graph, rate))


def test_dense_roundtrip_records_spec_and_provenance(tmp_path):
    model = randomize_bn(create_model("cifar_resnet", depth=8, width=8, in_chans=1, image_size=8, num_classes=4))
    path = save(model, tmp_path / "m.pt", classes=list("abcd"), split={"mode": "kels", "rate": 0.5})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "slimkit" and raw["spec"]["arch"] == "cifar_resnet"
    assert raw["spec"]["args"]["num_classes"] == 4 and raw["spec"]["input_shape"] == [1, 8, 8]
    assert raw["meta"]["provenance"]["slimkit_version"] and raw["meta"]["classes"] == list("abcd")
    back = read(path)
    assert back.kind == "slimkit" and not back.model.training
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(back.model(x), model(x))


def test_slim_network_loads_without_its_parent(tmp_path):
    dense = randomize_bn(create_model("resnet18", num_classes=3))
    slim = _slim(dense, 0.5)
    save(slim, tmp_path / "slim.pt")
    del dense  # nothing of the parent is needed: the file carries spec + plan
    back = load(tmp_path / "slim.pt")
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in slim.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(back(x), slim(x))


def test_twice_cut_network_roundtrips(tmp_path):
    dense = randomize_bn(create_model("cifar_resnet", depth=8, width=16))
    twice = _slim(_slim(dense, 0.8), 0.5)
    save(twice, tmp_path / "t.pt")
    back = load(tmp_path / "t.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(back(x), twice(x))


def test_save_never_overwrites_without_force(tmp_path):
    model = create_model("mlp")
    path = tmp_path / "m.pt"
    path.write_bytes(b"precious")
    with pytest.raises(SlimkitError, match="already exists"):
        save(model, path)
    assert path.read_bytes() == b"precious"
    save(model, path, force=True)
    assert read(path).kind == "slimkit"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(SlimkitError, match="JSON"):
        save(create_model("mlp"), tmp_path / "m.pt", bad=object())
    assert not (tmp_path / "m.pt").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(SlimkitError, match="never executes code"):
        read(path, arch="mlp")
    assert not (tmp_path / "PWNED").exists()
    # a raw pickle, not even a torch zip file
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(SlimkitError):
        read(raw, arch="mlp")
    assert not (tmp_path / "PWNED").exists()


def test_plain_state_dict_with_module_prefix(tmp_path):
    model = randomize_bn(create_model("resnet18", num_classes=6))
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}, tmp_path / "p.pth")
    back = read(tmp_path / "p.pth", arch="resnet18")  # classes inferred from the classifier
    assert back.kind == "state_dict" and back.model.fc.out_features == 6
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert rel_err(back.model(x), model(x)) == 0


def test_plain_state_dict_needs_arch(tmp_path):
    torch.save(create_model("mlp").state_dict(), tmp_path / "p.pt")
    with pytest.raises(SlimkitError, match="--arch"):
        read(tmp_path / "p.pt")


def test_state_dict_that_does_not_fit(tmp_path):
    torch.save(create_model("resnet18", num_classes=6).state_dict(), tmp_path / "p.pt")
    with pytest.raises(SlimkitError, match=r"fc.weight: file \[6, 512\] vs model \[10, 512\]"):
        read(tmp_path / "p.pt", arch="resnet18", num_classes=10)
    with pytest.raises(SlimkitError, match="missing key"):
        read(tmp_path / "p.pt", arch="resnet34", num_classes=6)


def test_official_ke_checkpoint_is_read_with_its_masks(tmp_path):
    from conftest import ke_kels_masks

    model = create_model("resnet18", num_classes=5)
    sd = model.state_dict()
    masks = ke_kels_masks(sd, 0.5)
    ke_sd = {"module." + k: v for k, v in sd.items()} | {f"module.{n}.mask": m for n, m in masks.items()}
    torch.save({"arch": "Split_ResNet18", "state_dict": ke_sd, "epoch": 200, "best_acc1": 61.9}, tmp_path / "ke.pth")
    back = read(tmp_path / "ke.pth")
    assert back.kind == "ke" and back.model.slimkit_spec.arch == "resnet18"
    assert back.model.fc.out_features == 5
    assert set(back.masks) == set(masks)


def test_written_files_get_the_usual_permissions(tmp_path):
    path = save(create_model("mlp"), tmp_path / "m.pt")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
