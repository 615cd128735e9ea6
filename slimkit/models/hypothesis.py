"""The fit hypothesis of a loaded network: KELS plan, cut with the one surgery, verified slim == masked dense.

Every route that reads a trained network and makes it physically smaller runs this step: `extract`
(methods/ke/extract.py) writes its result, `compare` (deploy/compare.py) times and scores it. It reads
what a checkpoint recorded (split masks of an official KE file, a KELS split's rate and alignment), so it
sits beside the checkpoints (checkpoint.py); the verification itself is :func:`verify_slim`.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from slimkit.core.cost import MacCounter, example_input
from slimkit.core.errors import SlimkitError
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import KeepPlan, apply_masks, check_split_rate, kels_plan, plan_from_masks, plan_masks
from slimkit.core.surgery import cut
from slimkit.models.checkpoint import Loaded
from slimkit.models.registry import spec_of

__all__ = ["FitHypothesis", "fit_hypothesis", "verify_slim", "VERIFY_RTOL", "VERIFY_RTOL_FP32"]

# Refuse to write when slim and masked dense differ by more, relative to max |logit|. The two are
# compared in float64, where a correct cut agrees to ~1e-13 and a wrong one (a leaked or lost
# channel) differs by the size of that channel's contribution. In float32 the two summation orders
# alone can differ by more than 1e-4 on a trained network with large activations and saturating
# gates (a trained efficientnet_b0: 7.4e-4 in float32, 2.3e-13 in float64), so float32 is only the
# fallback for a network that cannot run in float64, with the looser bound.
VERIFY_RTOL = 1e-9
VERIFY_RTOL_FP32 = 1e-4


@dataclasses.dataclass
class FitHypothesis:
    """The slim network cut out of a loaded checkpoint, verified against the masked dense one."""

    dense: torch.nn.Module
    slim: torch.nn.Module
    plan: KeepPlan
    split_rate: float | None
    dense_macs: int
    slim_macs: int
    max_abs_diff: float
    max_rel_diff: float
    verify_batch: int
    round_to: int = 1
    verify_dtype: str = "float64"


def fit_hypothesis(src: Loaded, split_rate: float | None, seed: int = 0, verify_batch: int = 2) -> FitHypothesis:
    """Cut the KELS fit hypothesis out of ``src`` and verify slim == dense with its reset part zeroed.

    The split comes from the file's masks (official KE checkpoints) or from ``split_rate``.
    Raises (writes nothing) when the two disagree by more than VERIFY_RTOL.
    """
    sr = None if split_rate is None else check_split_rate(split_rate)
    dense, spec = src.model, spec_of(src.model)
    recorded = src.meta.get("split") or {}
    round_to = int(recorded.get("round_to", 1))  # a network trained with aligned widths is cut with them
    if recorded.get("mode") == "wels":
        raise SlimkitError(f"{src.path} was trained with a WELS split, which has no slim network; only KELS splits can be extracted")
    if src.masks is None and sr is None:
        raise SlimkitError("--split-rate is required (e.g. --split-rate 0.5): this checkpoint carries no split masks")

    slim = copy.deepcopy(dense)
    graph = ChannelGraph(slim, spec.input_shape)  # traced once: plan, masks and cut all read it
    if src.masks is not None:
        plan = plan_from_masks(graph, src.masks, origin=f"masks of {src.path.name}")
        if sr is not None and kels_plan(graph, sr, round_to).keep != plan.keep:
            raise SlimkitError(
                f"--split-rate {sr:g} disagrees with the split masks stored in {src.path}; omit --split-rate to use the file's masks"
            )
        fit_masks = src.masks
    else:
        plan = kels_plan(graph, sr, round_to)
        fit_masks = plan_masks(graph, plan)
    masked = apply_masks(copy.deepcopy(dense), fit_masks)
    cut(graph, plan)

    x = example_input(dense, spec.input_shape, verify_batch, torch.Generator().manual_seed(seed))
    with torch.inference_mode(), MacCounter(masked) as dense_macs, MacCounter(slim) as slim_macs:
        masked(x), slim(x)  # masked has the dense network's shapes, so its MACs
    max_abs, max_rel, dtype = verify_slim(masked, slim, x)
    bound = VERIFY_RTOL if dtype == "float64" else VERIFY_RTOL_FP32
    if not max_rel <= bound:  # also catches NaN
        raise SlimkitError(
            f"verification failed: slim and masked dense networks differ by {max_abs:.3e} in {dtype} "
            f"(relative {max_rel:.1e} > {bound:g}); nothing written. Please report this network."
        )
    return FitHypothesis(dense, slim, plan, sr, dense_macs.per_sample, slim_macs.per_sample, max_abs, max_rel,
                         verify_batch, round_to, dtype)


def verify_slim(masked: torch.nn.Module, slim: torch.nn.Module, x: torch.Tensor) -> tuple[float, float, str]:
    """max |slim(x) - masked(x)|, relative to max |masked(x)|, and the dtype compared in (``masked`` is a
    throwaway copy; ``slim`` is left in float32)."""
    try:
        with torch.inference_mode():
            y_ref = masked.double()(x.double())
            y_slim = copy.deepcopy(slim).double()(x.double())
        dtype = "float64"
    except (RuntimeError, TypeError, NotImplementedError):  # an op without a float64 kernel
        with torch.inference_mode():
            y_ref, y_slim = masked.float()(x), slim(x)
        dtype = "float32"
    max_abs = float((y_slim - y_ref).abs().max())
    return max_abs, max_abs / max(float(y_ref.abs().max()), 1e-12), dtype
