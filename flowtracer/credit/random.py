"""RandomCredit: a random top_frac of each response's tokens get gamma (the "is it just more
gradient on 40% of tokens?" control)."""

from __future__ import annotations

import torch
from torch import Tensor

from flowtracer.batch import RolloutBatch
from flowtracer.credit.base import ScoreCredit


class RandomCredit(ScoreCredit):
    """Random token selection on the same protocol as the other arms (k per response, weight gamma).

    The scores are uniform noise from a CPU generator seeded by (seed, step), where step is the RL
    step the caller passes (the module's `rl_step`; this arm's own call count when none is given),
    so a resumed run draws exactly the tokens an uninterrupted run would.

    Args:
        top_frac (float, default 0.4): share of each response's tokens that get `gamma`
            (k = round-half-up(top_frac * n), at least 1).
        gamma (float, default 1.5): weight of the selected tokens; the others keep 1.0.
        seed (int, default 0): seed of the selection; combined with the step.
        normalize (bool, default False): rescale each response's weights to mean 1.
    """

    def __init__(self, top_frac: float = 0.4, gamma: float = 1.5, seed: int = 0, normalize: bool = False):
        super().__init__(top_frac=top_frac, gamma=gamma, select="top", mapping="hard", normalize=normalize)
        self.seed = int(seed)
        # The noise is drawn over the batch's (B, T) shape: a per-micro-batch draw would differ.
        self.batch_global = True
        self._calls = 0

    def generator(self, step: int) -> torch.Generator:
        """The CPU generator of a step: a pure function of (seed, step)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) % (2**63))

    def scores(self, rollouts: RolloutBatch, step: int | None) -> tuple[Tensor, None]:
        step = self._calls if step is None else step
        self._calls += 1
        noise = torch.rand(rollouts.response_mask.shape, generator=self.generator(step))
        return noise.to(rollouts.response_mask.device), None
