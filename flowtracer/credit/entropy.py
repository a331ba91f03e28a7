"""EntropyCredit: favour the old policy's high-entropy ("forking") tokens."""

from __future__ import annotations

from torch import Tensor

from flowtracer.batch import RolloutBatch
from flowtracer.credit.base import ScoreCredit
from flowtracer.credit.select import batch_top_mask, check_choice

VARIANTS = ("topk", "80/20")


class EntropyCredit(ScoreCredit):
    """Score = entropy of the old policy's next-token distribution (rollouts.entropies).

    Variants:
      - "topk": the top `top_frac` of each response's tokens by entropy get `gamma` (same protocol
        as every arm).
      - "80/20" (arXiv 2506.01939): a 0/1 mask keeping only the tokens whose entropy is in the top
        `keep_frac` of the WHOLE BATCH's response tokens (k = round-half-up(keep_frac * N), ties by
        row-major position); weight 0 elsewhere. It stays "normalised by all response tokens"
        because the loss still divides by the response token count (response_mask is unchanged):
        zeroed tokens count in the denominator. top_frac, gamma, select, mapping and normalize do
        not apply.

    Args:
        variant (str, default "topk"): "topk" or "80/20".
        top_frac (float, default 0.4): "topk": share of each response's tokens that get `gamma`.
        gamma (float, default 1.5): "topk": weight of the selected tokens; the others keep 1.0.
        select (str, default "top"): "topk": "top" = highest entropy, "bottom" = lowest.
        mapping (str, default "hard"): "topk": "hard", "linear" or "rank" (see select_weights).
        normalize (bool, default False): "topk": rescale each response's weights to mean 1.
        keep_frac (float, default 0.2): "80/20": share of the batch's response tokens kept.
    """

    needs_entropy = True

    def __init__(self, variant: str = "topk", top_frac: float = 0.4, gamma: float = 1.5, select: str = "top",
                 mapping: str = "hard", normalize: bool = False, keep_frac: float = 0.2):
        super().__init__(top_frac=top_frac, gamma=gamma, select=select, mapping=mapping, normalize=normalize)
        check_choice("variant", variant, VARIANTS)
        if not 0.0 <= keep_frac <= 1.0:
            raise ValueError(f"keep_frac must be in [0, 1], got {keep_frac}")
        if variant == "80/20" and normalize:
            raise ValueError("normalize=True contradicts the 80/20 variant's normalisation by all response tokens")
        self.variant, self.keep_frac = variant, float(keep_frac)
        self.batch_global = variant == "80/20"  # the top keep_frac of the WHOLE batch's tokens

    def scores(self, rollouts: RolloutBatch, step: int | None) -> tuple[Tensor, None]:
        if rollouts.entropies is None:
            raise RuntimeError("EntropyCredit needs rollouts.entropies from the teacher-forced pass")
        return rollouts.entropies, None

    def weights(self, scores: Tensor, resp: Tensor) -> tuple[Tensor, Tensor]:
        if self.variant == "topk":
            return super().weights(scores, resp)
        keep = batch_top_mask(scores, resp, self.keep_frac)
        return keep.float(), keep
