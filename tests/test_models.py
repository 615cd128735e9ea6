"""Model sources: built-in, torchvision, timm/NAME, package.module:callable, plugins; bad input."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from slimkit import SlimkitError, create_model, load, save
from slimkit.models import input_shape_of, list_sources, model_params

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        """A user's own CNN: conv-BN-ReLU x2, a residual add, global pool, classifier."""

        def __init__(self, num_classes: int = 10, width: int = 8):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.body(x))
            return self.head(x.mean((2, 3)))

    def tiny(width: int = 8, num_classes: int = 10):
        return TinyNet(num_classes, width)

    def not_a_module():
        return 42
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `usernets_zoo` on sys.path, as a user's own package would be."""
    d = tmp_path / "src"
    d.mkdir()
    (d / "usernets_zoo.py").write_text(USER_MODULE)
    (d / "broken_zoo.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(d))
    yield "usernets_zoo"
    for m in ("usernets_zoo", "broken_zoo"):
        sys.modules.pop(m, None)


def test_torchvision_names_beyond_the_core_list():
    m = create_model("efficientnet_b0", num_classes=7)
    assert isinstance(m, nn.Module) and m.classifier[-1].out_features == 7
    assert m.slimkit_spec.input_shape == (3, 224, 224) and m.slimkit_spec.source == "torchvision"
    assert input_shape_of("inception_v3") == (3, 299, 299)
    names = {n for n, _ in list_sources(timm_models=False)}
    import torchvision

    assert set(torchvision.models.list_models(module=torchvision.models)) <= names


def test_torchvision_model_args_pass_to_the_constructor():
    m = create_model("resnet50", num_classes=3, width_per_group=32)
    assert m.layer1[0].conv1.out_channels == 32  # 64 * 32/64
    assert m.slimkit_spec.args == {"num_classes": 3, "width_per_group": 32}


def test_timm_source_input_shape_from_its_config():
    pytest.importorskip("timm")
    m = create_model("timm/efficientnet_b1", num_classes=4)
    # timm's pretrained config of efficientnet_b1 says 3x240x240 (see timm.models.get_pretrained_cfg)
    assert m.slimkit_spec.input_shape == (3, 240, 240)
    assert create_model("timm/efficientnet_b1", num_classes=4, input_shape=(3, 64, 64)).slimkit_spec.input_shape == (3, 64, 64)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    assert "in_chans" in model_params("timm/resnet18")


def test_import_slimkit_does_not_import_timm_or_torchvision():
    code = "import sys, slimkit.models; print('timm' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_user_callable_builds_and_checkpoint_round_trips(user_module, tmp_path):
    m = randomize_bn(create_model(f"{user_module}:tiny", width=6, input_shape=(3, 16, 16)))
    assert m.slimkit_spec.source == "import" and m.stem[0].out_channels == 6
    path = save(m, tmp_path / "u.pt")
    x = torch.randn(2, 3, 16, 16)
    back = load(path, arch=f"{user_module}:tiny")  # naming the path allows the import
    torch.testing.assert_close(back(x), m(x))
    assert back.slimkit_spec.input_shape == (3, 16, 16)
    # a class works as well as a function
    assert isinstance(create_model(f"{user_module}:TinyNet", num_classes=3), nn.Module)


def test_checkpoint_with_unnamed_import_path_is_refused(user_module, tmp_path):
    path = save(create_model(f"{user_module}:tiny"), tmp_path / "u.pt")
    sys.modules.pop(user_module)
    with pytest.raises(SlimkitError, match=f"pass --arch {user_module}:tiny to allow it"):
        load(path)
    assert user_module not in sys.modules  # refused before anything was imported


def test_plugin_entry_point(user_module, tmp_path, monkeypatch):
    import importlib.metadata as md

    import slimkit.models.registry as models

    ep = md.EntryPoint(name="tinyplug", value=f"{user_module}:tiny", group=models.PLUGIN_GROUP)
    monkeypatch.setattr(models, "_plugins", lambda: {"tinyplug": ep})
    m = create_model("tinyplug", width=4)
    assert m.slimkit_spec.source == "plugin" and m.stem[0].out_channels == 4
    assert ("tinyplug", "plugin") in list_sources("tinyplug", timm_models=False)


@pytest.mark.parametrize("name, kwargs, match", [
    ("resnt50", {}, r"unknown model 'resnt50'; closest: resnet50"),
    ("timm/resnt50", {}, r"unknown model 'timm/resnt50'; closest: timm/resnet50"),
    ("efficientnet_b0", {"depth": 3}, r"could not be built with .*TypeError.*depth"),
    ("cifar_resnet", {"depth": 9}, r"depth must be 6n\+2"),
    ("broken_zoo:net", {}, r"cannot import module 'broken_zoo'.*ModuleNotFoundError"),
    ("usernets_zoo:missing", {}, r"has no attribute 'missing'"),
    ("usernets_zoo:not_a_module", {}, r"returned a int, not a torch.nn.Module"),
    ("usernets_zoo:tiny", {"depth": 2}, r"takes no argument depth; it takes: width, num_classes"),
])
def test_bad_model_sources(user_module, name, kwargs, match):
    if name.startswith("timm/"):
        pytest.importorskip("timm")
    with pytest.raises(SlimkitError, match=match):
        create_model(name, **kwargs)


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm looks like to import
    with pytest.raises(SlimkitError, match=r"pip install slimkit\[timm\]"):
        create_model("timm/resnet18")


# --- the CLI: one line on stderr, exit 2, nothing written ------------------------------------------

@pytest.fixture
def plain(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(create_model("cifar_resnet", depth=8, width=4).state_dict(), path)
    return path


@pytest.mark.parametrize("flags, match", [
    (["--arch", "resnt18"], "unknown model 'resnt18'; closest: resnet18"),
    (["--arch", "nosuchpkg_zoo.mod:net"], "cannot import module 'nosuchpkg_zoo.mod'"),
    (["--arch", "usernets_zoo:not_a_module"], "not a torch.nn.Module"),
    (["--arch", "cifar_resnet", "--model-args", "colour=3"], "takes no argument colour"),
    (["--arch", "efficientnet_b0", "--model-args", "dropout=2"], "could not be built"),
])
def test_cli_bad_arch(cli, plain, tmp_path, user_module, flags, match):
    out = tmp_path / "out.pt"
    r = cli("extract", plain, "--split-rate", "0.5", "-o", out, *flags)
    assert r.code == 2 and match in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert "Traceback" not in r.err and not out.exists()


def test_cli_timm_missing(cli, plain, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    r = cli("extract", plain, "--split-rate", "0.5", "--arch", "timm/resnet18", "-o", tmp_path / "o.pt")
    assert r.code == 2 and "pip install slimkit[timm]" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()


def test_cli_unnamed_import_path_checkpoint(cli, tmp_path, user_module):
    ck = save(randomize_bn(create_model(f"{user_module}:tiny", input_shape=(3, 8, 8))), tmp_path / "u.pt")
    sys.modules.pop(user_module)
    r = cli("extract", ck, "--split-rate", "0.5", "-o", tmp_path / "o.pt")
    assert r.code == 2 and f"pass --arch {user_module}:tiny to allow it" in r.err
    assert len(r.err.strip().splitlines()) == 1 and not (tmp_path / "o.pt").exists()
    assert user_module not in sys.modules
    r = cli("extract", ck, "--split-rate", "0.5", "-o", tmp_path / "o.pt", "--arch", f"{user_module}:tiny")
    assert r.code == 0, r.err
    assert load(tmp_path / "o.pt", arch=f"{user_module}:tiny").stem[0].out_channels == 4


def test_cli_models_filter(cli):
    r = cli("models", "--filter", "regnet_y_4")
    assert r.code == 0
    assert "regnet_y_400mf(" in r.out and "3x224x224" in r.out and "resnet18" not in r.out
    r = cli("models", "--filter", "no-such-model-anywhere")
    assert r.code == 2 and "no model source matches" in r.err
