"""Per-row seeded sampling: each response is a function of its own seed, not of its batch.

HF's sampler draws from one global RNG stream, so a response depends on which other prompts share
its batch, and a run split over 2 processes samples different responses than 1 process. Here each
row r gets a seed (from (run seed, RL step, prompt position in the step, sample index)); token t of
row r is the Gumbel-max draw ``argmax(logits / T + Gumbel(hash(seed_r, t, vocab id)))`` after the
same top-k / top-p filtering HF applies. That is an exact sample of the softmax, and depends only
on the row's own logits and seed, so 1-process and DDP runs generate the same rollouts. The noise
is a counter-based hash (splitmix64 on int64 tensors): no generator state, batched, same on every
device. Used by `rollout.generate(row_seeds=...)` when `sampling.seed_per_prompt` is true.

Without row seeds, `sampling.draw` picks how the fast engine takes its one draw per row from the
global RNG: "multinomial" = `torch.multinomial`, HF's own draw (the hf engines can do no other), so the
fast engine reproduces `generate`'s samples; "inverse_cdf" = one uniform per row against the float64
cumulative softmax (`inverse_cdf_draw`), an exact sample of the same distribution from another stream.
Why the choice: `torch.multinomial` draws an exponential for every vocabulary entry, ~16 ns each on a
CPU, 6 ms per step at 8 rows of a 49k vocabulary and 57 ms at 64 (results/sampler_cost_*.md), as
much as the rest of the decode step at 64 rows; the inverse CDF reads each row twice, ~0.1 ms / 1 ms.
"auto" (the default) = inverse_cdf on the fast engine, multinomial on the hf engines.
"""

from __future__ import annotations

import torch
from torch import Tensor

DRAWS = ("auto", "multinomial", "inverse_cdf")
_K1 = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64: golden-ratio increment of splitmix64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB


def _mix(x: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 (logical shifts emulated with masks; products wrap)."""
    return _mix_(x.clone())


def _mix_(x: Tensor) -> Tensor:
    """`_mix` in place: at (rows, vocab) every step, fresh temporaries cost more than the arithmetic."""
    x ^= (x >> 30) & ((1 << 34) - 1)
    x *= _M1
    x ^= (x >> 27) & ((1 << 37) - 1)
    x *= _M2
    x ^= (x >> 31) & ((1 << 33) - 1)
    return x


def hashed_uniform(seeds: Tensor, t: int, vocab: int) -> Tensor:
    """(B, V) float64 uniforms in (0, 1), a pure function of (seed_b, t, v)."""
    base = _mix(seeds.long().unsqueeze(-1) * _K1 + t)
    bits = _mix_(torch.arange(vocab, device=seeds.device, dtype=torch.long).mul_(_K1).add(base))
    bits >>= 11
    bits &= (1 << 53) - 1
    return bits.double().add_(0.5).div_(float(1 << 53))


def gumbel_perturbed(scores: Tensor, u: Tensor) -> Tensor:
    """float64 scores + Gumbel(u) noise, -log(-log(u)); the argmax is the Gumbel-max sample."""
    return scores.to(torch.float64, copy=True).sub_(u.log().neg_().log_())


def resolve_draw(draw: str, engine: str) -> str:
    """The unseeded draw `sampling.draw` means on `engine` ("fast" or an hf engine)."""
    if draw not in DRAWS:
        raise ValueError(f"sampling.draw = {draw!r}: use one of {', '.join(DRAWS)}")
    if draw == "auto":
        return "inverse_cdf" if engine == "fast" else "multinomial"
    if draw == "inverse_cdf" and engine != "fast":
        raise ValueError(f"sampling.draw = inverse_cdf is the fast engine's; engine {engine} samples with "
                         "transformers' own draw (torch.multinomial): set sampling.draw: auto or multinomial")
    return draw


def inverse_cdf_draw(scores: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B,) one exact sample per row of softmax(scores) (B, V), -inf = never: the first token whose
    float64 cumulative probability exceeds u x the row's total, u ~ U[0, 1) one per row."""
    s = scores.to(torch.float64)
    cdf = s.sub(s.amax(-1, keepdim=True)).exp_().cumsum_(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=torch.float64, device=scores.device, generator=generator)
    # strictly below the total, so the pick is a token with positive probability even if u x total rounds up
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def row_seeds(seed: int, step: int, positions: list[int], g: int, device=None) -> Tensor:
    """(len(positions) * g,) int64 seeds: rows [i*g, (i+1)*g) are prompt `positions[i]`'s samples."""
    pos = torch.tensor(positions, dtype=torch.long, device=device).repeat_interleave(g)
    k = torch.arange(g, dtype=torch.long, device=device).repeat(len(positions))
    return _mix(_mix(torch.full_like(pos, int(seed)) * _K1 + int(step)) + pos * 4096 + k)


def filter_logits(scores: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """HF's top-k then top-p filtering: removed tokens get -inf (the best token always stays)."""
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[..., -1] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


class RowSeededSampler:
    """A transformers logits processor for greedy decoding that turns it into per-row sampling."""

    def __init__(self, seeds: Tensor, prompt_len: int, temperature: float, top_k: int = 0, top_p: float = 1.0):
        self.seeds, self.prompt_len = seeds, prompt_len
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        t = input_ids.shape[1] - self.prompt_len  # tokens generated so far: the same for every row
        logits = filter_logits(scores.float() / self.temperature, self.top_k, self.top_p)
        u = hashed_uniform(self.seeds.to(scores.device), t, scores.shape[-1])
        return gumbel_perturbed(logits, u).to(scores.dtype)
