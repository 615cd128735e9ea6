"""Knowledge distillation's loss and teacher check (engine/distill.py), against hand-worked cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimkit import SlimkitError, create_model
from slimkit.engine.distill import check_teacher, kd_loss

L3 = math.log(3.0)


def test_two_class_case_worked_by_hand():
    # example 1: student logits (0, ln 3) -> softmax (1/4, 3/4), label 1: CE = ln(4/3).
    #   At T = 2: student (0, ln3/2) -> q = (1, sqrt3)/(1 + sqrt3); teacher (ln 3, 0) -> p = (sqrt3, 1)/(1 + sqrt3);
    #   KL(p || q) = p0 ln(p0/q0) + p1 ln(p1/q1) = (p0 - p1) ln(sqrt 3) = (sqrt3 - 1)/(sqrt3 + 1) * ln3 / 2.
    # example 2: student = teacher = (0, 0), label 0: CE = ln 2, KL = 0.
    # Batch means, weight 1/4, T = 2: 3/4 * (ln(4/3) + ln 2)/2 + 1/4 * 4 * (KL1 + 0)/2.
    s3 = math.sqrt(3.0)
    kl1 = (s3 - 1) / (s3 + 1) * L3 / 2
    expected = 0.75 * (math.log(4 / 3) + math.log(2)) / 2 + 0.25 * 4 * kl1 / 2
    student = torch.tensor([[0.0, L3], [0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[L3, 0.0], [0.0, 0.0]], dtype=torch.float64)
    got = kd_loss(student, teacher, torch.tensor([1, 0]), weight=0.25, temperature=2.0)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_three_class_soft_term_only_worked_by_hand():
    # student (0, 0, 0) -> q = 1/3 each; teacher (ln 2, 0, 0) -> p = (1/2, 1/4, 1/4) at T = 1.
    # KL(p || q) = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8); weight 1: the label does not count.
    student = torch.zeros(1, 3, dtype=torch.float64)
    teacher = torch.tensor([[math.log(2.0), 0.0, 0.0]], dtype=torch.float64)
    for label in (0, 2):
        got = kd_loss(student, teacher, torch.tensor([label]), weight=1.0, temperature=1.0)
        assert float(got) == pytest.approx(0.5 * math.log(9 / 8), rel=1e-12)


def test_weight_zero_is_plain_cross_entropy_and_the_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 4, generator=g, requires_grad=True)
    teacher = torch.randn(5, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 4, (5,), generator=g)
    by_hand = -torch.log_softmax(student.detach(), 1)[torch.arange(5), y].mean()
    assert float(kd_loss(student, teacher, y, 0.0, 4.0).detach()) == pytest.approx(float(by_hand), rel=1e-6)
    kd_loss(student, teacher, y, 0.7, 4.0).backward()
    assert student.grad is not None and teacher.grad is None


def test_label_smoothing_smooths_the_hard_term_only_worked_by_hand():
    # student (0, ln 3) -> log q = (ln 1/4, ln 3/4); label 1, smoothing e = 0.1 over K = 2 classes:
    # target (0.05, 0.95), CE = -(0.05 ln 1/4 + 0.95 ln 3/4). Teacher = student: KL = 0, so the loss is (1 - w) CE.
    student = torch.tensor([[0.0, L3]], dtype=torch.float64)
    ce = -(0.05 * math.log(0.25) + 0.95 * math.log(0.75))
    got = kd_loss(student, student, torch.tensor([1]), weight=0.3, temperature=2.0, label_smoothing=0.1)
    assert float(got) == pytest.approx(0.7 * ce, rel=1e-12)


def test_identical_logits_leave_only_the_weighted_cross_entropy():
    # KL(p || p) = 0 at any temperature: the loss is (1 - w) CE
    logits = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([2])
    ce = float(F.cross_entropy(logits, y))
    assert float(kd_loss(logits, logits, y, 0.4, 3.0)) == pytest.approx(0.6 * ce, rel=1e-12)


@pytest.mark.parametrize("weight, temperature, match", [
    (-0.1, 2.0, r"^distillation weight \(--kd-weight\) must be in \[0, 1\], got -0.1$"),
    (1.5, 2.0, r"^distillation weight \(--kd-weight\) must be in \[0, 1\], got 1.5$"),
    (float("nan"), 2.0, r"^distillation weight .* got nan$"),
    (0.5, 0.0, r"^distillation temperature \(--kd-temperature\) must be a positive number, got 0.0$"),
    (0.5, float("inf"), r"^distillation temperature .* got inf$"),
    (0.5, "hot", r"^distillation weight and temperature must be numbers"),
])
def test_bad_weight_or_temperature_is_refused(weight, temperature, match):
    with pytest.raises(SlimkitError, match=match):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), weight, temperature)


def _net(classes: int, size: int = 8, chans: int = 1):
    return create_model("cifar_resnet", depth=8, width=4, num_classes=classes, in_chans=chans, image_size=size)


def test_a_matching_teacher_passes_and_keeps_its_mode():
    teacher, student = _net(5), _net(5)
    teacher.train()
    mean = teacher.bn1.running_mean.clone()
    check_teacher(teacher, student)
    assert teacher.training and torch.equal(teacher.bn1.running_mean, mean)


@pytest.mark.parametrize("teacher, match", [
    (lambda: _net(10), r"^dense\.pt does not fit the student: it takes 1x8x8 inputs and has 10 classes, the student "
                       r"takes 1x8x8 and has 5; a teacher must match both$"),
    (lambda: _net(5, size=16), r"^dense\.pt does not fit the student: it takes 1x16x16 inputs and has 5 classes"),
    (lambda: _net(5, chans=3), r"^dense\.pt does not fit the student: it takes 3x8x8 inputs"),
])
def test_a_teacher_that_does_not_fit_is_refused_in_one_line(teacher, match):
    with pytest.raises(SlimkitError, match=match) as e:
        check_teacher(teacher(), _net(5), teacher_name="dense.pt")
    assert "\n" not in str(e.value)
