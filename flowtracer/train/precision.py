"""The precisions of a run: what the learner computes in, what the sampler computes in, and whether
the rollouts then need their own log-probs for truncated importance sampling (TIS).

Learner: `trainer.precision` (Lightning: "32-true", "bf16-mixed", "16-mixed", "bf16-true", ...)
over the weights' dtype (`model.model_dtype`). Under "*-mixed" the forward runs under autocast:
matmuls in bf16 / fp16, weights, optimizer states, norms, softmax and our log-probs in float32.
Sampler: `sampling.dtype` (flowtracer.generation.precision), resolved here once per run ("auto"
needs the learner's precision and the device).

They agree only when the sampler computes in the weights' dtype and no autocast is on; otherwise
the sampler's and the learner's probabilities of the same token differ by more than float
rounding, the rollouts are slightly off-policy, and the run records the sampler's per-token
log-probs so the loss can correct with `loss.tis_cap` and log the mismatch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from flowtracer.generation.precision import resolve_dtype

MIXED = ("bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class RunPrecision:
    learner: str  # e.g. "bf16-mixed over float32 weights"
    sampler: torch.dtype
    why: str  # how sampling.dtype was resolved
    record: bool  # sampler and learner differ: record the sampler's log-probs (TIS, mismatch/*)
    mixed: bool = False  # the learner runs under autocast (bf16-mixed, 16-mixed)

    def describe(self, tis_cap: float) -> str:
        sampler = str(self.sampler).removeprefix("torch.")
        if not self.record:
            tis = "sampler = learner, no TIS"
        else:
            tis = f"TIS cap {tis_cap:g}" if tis_cap > 0 else "TIS off (mismatch logged only)"
        return f"[flowtracer] precision: learner {self.learner}; rollouts {sampler} ({self.why}); {tis}"


def weights_dtype(policy) -> torch.dtype:
    """The dtype of the (base) weights: the input embedding's (LoRA adapters may be float32)."""
    emb = policy.get_input_embeddings() if hasattr(policy, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight.dtype if weight is not None else next(policy.parameters()).dtype


def resolve(setting: str, trainer_precision: str | None, weights: torch.dtype, device) -> RunPrecision:
    """The run's precisions for `sampling.dtype` = `setting` (see the module docstring)."""
    p = str(trainer_precision or "32-true")
    mixed = p in MIXED
    learner_half = mixed or p.startswith("bf16") or weights in (torch.bfloat16, torch.float16)
    sampler, why = resolve_dtype(setting, weights=weights, learner_half=learner_half, device=device)
    learner = f"{p} over {str(weights).removeprefix('torch.')} weights"
    return RunPrecision(learner, sampler, why, record=mixed or sampler != weights, mixed=mixed)


def apply(module, trainer_precision: str | None, device) -> RunPrecision:
    """Resolve the module's `sampling.dtype` and `val_sampling.dtype` ("auto") for this run; the
    rollouts then carry the concrete dtype. Returns the training sampler's RunPrecision."""
    weights = weights_dtype(module.policy)
    run = resolve(module.sampling.dtype, trainer_precision, weights, device)
    val = resolve(module.val_sampling.dtype, trainer_precision, weights, device)
    module.sampling = dataclasses.replace(module.sampling, dtype=_name(run.sampler))
    module.val_sampling = dataclasses.replace(module.val_sampling, dtype=_name(val.sampler))
    return run


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
