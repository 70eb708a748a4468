"""How far two computations of one model's P(yes) may differ, from the dtype they ran in: the bound that the
reload check (latentsim.training.reload_parity) and the GPU check (hf against vLLM, bf16 against fp32) hold
the mean and the largest |ΔP(yes)| of a set of judgments to."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

# The chance that a correct comparison of N judgments fails the max bound (a union bound over them).
FAILURE_PROBABILITY = 1e-6


@dataclass(frozen=True)
class PYesBound:
    mean: float
    max: float

    def check(self, diff: np.ndarray) -> dict:
        """The record of |ΔP(yes)| per judgment against this bound: both its mean and its max must hold."""
        diff = np.abs(np.asarray(diff, dtype=np.float64))
        found = {"mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max())}
        ok = found["mean_abs_diff"] <= self.mean and found["max_abs_diff"] <= self.max
        return {**found, "bound_mean": self.mean, "bound_max": self.max, "ok": bool(ok)}

    def as_dict(self) -> dict:
        return asdict(self)


def forward_roundings(n_layers: int) -> int:
    """Where two forwards of one model in one dtype (other kernels, other summation orders, ZeRO's gathered
    weights) may round the residual stream differently: the attention and the MLP output of each layer added
    to it, and the final norm."""
    return 2 * n_layers + 1


def layer_count(model) -> int:
    """The decoder layers of a causal LM (through a PEFT wrapper; a multimodal config's text model)."""
    return model.config.get_text_config().num_hidden_layers


def p_yes_bound(
    dtype: torch.dtype, sensitivity, roundings: int, logit_magnitude=None, judgments: int | None = None
) -> PYesBound:
    """Bounds on the mean and the max over judgments of |ΔP(yes)| between two computations of one model that
    are equal in exact arithmetic and differ only by rounding in `dtype`.

    Derivation. Let u = eps(dtype) / 2, the unit roundoff (fp32 6.0e-8, fp16 4.9e-4, bf16 3.9e-3). The answer
    rows are computed in fp32 from the final hidden state h (latentsim.simulators.hf._answer_rows), so what
    separates the two computations is in h: each h_i may be rounded differently up to `roundings` times
    (forward_roundings), each time by an independent error of mean 0 (round to nearest) and size at most
    u |h_i|. P(yes) = σ(d) with d = z_yes - z_no = (w_yes - w_no) · h, so with s = (w_yes - w_no) ⊙ h (the
    judgment's `sensitivity` is ||s||_2):
      Δd = Σ_i (w_yes - w_no)_i δh_i, a sum of independent zero-mean terms, `roundings` per i, each in
      [-u |s_i|, u |s_i|]: E Δd² ≤ roundings u² ||s||², so E|Δd| ≤ √roundings u ||s|| (Jensen), and by
      Hoeffding P(|Δd| ≥ t) ≤ 2 exp(-t² / (2 roundings u² ||s||²)).
      |σ'| ≤ 1/4, so |ΔP| ≤ |Δd| / 4.
    Max: a union bound over N judgments at FAILURE_PROBABILITY δ gives, for all of them at once,
      |ΔP_j| ≤ √(2 roundings ln(2N / δ)) u ||s_j|| / 4, taken at the largest ||s_j||.
    Mean: E|ΔP_j| ≤ √roundings u ||s_j|| / 4; the mean of N independent |ΔP_j|, each at most the max bound B,
    exceeds its expectation by more than B √(ln(1/δ) / (2N)) with probability below δ (Hoeffding again).
    An engine that also rounds the answer logits themselves in `dtype` (vLLM's bf16 lm_head output) moves d by
    up to u (|z_yes| + |z_no|) more: pass those magnitudes as `logit_magnitude` (per judgment), added to both.

    A comparison that breaks the model (a wrong adapter, a wrong dtype, a shifted token) moves P(yes) by far
    more than rounding does, in the mean before the max; a bf16 logit read (a step of 0.125 in [16, 32)) would
    exceed the bound of a correct run."""
    sensitivity = np.asarray(sensitivity, dtype=np.float64)
    n = judgments if judgments is not None else sensitivity.size
    u = torch.finfo(dtype).eps / 2
    rounded = np.zeros_like(sensitivity) if logit_magnitude is None else u * np.asarray(logit_magnitude) / 4
    spread = math.sqrt(roundings) * u * sensitivity / 4  # E|ΔP| per judgment
    worst = float((spread * math.sqrt(2 * math.log(2 * n / FAILURE_PROBABILITY)) + rounded).max())
    mean = float((spread + rounded).mean()) + worst * math.sqrt(math.log(1 / FAILURE_PROBABILITY) / (2 * n))
    return PYesBound(mean=min(mean, worst, 1.0), max=min(worst, 1.0))  # few judgments: no tighter mean
