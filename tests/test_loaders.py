"""Image directories as training data: augmentation presets, cached decoding, loader workers, bad input."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.data.digits import digits
from slimkit.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Images,
    eval_dataset,
    image_dir,
)
from slimkit.data.loading import epoch_loader
from slimkit.data.select import datasets

ROOT = Path(__file__).resolve().parents[1]


def _img(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _folder(root: Path, classes: str = "abc", per_class: int = 4, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            for i in range(per_class):
                _img(root / split / c / f"{i}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return root


def _by_hand(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) normalised with ImageNet's mean and std, written out independently."""
    x = torch.from_numpy(rgb.astype(np.float64) / 255).permute(2, 0, 1)
    return ((x - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1))
            / torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)).float()


def test_images_at_the_input_size_are_read_exactly_and_grayscale_becomes_equal_channels(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    _img(tmp_path / "d" / "test" / "a" / "0.png", rgb)
    _img(tmp_path / "d" / "test" / "a" / "1.png", np.full((8, 8), 200, np.uint8), mode="L")
    ds = image_dir(str(tmp_path / "d"), (3, 8, 8), "test").prepare()
    assert ds.pixels is not None  # small: decoded once
    torch.testing.assert_close(ds[0][0], _by_hand(rgb))
    torch.testing.assert_close(ds[1][0], _by_hand(np.full((8, 8, 3), 200, np.uint8)))


def test_mixed_sizes_and_modes_are_resized_and_read_as_rgb(tmp_path):
    """The documented policy: any size is resized (shorter side, centre crop), 8-bit modes become RGB."""
    root = tmp_path / "d"
    _img(root / "train" / "a" / "big.png", np.full((20, 14, 3), 10, np.uint8))
    _img(root / "train" / "a" / "gray.png", np.full((5, 9), 77, np.uint8), mode="L")
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 130, 255
    _img(root / "train" / "b" / "rgba.png", rgba, mode="RGBA")
    _img(root / "test" / "a" / "0.png", np.full((8, 8, 3), 1, np.uint8))
    _img(root / "test" / "b" / "0.png", np.full((8, 8, 3), 2, np.uint8))
    train, _ = datasets(str(root), 3, 8, augment="none")
    got = {Path(p).name: train[i][0] for i, (p, _) in enumerate(train.items)}
    assert all(x.shape == (3, 8, 8) for x in got.values())
    torch.testing.assert_close(got["big.png"], _by_hand(np.full((8, 8, 3), 10, np.uint8)))  # constant stays constant
    torch.testing.assert_close(got["gray.png"], _by_hand(np.full((8, 8, 3), 77, np.uint8)))
    want = np.zeros((8, 8, 3), np.uint8)
    want[..., 1] = 130
    torch.testing.assert_close(got["rgba.png"], _by_hand(want))  # alpha dropped


def test_digits_written_as_files_are_the_same_images_and_the_same_subset(tmp_path):
    """tools/digits_to_folder.py: both layouts hold the built-in split's images, in its per-class order."""
    spec = importlib.util.spec_from_file_location("digits_to_folder", ROOT / "tools" / "digits_to_folder.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    roots = tool.write(tmp_path)
    ref_tr, ref_te = datasets("digits", 1, 8, train_per_class=5, subset_seed=3)
    for root in roots.values():
        tr, te = datasets(str(root), 3, 8, train_per_class=5, subset_seed=3, augment="none")
        for ref, ds in ((ref_tr, tr), (ref_te, te)):
            # an ImageFolder lists class by class, the built-in split (and the KE lists) in file order:
            # the same images in the same order within each class
            y_ref, y = ([int(d[i][1]) for i in range(len(d))] for d in (ref, ds))
            o_ref, o = sorted(range(len(y_ref)), key=y_ref.__getitem__), sorted(range(len(y)), key=y.__getitem__)
            assert [y_ref[i] for i in o_ref] == [y[i] for i in o]
            x_ref = torch.stack([ref[i][0] for i in o_ref]).add(1).div(2)  # v/16 in [0, 1]
            x = torch.stack([ds[i][0] for i in o])
            x01 = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            torch.testing.assert_close(x01, x_ref.expand(-1, 3, -1, -1), atol=0.5 / 255 + 1e-6, rtol=0)


def test_augmentation_is_seeded_per_item_and_does_what_its_name_says(tmp_path):
    _folder(tmp_path / "d", per_class=2)
    plain = image_dir(str(tmp_path / "d"), (3, 8, 8), "train").prepare()
    x0 = plain[0][0]
    flip = image_dir(str(tmp_path / "d"), (3, 8, 8), "train", augment="flip").prepare()
    seen = set()
    for seed in range(12):
        a = flip[(0, seed)][0]
        assert torch.equal(a, flip[(0, seed)][0])  # the same (item, seed): the same draw
        assert torch.equal(a, x0) or torch.equal(a, x0.flip(-1))
        seen.add(torch.equal(a, x0))
    assert seen == {True, False}
    shift = image_dir(str(tmp_path / "d"), (3, 8, 8), "train", augment="shift").prepare()
    raw = plain.pixels[0]
    moved = 0
    for seed in range(12):
        px = (shift[(0, seed)][0] * torch.tensor(IMAGENET_STD).view(3, 1, 1)
              + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).mul(255).round().to(torch.uint8)
        # a translation by at most 1 pixel (8 // 8) with zero fill: find it by trying every offset
        padded = torch.nn.functional.pad(raw, (1, 1, 1, 1))
        hits = [(dy, dx) for dy in range(3) for dx in range(3) if torch.equal(px, padded[:, dy:dy + 8, dx:dx + 8])]
        assert hits, seed
        moved += hits[0] != (1, 1)
    assert moved > 0


def _train_weights(tmp_path: Path, data: Path, name: str, *extra: str, cli) -> dict[str, torch.Tensor]:
    r = cli("train", "--data", data, "--image-size", "8", "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "4",
            "--arch", "cifar_resnet", *extra, "--out", tmp_path / name)
    assert r.code == 0, r.err
    return torch.load(tmp_path / name / "last.pt", weights_only=True)


def test_results_do_not_depend_on_the_number_of_workers(cli, tmp_path):
    data = _folder(tmp_path / "d", per_class=3)
    w0 = _train_weights(tmp_path, data, "w0", "--augment", "crop-flip", "--workers", "0", cli=cli)
    w2 = _train_weights(tmp_path, data, "w2", "--augment", "crop-flip", "--workers", "2", cli=cli)
    for k, v in w0["state_dict"].items():
        assert torch.equal(v, w2["state_dict"][k]), k
    pre = w0["meta"]["data"]["preprocess"]
    assert pre == {"augment": "crop-flip", "resize": "fit", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    r = cli("export", tmp_path / "w0" / "last.pt", "-o", tmp_path / "w0.onnx")  # the file says how to feed it
    assert r.code == 0, r.err
    import json

    import onnx

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "w0.onnx")).metadata_props}
    assert json.loads(props["slimkit.preprocess"]) == pre
    other = _train_weights(tmp_path, data, "none", "--augment", "none", "--workers", "0", cli=cli)
    assert not torch.equal(other["state_dict"]["fc.weight"], w0["state_dict"]["fc.weight"])


def test_persistent_workers_follow_each_epochs_order(tmp_path):
    _folder(tmp_path / "d", per_class=4)
    ds = image_dir(str(tmp_path / "d"), (3, 8, 8), "train", augment="shift", workers=1).prepare()
    solo = image_dir(str(tmp_path / "d"), (3, 8, 8), "train", augment="shift", workers=0).prepare()
    for seed in (5, 6, 5):
        a = [b for b in epoch_loader(ds, 5, seed)]
        b = [b for b in epoch_loader(solo, 5, seed)]
        assert len(a) == len(b) == 3
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(6)).tolist()  # shuffle=True's order
    assert torch.cat([y for _, y in epoch_loader(ds, 5, 6)]).tolist() == [ds.targets[i] for i in order]


def test_compare_evaluates_with_the_recorded_preprocessing(tmp_path):
    """A checkpoint that records 'fit' reads an 8x8 image as it is; one without a record gets the old
    ImageNet margin (resize to 9, centre crop 8)."""
    rgb = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    _img(tmp_path / "d" / "test" / "a" / "0.png", rgb)
    meta = {"data": {"preprocess": {"augment": "shift", "resize": "fit", "mean": [0.5] * 3, "std": [0.25] * 3}}}
    x = eval_dataset(str(tmp_path / "d"), (3, 8, 8), meta)[0][0]
    want = (torch.from_numpy(rgb).permute(2, 0, 1).double() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, want.float())
    old = eval_dataset(str(tmp_path / "d"), (3, 8, 8), {"data": {}})[0][0]
    assert not torch.allclose(old, _by_hand(rgb), atol=1e-3)


def test_digits_with_a_torchvision_preset_trains_and_keeps_the_default_shift_path(cli, tmp_path):
    tr, _ = datasets("digits", 1, 8, train_per_class=2, augment="flip")
    x = digits("train")[0][0]
    assert tr.batch_augment is None and tr.preprocess["augment"] == "flip"
    tr2, _ = datasets("digits", 1, 8)
    assert tr2.batch_augment is not None and tr2.preprocess["augment"] == "shift"  # auto below 64 px: the digits' shift
    r = cli("evolve", "--image-size", "8", "--epochs", "1", "--generations", "1", "--train-per-class", "3",
            "--augment", "trivialaugment", "--workers", "1", "--out", tmp_path / "run")
    assert r.code == 0, r.err
    assert x.shape == (1, 8, 8)


@pytest.mark.parametrize("verb", ["train", "evolve"])
def test_bad_augment_and_workers_one_line_exit_2(cli, tmp_path, verb):
    for flag, value, expected in (("--augment", "mixup", "invalid choice: 'mixup'"),
                                  ("--workers", "-1", "must be 0 (load in the training process) or more, got '-1'"),
                                  ("--workers", "two", "got 'two'")):
        out = tmp_path / f"{verb}{value}"
        r = cli(verb, flag, value, "--epochs", "1", "--out", out)
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and expected in r.err, r.err
        assert not out.exists()
    with pytest.raises(SlimkitError, match="unknown --augment preset 'mixup'; available: auto, none, shift"):
        datasets("digits", 1, 8, augment="mixup")


def test_bad_images_one_line_exit_2_naming_the_file(cli, tmp_path):
    bad = _folder(tmp_path / "bad", per_class=2)
    (bad / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    deep = _folder(tmp_path / "deep", per_class=2)
    _img(deep / "test" / "c" / "depth.png", np.full((8, 8), 40000, np.uint16))  # PIL: mode I;16
    for name, expected in (("bad", "broken.png: cannot decode this image (not in a format PIL reads)"),
                           ("deep", "depth.png: 16-bit pixels (PIL mode I;16) cannot be read as 8-bit RGB")):
        for verb in ("evolve", "den"):
            out = tmp_path / f"run_{name}_{verb}"
            r = cli(verb, "--data", tmp_path / name, "--image-size", "8", "--epochs", "1", "--out", out)
            assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and expected in r.err, (verb, r.err)
            assert r.err.count(".png") == 1  # the file named once, not wrapped in a second message
            assert not out.exists()


def test_den_refuses_splits_with_different_class_folders(cli, tmp_path):
    root = _folder(tmp_path / "d", classes="abcd", per_class=2)
    for f in (root / "test" / "b").iterdir():
        f.unlink()
    (root / "test" / "b").rmdir()
    r = cli("den", "--data", root, "--image-size", "8", "--epochs", "1", "--baselines", "none", "--out", tmp_path / "run")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "different class folders" in r.err, r.err
    assert not (tmp_path / "run").exists()


def test_large_sets_are_read_per_item_with_the_same_values(tmp_path):
    _folder(tmp_path / "d", per_class=2, size=10)
    cached = image_dir(str(tmp_path / "d"), (3, 8, 8), "test").prepare()
    lazy = image_dir(str(tmp_path / "d"), (3, 8, 8), "test", cache=False).prepare()
    assert isinstance(lazy, Images) and lazy.pixels is None and cached.pixels is not None
    for i in range(len(cached)):
        assert torch.equal(cached[i][0], lazy[i][0])


def test_committed_glyphs_are_split_by_font_family_and_load_through_the_folder_path(tmp_path):
    spec = importlib.util.spec_from_file_location("make_glyphs", ROOT / "tools" / "make_glyphs.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    npz = ROOT / "benchmarks" / "data" / "glyphs.npz"
    d = np.load(npz)
    test_fonts, train_fonts = set(d["font"][d["in_test"]].tolist()), set(d["font"][~d["in_test"]].tolist())
    assert not test_fonts & train_fonts and len(test_fonts) >= 20
    fam = d["families"]
    assert not {str(fam[i]) for i in test_fonts} & {str(fam[i]) for i in train_fonts}  # unseen typefaces
    assert np.bincount(d["labels"][d["in_test"]]).tolist() == [len(test_fonts)] * 10  # every letter of every font
    files = {str(f) for f in d["files"][sorted(test_fonts)]} & {str(f) for f in d["files"][sorted(train_fonts)]}
    assert not files
    root = tool.write_folder(npz, tmp_path / "glyphs")
    train, test = datasets(str(root), 3, 16, augment="none")
    assert train.classes == test.classes == list("ABCDEFGHIJ")
    assert len(test) == int(d["in_test"].sum()) and len(train) + len(test) == len(d["labels"])
