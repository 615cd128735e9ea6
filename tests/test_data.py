"""The bundled digits set and the bundled demo checkpoint trained on it."""
from __future__ import annotations

from pathlib import Path

import torch

from slimkit import load
from slimkit.data import digits

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
