"""Datasets: the bundled digits set, the demo checkpoint trained on it, image folders and the KE lists layout."""
from __future__ import annotations

from pathlib import Path

import torch

from slimkit import load
from slimkit.data.digits import digits

DEMO = Path(__file__).resolve().parents[1] / "models" / "digits_resnet20.pt"


def test_digits_split_is_stratified_disjoint_and_seeded():
    tr, te = digits("train"), digits("test")
    assert len(tr) + len(te) == 1797
    assert tr.tensors[0].shape[1:] == (1, 8, 8) and tr.tensors[0].min() >= -1 and tr.tensors[0].max() <= 1
    assert torch.bincount(te.tensors[1]).min() >= 34  # every class in the test split, ~20% each
    # disjoint: no test image also in train
    a = {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(*tr.tensors)}
    b = [tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(*te.tensors)]
    assert sum(t in a for t in b) < 5  # the raw set has a handful of exact duplicates
    assert torch.equal(digits("test", seed=0).tensors[1], te.tensors[1])
    assert not torch.equal(digits("test", seed=1).tensors[1], te.tensors[1])


def test_digits_resize_and_channels():
    x, _ = digits("test", image_size=16, in_chans=3).tensors
    assert x.shape[1:] == (3, 16, 16)


def test_bundled_demo_checkpoint_is_really_trained():
    model = load(DEMO)
    raw = torch.load(DEMO, weights_only=True)["meta"]
    assert raw["data"]["image_size"] == 16
    x, y = digits("test", image_size=16).tensors
    with torch.inference_mode():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc >= 0.95
    assert abs(acc - raw["metrics"]["test_acc"]) < 1e-6  # the recorded figure is the measured one


def _png(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(12, 12, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)


def _ke_layout(root: Path, rows: dict[str, list[tuple[str, int]]]) -> Path:
    """The Knowledge Evolution layout: images anywhere under root, lists/{trn,tst}.csv naming them."""
    (root / "lists").mkdir(parents=True)
    for split, items in rows.items():
        lines = ["file_name,label"] + [f"{f},{y}" for f, y in items]
        (root / "lists" / f"{split}.csv").write_text("\n".join(lines) + "\n")
        for i, (f, _) in enumerate(items):
            if not f.startswith("missing"):
                _png(root / f, i)
    return root


def test_ke_lists_layout_loads_labels_as_written(tmp_path):
    from slimkit.data.images import image_dir
    from slimkit.data.loading import labels_of

    root = _ke_layout(tmp_path / "flw", {"trn": [("jpg/a.png", 0), ("jpg/b.png", 2), ("jpg/c.png", 1)],
                                         "tst": [("jpg/d.png", 1), ("jpg/e.png", 0)]})
    train, test = image_dir(str(root), (3, 8, 8), "train", augment="crop-flip"), image_dir(str(root), (3, 8, 8), "test")
    assert labels_of(train).tolist() == [0, 2, 1] and labels_of(test).tolist() == [1, 0]
    x, y = train[1]
    assert x.shape == (3, 8, 8) and y == 2


def test_image_folder_splits_with_different_class_folders_are_refused(tmp_path):
    """ImageFolder numbers each split's folders alone: test/ without class b would relabel c as 1."""
    import pytest

    from slimkit.core.errors import SlimkitError
    from slimkit.data.select import datasets

    for split, classes in (("train", "abc"), ("test", "ac")):
        for c in classes:
            _png(tmp_path / "d" / split / c / "0.png", ord(c))
    with pytest.raises(SlimkitError, match="different class folders"):
        datasets(str(tmp_path / "d"), 3, 8)
    _png(tmp_path / "d" / "test" / "b" / "0.png", 1)
    train, test = datasets(str(tmp_path / "d"), 3, 8)
    assert train.classes == test.classes == ["a", "b", "c"]


def test_dataset_refusals_one_line_exit_2(cli, tmp_path):
    """Unknown path or layout, CSV rows naming missing files, bad labels, empty lists: one line, exit 2."""
    (tmp_path / "nolayout").mkdir()
    _ke_layout(tmp_path / "missing", {"trn": [("a.png", 0), ("missing.png", 1)], "tst": [("b.png", 0)]})
    _ke_layout(tmp_path / "badlabel", {"trn": [("a.png", "x")], "tst": [("b.png", 0)]})
    _ke_layout(tmp_path / "neg", {"trn": [("a.png", -1)], "tst": [("b.png", 0)]})
    _ke_layout(tmp_path / "empty", {"trn": [], "tst": [("b.png", 0)]})
    cases = {
        "nope": "does not exist",
        "nolayout": "has neither lists/trn.csv nor a train/",
        "missing": "names missing.png, which does not exist",
        "badlabel": "needs file_name and an integer label",
        "neg": "is negative",
        "empty": "lists no images",
    }
    for name, expected in cases.items():
        out = tmp_path / f"run_{name}"
        r = cli("evolve", "--data", tmp_path / name, "--image-size", "8", "--epochs", "1", "--generations", "1",
                "--out", out)
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and expected in r.err, (name, r.err)
        assert not out.exists()


def test_evolve_runs_on_a_ke_layout_dataset(cli, tmp_path):
    rows = {"trn": [(f"i/tr{i}.png", i % 3) for i in range(9)], "tst": [(f"i/te{i}.png", i % 3) for i in range(6)]}
    root = _ke_layout(tmp_path / "ds", rows)
    r = cli("evolve", "--data", root, "--image-size", "8", "--epochs", "1", "--warmup-epochs", "0",
            "--generations", "2", "--batch-size", "4", "--num-classes", "3", "--out", tmp_path / "run")
    assert r.code == 0, r.err
    ck = load(tmp_path / "run" / "gen2" / "last.pt")
    assert ck.slimkit_spec.args["num_classes"] == 3 and ck.slimkit_spec.args["in_chans"] == 3


def test_bundled_ke_checkpoint_fit_hypothesis_keeps_its_accuracy():
    """The KE-trained demo: its extracted fit hypothesis (25% of the parameters) scores what the file records."""
    from slimkit.models.checkpoint import read
    from slimkit.models.hypothesis import fit_hypothesis

    path = DEMO.with_name("digits_resnet20_ke.pt")
    fh = fit_hypothesis(read(path), 0.5)
    meta = torch.load(path, weights_only=True)["meta"]
    x, y = digits("test", image_size=16).tensors
    with torch.inference_mode():
        dense = float((fh.dense(x).argmax(1) == y).float().mean())
        slim = float((fh.slim(x).argmax(1) == y).float().mean())
    assert abs(dense - meta["metrics"]["dense_test_acc"]) < 1e-6 and abs(slim - meta["metrics"]["fit_test_acc"]) < 1e-6
    assert slim >= 0.97 and sum(p.numel() for p in fh.slim.parameters()) < 0.26 * sum(p.numel() for p in fh.dense.parameters())
