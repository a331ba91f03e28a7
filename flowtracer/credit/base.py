"""The rollout-callback contract, and the arms' Lightning-free core.

A credit arm turns a scored RolloutBatch into per-token weights: `apply(rollouts, tokenizer=,
step=)` writes `rollouts.token_weights` (B, T) and adds stats to `rollouts.metrics`. That method is
plain torch; the Lightning suite reaches it through the `on_rollout_batch` hook (called by the GRPO
module after advantages are computed and before the update), any other trainer through
`flowtracer.credit.weights` (which also runs the capture pass the arm needs).
`ScoreCredit` is the shared protocol of the scored arms (flow, random, entropy, attention): score
each token, favour the top `top_frac` of each response with weight `gamma`, log what was chosen.

The arms need no Lightning: where Lightning is installed they are also Lightning callbacks (so
`trainer.callbacks` in YAML takes them), and without it they are plain objects.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowtracer.batch import RolloutBatch
from flowtracer.credit.select import check_options, select_mask, select_weights, weights_from_mask
from flowtracer.credit.stats import class_shares

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # optional: the arms work without Lightning (TRL, a bare GPU box)
    Callback = object


class RolloutCallback(Callback):
    """Base class for anything that enriches a RolloutBatch before the policy update.

    Class attributes tell the step what the callback reads and does (flowtracer.train.step.placement
    decides where it runs from them; flowtracer.credit.weights which pass it needs):
    `needs_attention` (the map of `capture_layers`, heads aggregated by `capture_heads`), `needs_entropy`,
    `batch_global` (its result depends on the whole batch at once: a batch-wide top-k, noise drawn
    over the batch shape; it then never sees the map) and `sets_weights` (it writes
    `token_weights`; at most one such callback per run).

    An arm that reads attention or entropies runs, with one PPO epoch and one mini-batch, inside
    the training forward of each micro-batch, on that micro-batch's own view (map, entropies and
    old log-probs from that very forward; no extra pass); otherwise on the micro-batches of a
    no-grad pre-pass. An arm that reads neither runs once on the whole batch before the update.
    """

    needs_attention: bool = False
    needs_entropy: bool = False
    batch_global: bool = False
    sets_weights: bool = False
    capture_layers: str | list[int] | None = None
    capture_heads: str = "mean"

    def on_rollout_batch(self, trainer, pl_module, rollouts: RolloutBatch) -> None:
        """The Lightning hook: `apply` with the module's tokenizer and RL step."""
        self.apply(rollouts, tokenizer=getattr(pl_module, "tokenizer", None), step=getattr(pl_module, "rl_step", None))

    def apply(self, rollouts: RolloutBatch, *, tokenizer=None, step: int | None = None) -> None:
        """Enrich `rollouts` in place (no Lightning object needed). `tokenizer` (optional) names the
        token classes in the stats; `step` is the RL step (seeds step-dependent arms)."""


class UniformCredit(RolloutCallback):
    """Plain GRPO: every response token gets weight 1 (the baseline every arm is compared with)."""

    sets_weights = True

    def apply(self, rollouts: RolloutBatch, *, tokenizer=None, step: int | None = None) -> None:
        rollouts.token_weights = rollouts.response_mask.to(torch.float32)
        rollouts.metrics["credit/fallback_frac"] = 0.0


class ScoreCredit(RolloutCallback):
    """Shared protocol of the scored arms: score -> per-response selection -> token weights.

    Subclasses implement `scores(rollouts, step) -> (scores (B, T), fallback (B,) bool or None)`;
    rows flagged in `fallback` get uniform weights (all ones on the response). Selection rules
    (k = round-half-up(top_frac * n), >= 1, ties by position) are in `flowtracer.credit.select`.

    Args:
        top_frac (float, default 0.4): share of each response's tokens that get `gamma`.
        gamma (float, default 1.5): weight of the selected tokens; the others keep 1.0.
        select (str, default "top"): "top" favours the highest scores, "bottom" the lowest.
        mapping (str, default "hard"): "hard" (0/1 selection), or a continuous map of the score,
            "linear" or "rank" (see `select_weights`).
        normalize (bool, default False): rescale each response's weights to mean 1.

    Logged (rollouts.metrics): credit/fallback_frac (responses given uniform weights),
    credit/selected_frac (selected share of the non-fallback response tokens), credit/weight_mean
    (mean weight over all response tokens), credit/score_share (mean share of a response's score
    mass on its selected tokens), credit/class/<class> (token classes of the selected tokens).
    """

    sets_weights = True

    def __init__(self, top_frac: float = 0.4, gamma: float = 1.5, select: str = "top",
                 mapping: str = "hard", normalize: bool = False):
        check_options(top_frac, gamma, select, mapping)
        self.top_frac, self.gamma, self.select = float(top_frac), float(gamma), select
        self.mapping, self.normalize = mapping, bool(normalize)

    def weights(self, scores: Tensor, resp: Tensor) -> tuple[Tensor, Tensor]:
        """(weights (B, T) float32, selected (B, T) bool) from the scores of every row."""
        sel = select_mask(scores, resp, top_frac=self.top_frac, select=self.select)
        if self.mapping == "hard":
            return weights_from_mask(sel, resp, gamma=self.gamma, normalize=self.normalize), sel
        w = select_weights(scores, resp, top_frac=self.top_frac, gamma=self.gamma, select=self.select,
                           mapping=self.mapping, normalize=self.normalize)
        return w, sel  # continuous maps: `sel` (what "hard" would pick) is only used for stats

    def scores(self, rollouts: RolloutBatch, step: int | None) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def apply(self, rollouts: RolloutBatch, *, tokenizer=None, step: int | None = None) -> None:
        scores, fallback = self.scores(rollouts, step)
        resp = rollouts.response_mask.bool()
        w, sel = self.weights(scores, resp)
        if fallback is not None and bool(fallback.any()):
            fb = fallback.unsqueeze(-1)
            w = torch.where(fb, resp.to(w.dtype), w)
            sel = sel & ~fb
        rollouts.token_weights = w
        rollouts.token_scores = scores  # a reference, no copy: rollouts.jsonl logs it under log_token_scores
        rollouts.metrics.update(self.stats(tokenizer, rollouts, scores, sel, w, fallback))

    def stats(self, tokenizer, rollouts: RolloutBatch, scores: Tensor, sel: Tensor, w: Tensor,
              fallback: Tensor | None) -> dict[str, float]:
        resp = rollouts.response_mask.bool()
        kept = resp if fallback is None else resp & ~fallback.unsqueeze(-1)
        n_resp = max(int(resp.sum()), 1)
        s = scores.double().clamp(min=0) * kept
        mass = s.sum(-1)
        has_mass = mass > 0
        share = ((s * sel).sum(-1)[has_mass] / mass[has_mass]).mean() if bool(has_mass.any()) else None
        out = {
            "credit/fallback_frac": float(fallback.float().mean()) if fallback is not None else 0.0,
            "credit/selected_frac": float(sel.sum()) / max(int(kept.sum()), 1),
            "credit/weight_mean": float((w * resp).sum()) / n_resp,
            "credit/score_share": float(share) if share is not None else 0.0,
        }
        if tokenizer is not None:
            out.update(class_shares(tokenizer, rollouts.input_ids, sel))
        return out
