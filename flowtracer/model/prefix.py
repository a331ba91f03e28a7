"""Shared-prefix packing of the teacher-forced passes: the rows of a group that share a prompt run it once.

A GRPO batch holds G completions per prompt. In a padded (B, T) forward every row recomputes the
prompt and its padding; packed, one row holds the shared prefix once, then each row's own suffix
(its completion), with a (1, 1, N, N) boolean mask under which a suffix token attends to the prefix
and to its own suffix only, causally, at the position ids it has in its own row. Every token then
sees exactly the keys it sees in the padded forward, so its queries, keys and attention
probabilities are the same numbers (up to float rounding of differently shaped matrix products),
and each row's (T, T) map is read back out of the packed (N, N) one, as are its hidden states (by a
gather, under autograd too: the backward sums the G rows' gradients into the prompt they share, which
is what the padded forward's G copies of it sum to).

Packing applies where one explicit mask reaches every layer the same way: decoders on sdpa / eager
(not flash kernels, whose masks are 2-D) without sliding-window layers. Elsewhere, and where rows
share too little for it to pay, the pass stays the padded one (same map, more tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MIN_SHARE = 0.25  # a row joins a pack only if at least this share of its tokens is the pack's prefix
MAX_PACKED = 0.75  # pack only if that leaves at most this share of the padded forward's tokens


@dataclass
class Pack:
    """Consecutive rows that share their first `prefix` real tokens (ids and position ids)."""

    rows: list[int]
    lengths: list[int]
    prefix: int
    seqs: list[list[tuple[int, int]]] = field(repr=False)

    @property
    def size(self) -> int:
        return self.prefix + sum(n - self.prefix for n in self.lengths)


def packable(lm) -> bool:
    """Whether one explicit 4-D mask is what every layer of `lm` applies (sdpa/eager, no sliding window)."""
    return unpackable_reason(lm) is None


def unpackable_reason(lm) -> str | None:
    """Why `lm`'s layers cannot all take one packed 4-D mask, or None where they can."""
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    attn = str(getattr(cfg, "_attn_implementation", None) or "")
    if attn.startswith("flash"):
        return f"attn_implementation {attn} takes 2-D masks only"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return None if all(t == "full_attention" for t in layer_types) else "the model has sliding-window layers"
    sliding = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True) is not False
    return "the model has sliding-window layers" if sliding else None


def forward_line(lm, share_prefix: bool) -> str:
    """The start-up line that says how the teacher-forced forwards lay out a prompt's G rows."""
    if not share_prefix:
        return "[flowtracer] forward: padded rows, each recomputes its prompt (model.share_prefix: false)"
    reason = unpackable_reason(lm)
    if reason is not None:  # said, not silent: these runs pay the padded forward
        return f"[flowtracer] forward: padded rows, each recomputes its prompt ({reason}; share_prefix cannot apply)"
    return "[flowtracer] forward: a prompt runs once for its G rows, packed (model.share_prefix)"


def plan_packs(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> list[Pack] | None:
    """Greedy packs of consecutive rows (TRL and the suite keep a prompt's G rows together), or None
    where packing does not pay. A pack's (N, N) map stays within twice the padded (B, T, T) map."""
    B, T = input_ids.shape
    valid = attention_mask.bool()
    ids, pos, val = input_ids.tolist(), position_ids.tolist(), valid.tolist()
    seqs = [[(i, p) for i, p, v in zip(ids[b], pos[b], val[b]) if v] for b in range(B)]
    cap = int(T * math.sqrt(2 * B))
    packs: list[Pack] = []
    for b, seq in enumerate(seqs):
        if not seq:
            continue  # an all-padding row: its map stays zero
        last = packs[-1] if packs else None
        if last is not None:
            shared = min(last.prefix, _common(last.seqs[0], seq))
            k = len(last.rows)
            size = sum(last.lengths) + len(seq) - k * shared
            # join if the row shares enough, no token of the pack is lost to a shorter prefix, and it fits
            if shared >= max(1, MIN_SHARE * len(seq)) and k * shared >= (k - 1) * last.prefix and size <= cap:
                last.rows.append(b)
                last.lengths.append(len(seq))
                last.seqs.append(seq)
                last.prefix = shared
                continue
        packs.append(Pack([b], [len(seq)], len(seq), [seq]))
    if not packs or sum(p.size for p in packs) > MAX_PACKED * B * T:
        return None
    return packs


def _common(a: list, b: list) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def pack_inputs(pack: Pack, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(input_ids (1, N), 4-D bool mask (1, 1, N, N), position_ids (1, N), each row's token indices in the pack)."""
    p = pack.prefix
    tokens = list(pack.seqs[0][:p])
    seg = [-1] * p
    index = []
    for k, seq in enumerate(pack.seqs):
        start = len(tokens)
        tokens.extend(seq[p:])
        seg.extend([k] * (len(seq) - p))
        index.append(torch.cat([torch.arange(p), torch.arange(start, len(tokens))]).to(device))
    ids = torch.tensor([t for t, _ in tokens], device=device)[None]
    pos = torch.tensor([q for _, q in tokens], device=device)[None]
    s = torch.tensor(seg, device=device)
    n = torch.arange(len(tokens), device=device)
    allowed = (n[None, :] <= n[:, None]) & ((s[None, :] == -1) | (s[None, :] == s[:, None]))
    return ids, allowed[None, None], pos, index


def unpack_map(pack: Pack, packed: torch.Tensor, index: list[torch.Tensor], attention_mask: torch.Tensor,
               out: torch.Tensor) -> None:
    """Write each row's (T, T) map (its real columns) out of the packed (1, N, N) map, into `out` (B, T, T)."""
    for b, idx in zip(pack.rows, index):
        cols = attention_mask[b].bool().nonzero().squeeze(-1)
        out[b, cols[:, None], cols[None, :]] = packed[0, idx[:, None], idx[None, :]]


def gather_index(pack: Pack, index: list[torch.Tensor], attention_mask: torch.Tensor, offset: int,
                 gather: torch.Tensor | None) -> torch.Tensor:
    """(B, T) positions of each row's real tokens among all packs' tokens (this pack's start at `offset`);
    -1 where no pack has written (padding). Creates the tensor on the first pack."""
    if gather is None:
        gather = torch.full(attention_mask.shape, -1, dtype=torch.long, device=attention_mask.device)
    for b, idx in zip(pack.rows, index):
        gather[b, attention_mask[b].bool()] = idx + offset
    return gather
