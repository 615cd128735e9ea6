"""Knowledge distillation (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
2015): the loss, and the check that a teacher fits a student."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.cost import example_input
from slimkit.core.errors import SlimkitError
from slimkit.models import spec_of

__all__ = ["kd_loss", "check_kd_args", "check_teacher"]


def check_kd_args(weight: float, temperature: float) -> tuple[float, float]:
    """A distillation weight in [0, 1] and a temperature > 0 (finite), or a one-line SlimkitError."""
    try:
        w, t = float(weight), float(temperature)
    except (TypeError, ValueError) as exc:
        raise SlimkitError(f"distillation weight and temperature must be numbers, got {weight!r} and {temperature!r}") from exc
    if not 0.0 <= w <= 1.0:  # also rejects NaN
        raise SlimkitError(f"distillation weight (--kd-weight) must be in [0, 1], got {weight!r}")
    if not (t > 0.0 and math.isfinite(t)):
        raise SlimkitError(f"distillation temperature (--kd-temperature) must be a positive number, got {temperature!r}")
    return w, t


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            weight: float, temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinton et al.'s distillation loss, averaged over the batch of B examples::

        (1 - w) * CE(s, y)  +  w * T^2 * KL( softmax(t / T) || softmax(s / T) )

    with CE(s, y) = -(1/B) sum_b log softmax(s_b)[y_b] (plain cross-entropy at temperature 1; with
    ``label_smoothing`` e, the cross-entropy against (1 - e) one_hot(y) + e / K, as the run's loss) and
    KL(p || q) = (1/B) sum_b sum_k p_bk (log p_bk - log q_bk). The T^2 factor keeps the soft term's
    gradients the same size as the hard term's when T changes (the paper's section 2). The teacher's
    logits are constants (detached). ``weight`` 0 gives plain cross-entropy.
    """
    w, t = check_kd_args(weight, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise SlimkitError(f"teacher logits {list(teacher_logits.shape)} do not match the student's "
                           f"{list(student_logits.shape)}")
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if w == 0.0:
        return hard
    log_q = F.log_softmax(student_logits / t, dim=1)  # (B, K) student at temperature T
    log_p = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / t, dim=1)  # (B, K) teacher
    soft = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)  # KL(p || q) per example
    return (1.0 - w) * hard + w * t * t * soft


def _classes(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The number of outputs of ``model`` on one input (its mode and BN statistics are left as they were)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(example_input(model, input_shape))
    finally:
        model.train(was_training)
    return int(out.shape[-1])


def check_teacher(teacher: nn.Module, student: nn.Module, teacher_name: str = "teacher") -> None:
    """Refuse, in one line, a teacher whose input shape or class count differs from the student's.

    Both networks must carry a ModelSpec (built by ``create_model`` or read by ``slimkit.load``); the
    class count is read from one forward pass of a zero input at batch 1.
    """
    t_shape, s_shape = tuple(spec_of(teacher).input_shape), tuple(spec_of(student).input_shape)
    t_cls = _classes(teacher, t_shape)
    s_cls = _classes(student, s_shape)
    if t_shape != s_shape or t_cls != s_cls:
        fmt = "x".join
        raise SlimkitError(
            f"{teacher_name} does not fit the student: it takes {fmt(map(str, t_shape))} inputs and has {t_cls} classes, "
            f"the student takes {fmt(map(str, s_shape))} and has {s_cls}; a teacher must match both"
        )
