"""The data type every stage shares: `Generated` (what generation returns) and `RolloutBatch`
(everything one RL step knows about its sampled responses, once scored), and how a batch is cut
into micro-batches (`split_rows`, `active_columns`).

Layout of every (B, T) tensor: the prompt is left-padded and the response right-padded, so that
`input_ids[b] = [pad .. pad, prompt tokens, response tokens, pad .. pad]`. Rollout callbacks (the
credit arms) read this object and write `token_weights` and `metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class Generated:
    """Raw output of generation: token layout and decoded text, before scoring."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T) long
    prompt_mask: Tensor  # (B, T) bool
    response_mask: Tensor  # (B, T) bool
    question_mask: Tensor  # (B, T) bool
    responses: list[str]
    truncated: Tensor  # (B,) bool: hit max_new_tokens without EOS
    prompt_len: int  # responses start at this column (prompts are left-padded to it)
    prompts: list[str] = field(default_factory=list)  # prompt text of each row (rows of a prompt repeat it)
    sampler_logprobs: Tensor | None = None  # (B, T) float32: the sampler's log p(token), when recorded


@dataclass
class RolloutBatch:
    input_ids: Tensor  # (B, T) long
    attention_mask: Tensor  # (B, T) bool/long: 1 on real tokens (prompt and response)
    prompt_mask: Tensor  # (B, T) bool: real prompt tokens
    response_mask: Tensor  # (B, T) bool: generated tokens up to and including EOS
    question_mask: Tensor  # (B, T) bool: the user question inside the prompt (flow source)
    answer_mask: Tensor  # (B, T) bool: the final-answer span the verifier parsed (flow sink)
    rewards: Tensor  # (B,) float32
    advantages: Tensor  # (B,) float32, group-normalised
    group_ids: Tensor  # (B,) long: responses to the same prompt share an id
    prompts: list[str] = field(default_factory=list)  # decoded prompt text per row
    responses: list[str] = field(default_factory=list)  # decoded response text per row
    answers: list[str] = field(default_factory=list)  # reference answers per row
    sampler_logprobs: Tensor | None = None  # (B, T) float32: the sampler's own log p(token) (see TIS), if recorded
    old_logprobs: Tensor | None = None  # (B, T) float32, log p_old(token t | < t); 0 off-response
    entropies: Tensor | None = None  # (B, T) float32, entropy of the distribution predicting t
    attn: Tensor | None = None  # (B, T, T) float32 middle-layer head-averaged attention, if captured
    token_weights: Tensor | None = None  # (B, T) float32, set by a credit arm; None = all ones
    token_scores: Tensor | None = None  # (B, T) the scored arm's per-token scores (what it ranked), if any
    metrics: dict[str, float] = field(default_factory=dict)  # stats a callback wants logged

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def weights_or_ones(self) -> Tensor:
        """The per-token weights to use in the loss (ones where no arm set any)."""
        if self.token_weights is not None:
            return self.token_weights
        return self.response_mask.to(torch.float32)

    def inputs_of(self, idx: Tensor, cols: slice = slice(None)) -> "RolloutBatch":
        """Rows `idx` restricted to columns `cols`, as a new batch of copies holding only the inputs.

        Every output field (old log-probs, entropies, attn, token weights) is None and `metrics` is
        empty: what a micro-batch's credit arms see is filled from that micro-batch's own forward.
        """
        picked = idx.tolist()
        out = {}
        for f in fields(self):
            if f.name in OUTPUT_FIELDS or f.name == "metrics":
                continue
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value[idx]
                out[f.name] = value[:, cols] if value.dim() >= 2 else value
            elif isinstance(value, list):  # texts (an API caller may give none)
                out[f.name] = [value[i] for i in picked] if value else []
        return RolloutBatch(**out)


# Filled per step or per micro-batch by forwards and credit arms (never copied into a micro-batch).
OUTPUT_FIELDS = ("old_logprobs", "entropies", "attn", "token_weights", "token_scores")


def split_rows(rows: Tensor, size: int) -> list[Tensor]:
    """`rows` in chunks of `size` (0 = one chunk)."""
    return list(rows.split(size)) if size > 0 else [rows]


def active_columns(attention_mask: Tensor) -> slice:
    """The column range that holds a real token in some row (drops all-padding columns)."""
    used = attention_mask.bool().any(0).nonzero()
    return slice(int(used[0]), int(used[-1]) + 1) if len(used) else slice(0, 0)
