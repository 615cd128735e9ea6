"""The CUDA paths rehearsed without a GPU, under PyTorch's FakeTensorMode.

Inside ``FakeTensorMode`` a model created with ``torch.device("cuda")`` as the default device has
parameters that report ``cuda:0`` on a machine without a GPU, and every op that mixes them with a
CPU tensor raises ``FakeTensorDeviceMismatchError`` exactly where a real GPU run would raise
"Expected all tensors to be on the same device" (the ``meta`` device would not raise). Only the
model is created on the fake GPU: the code under test runs with the CPU as its default device, as
it does on a GPU machine. Nothing of slimkit is monkeypatched.

What the rehearsal cannot show: numbers (fake tensors hold none), anything that reads a value back
(``int(...)`` of a fake tensor raises), backward passes (autograd asks for a real CUDA context), and
``copy.deepcopy`` of a fake model: torch 2.14 reads the fake tensors' data pointers there, and the
suite then crashed with a segfault now and then, so paths that deep-copy a model (surgery's
apply_plan, merge's compress) are rehearsed up to the copy only. ``Module.to`` of a fake model is
refused by torch 2.14 (it swaps parameters, and fake tensors carry weak references), so models are
built on the fake GPU rather than moved there by ``prepare_model``.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

import slimkit
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import apply_masks, kels_plan, plan_masks, wels_masks
from slimkit.engine.evaluate import predictions

CUDA = torch.device("cuda", 0)
SHAPE = dict(num_classes=10, in_chans=1, image_size=16)


@contextlib.contextmanager
def fake_gpu() -> Iterator[FakeTensorMode]:
    """A fake-tensor world in which real CPU tensors (data, masks) may enter, as on a GPU host."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # scalar outputs: a DataLoader draws its base seed with .item() when it starts iterating
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(allow_scalar_outputs=True))
    # the garbage collector, run inside a fake mode, crashed the interpreter now and then (torch 2.14):
    # collect only outside the modes
    gc.collect()
    gc.disable()
    try:
        with mode:
            yield mode
    finally:
        gc.enable()
        gc.collect()


@pytest.fixture
def fake():
    with fake_gpu() as mode:
        yield mode


def on_cuda(arch: str, **kwargs) -> torch.nn.Module:
    """``slimkit.create_model`` with parameters on the (fake) GPU; the default device is the CPU after."""
    with torch.device("cuda"):
        return slimkit.create_model(arch, **kwargs)


def test_the_rehearsal_is_faithful(fake):
    # the stand-in raises where a GPU would: a CUDA model fed a CPU tensor
    model = on_cuda("cifar_resnet", **SHAPE)
    assert next(model.parameters()).device == CUDA
    with pytest.raises(RuntimeError, match="same device"):
        model(torch.zeros(2, 1, 16, 16))
    with pytest.raises(FakeTensorDeviceMismatchError):
        next(model.parameters()) * torch.ones(next(model.parameters()).shape)
    assert model(torch.zeros(2, 1, 16, 16).to(CUDA)).device == CUDA


def _cpu_kels_masks(arch: str, split_rate: float = 0.5, **kwargs) -> dict[str, torch.Tensor]:
    # evolve builds its masks once, on the CPU, before the model moves to the GPU
    cpu = slimkit.create_model(arch, **kwargs)
    graph = ChannelGraph(cpu, cpu.slimkit_spec.input_shape)
    return plan_masks(graph, kels_plan(graph, split_rate))


@pytest.mark.parametrize("arch,kwargs", [("cifar_resnet", SHAPE), ("small_vgg", dict(in_chans=1, image_size=8)),
                                         ("mlp", dict(in_chans=1, image_size=8))])
def test_split_masks_from_the_cpu_apply_to_a_cuda_model(arch, kwargs):
    # defect 1: `slimkit evolve --device cuda` evaluates the fit hypothesis as apply_masks(model on
    # the GPU, masks built on the CPU) after its first epoch
    masks = _cpu_kels_masks(arch, **kwargs)  # real CPU tensors, as evolve holds them
    with fake_gpu():
        model = on_cuda(arch, **kwargs)
        fit = apply_masks(model, masks)  # evolve masks a deep copy (see the module docstring)
        assert {p.device for p in fit.parameters()} == {CUDA}
        x = torch.zeros(2, *model.slimkit_spec.input_shape)
        assert fit(x.to(CUDA)).shape == (2, kwargs.get("num_classes", 10))


def test_wels_masks_are_built_on_the_weights_device(fake):
    model = on_cuda("cifar_resnet", **SHAPE)
    masks = wels_masks(model, 0.5, seed=0)
    assert {m.device for m in masks.values()} == {CUDA}
    apply_masks(model, masks)


def test_reset_hypothesis_is_redrawn_on_the_gpu_from_a_cpu_generator():
    from slimkit.methods.ke.evolve import reinit_reset

    masks = _cpu_kels_masks("cifar_resnet", **SHAPE)
    with fake_gpu():
        model = on_cuda("cifar_resnet", **SHAPE)
        reinit_reset(model, masks, torch.Generator().manual_seed(7))
        assert {p.device for p in model.parameters()} == {CUDA}


def test_evaluation_moves_each_batch_to_the_model_and_predictions_back(fake):
    from torch.utils.data import TensorDataset

    model = on_cuda("cifar_resnet", **SHAPE)
    data = TensorDataset(torch.zeros(5, 1, 16, 16), torch.zeros(5, dtype=torch.long))  # CPU, like a DataLoader's
    seen = 0
    for pred, y in predictions(model, data, batch_size=2, device="cuda:0"):
        assert pred.device.type == "cpu" and pred.shape == y.shape
        seen += len(y)
    assert seen == 5


def test_a_network_on_the_gpu_is_traced_on_the_gpu(fake):
    # surgery, merging and DEN trace the network they are given: the example input must follow it
    model = on_cuda("cifar_resnet", **SHAPE)
    graph = ChannelGraph(model, model.slimkit_spec.input_shape)
    assert kels_plan(graph, 0.5).keep  # the coupling was traced


def test_gated_student_on_the_gpu_gates_on_the_gpu(fake):
    from slimkit.methods.merge.transform import GatedStudent

    net = on_cuda("cifar_resnet", **SHAPE)
    gated = GatedStudent(net)
    assert {p.device for p in gated.parameters()} == {CUDA}
    x = torch.zeros(2, 1, 16, 16).to(CUDA)
    gated.train()
    assert gated(x).device == CUDA  # sampled gates
    gated.eval()
    assert gated(x).device == CUDA  # deterministic gates
    assert gated.penalty().device == CUDA  # (gate_plan reads log alpha's values: not rehearsable)


def test_export_runs_a_library_callers_gpu_model_on_its_own_device(fake):
    # defect 10: export's verification input was a CPU tensor whatever the model's device
    from slimkit.deploy.export import reference_output

    model = on_cuda("cifar_resnet", **SHAPE)
    out = reference_output(model, torch.zeros(2, 1, 16, 16))
    assert out.device.type == "cpu" and out.dtype == torch.float32 and out.shape == (2, 10)


def test_den_steps_on_the_gpu(fake):
    # slimkit den --device cuda: heads, growth, masks, unit removal and duplication on the network's
    # device. (fit needs backward passes; select_units, dead_units and drift read values back.)
    from slimkit.methods.den import steps as D

    net = on_cuda("den_mlp", hidden=(6, 5), heads=(), image_size=4, in_chans=1)
    gen = torch.Generator().manual_seed(0)  # on the CPU, as run_den holds it
    D.add_head(net, 2, gen)
    D.add_head(net, 3, gen)
    D.grow(net, 2, task=2, generator=gen)
    assert D.widths(net) == [8, 7] and {p.device for p in net.parameters()} == {CUDA}
    for masks in (D.selected_masks(net, [[0, 1], [2]], task=2), D.new_unit_masks(net, task=2)):
        for name, m in masks.items():
            assert m is None or m.device == CUDA, name
    D.remove_units(net, [[6], []])  # traced and cut on the GPU
    assert D.widths(net) == [7, 7] and {b.device for b in net.buffers()} == {CUDA}
    x = torch.zeros(3, 1, 4, 4).to(CUDA)
    assert net(x, 1).shape == (3, 2) and net(x, 2).shape == (3, 3)  # timestamped inference
    snap = D.snapshot(net)
    D.add_head(net, 2, gen)
    D.grow(net, 1, task=3, generator=gen)
    assert net(x, 3).shape == (3, 2) and D.drift(net, snap)[0].device == CUDA


def test_macs_are_counted_on_the_models_device(fake):
    # count_macs built its input on the CPU: a caller's CUDA model failed with a device mismatch
    from slimkit.core.cost import count_macs

    model = on_cuda("cifar_resnet", **SHAPE)
    # cifar_resnet depth 20, width 16 at 1x16x16, counted by hand from its layer shapes: the stem
    # (16 3x3 filters of 1 channel), 3 stages of 6 3x3 convs (16/32/64 wide at 16/8/4 px), the two
    # 1x1 shortcut convs and the classifier (64 -> 10)
    stem = 16 * 16 * 16 * 9 * 1
    stages = 6 * (16 * 16 * 16 * 9 * 16) + (8 * 8 * 32 * 9 * 16 + 5 * 8 * 8 * 32 * 9 * 32) + \
        (4 * 4 * 64 * 9 * 32 + 5 * 4 * 4 * 64 * 9 * 64)
    shortcuts = 8 * 8 * 32 * 16 + 4 * 4 * 64 * 32
    assert count_macs(model, (1, 16, 16)) == stem + stages + shortcuts + 64 * 10


def test_extracts_verifying_input_is_on_the_models_device(fake):
    # extract's verifying forward (and merge's check of the big student) draws its input from a CPU
    # generator; it must then run on the caller's device (the run itself reads values back, which a
    # fake tensor cannot, so the input and one forward with it are rehearsed)
    from slimkit.core.cost import MacCounter, example_input

    model = on_cuda("cifar_resnet", **SHAPE)
    x = example_input(model, (1, 16, 16), 2, torch.Generator().manual_seed(0))
    assert x.device == CUDA and x.shape == (2, 1, 16, 16)
    with MacCounter(model) as mc:
        assert model(x).device == CUDA
    assert mc.samples == 2


def test_a_frozen_network_on_the_gpu_is_traced_whole(fake):
    model = on_cuda("cifar_resnet", **SHAPE)
    for p in list(model.parameters())[:6]:  # the stem and the first block frozen
        p.requires_grad_(False)
    graph = ChannelGraph(model, model.slimkit_spec.input_shape)
    assert set(kels_plan(graph, 0.5).keep) >= {"conv1", "layer1.0.conv1"}
    assert [p.requires_grad for p in model.parameters()][:7] == [False] * 6 + [True]
