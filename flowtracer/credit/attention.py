"""AttentionCredit: the point-wise attention baseline (how much later tokens look at a token)."""

from __future__ import annotations

import torch
from torch import Tensor

from flowtracer.batch import RolloutBatch
from flowtracer.credit.base import ScoreCredit
from flowtracer.credit.select import check_choice
from flowtracer.model.layers import HEADS, check_layers

VARIANTS = ("mean", "max")


def received_attention(attn: Tensor, response_mask: Tensor, variant: str = "mean") -> Tensor:
    """(B, T) float32: attention token k receives from the later response tokens q > k.

    "mean": mean over those q of attn[q, k]; "max": their max. 0 where no later response token
    exists (the last response token, padding). attn is (B, T, T) with attn[b, q, k].
    """
    T = attn.shape[-1]
    later = torch.ones(T, T, dtype=torch.bool, device=attn.device).tril(-1)  # [q, k]: q > k
    pairs = later & response_mask.bool().unsqueeze(-1)  # (B, q, k)
    count = pairs.sum(-2)
    if variant == "mean":
        total = (attn.float() * pairs).sum(-2)
        return torch.where(count > 0, total / count.clamp(min=1), 0.0)
    top = attn.float().masked_fill(~pairs, float("-inf")).amax(-2)
    return torch.where(count > 0, top, 0.0)


class AttentionCredit(ScoreCredit):
    """Score = attention a response token receives from later response tokens, in the same
    head/layer-averaged map FlowCredit uses (rollouts.attn); top `top_frac` get `gamma`.

    Args:
        variant (str, default "mean"): "mean" or "max" over the later response tokens.
        layers (str | list[int], default "middle"): attention layers averaged into the map:
            "early", "middle", "late", "all", or a list of layer indices.
        heads (str, default "mean"): how each layer's query heads make its map: "mean" or "max"
            (element-wise maximum over the heads; flowtracer.model.capture).
        top_frac (float, default 0.4): share of each response's tokens that get `gamma`.
        gamma (float, default 1.5): weight of the selected tokens; the others keep 1.0.
        select (str, default "top"): "top" = most attended, "bottom" = least.
        mapping (str, default "hard"): "hard", "linear" or "rank" (see select_weights).
        normalize (bool, default False): rescale each response's weights to mean 1.
    """

    needs_attention = True

    def __init__(self, variant: str = "mean", layers: str | list[int] = "middle", top_frac: float = 0.4,
                 gamma: float = 1.5, select: str = "top", mapping: str = "hard", normalize: bool = False,
                 heads: str = "mean"):
        super().__init__(top_frac=top_frac, gamma=gamma, select=select, mapping=mapping, normalize=normalize)
        check_choice("variant", variant, VARIANTS)
        check_choice("heads", heads, HEADS)
        self.capture_heads = heads
        self.variant = variant
        self.capture_layers = check_layers(layers)

    def scores(self, rollouts: RolloutBatch, step: int | None) -> tuple[Tensor, None]:
        if rollouts.attn is None:
            raise RuntimeError("AttentionCredit needs rollouts.attn: run the teacher-forced pass with "
                               "capture_layers (token_weights and the GRPO module do so when needs_attention=True)")
        resp = rollouts.response_mask.bool() & rollouts.attention_mask.bool()
        return received_attention(rollouts.attn, resp, self.variant), None
