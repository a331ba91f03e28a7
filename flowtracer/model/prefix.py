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
    """Consecutive rows that share their first `prefix` real tokens (ids and position ids).

    `ids` / `pos`: every row's real tokens, left-aligned (B, T) (shared by all packs of a batch, on the CPU)."""

    rows: list[int]
    lengths: list[int]
    prefix: int
    ids: torch.Tensor = field(repr=False)
    pos: torch.Tensor = field(repr=False)

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
    return (f"[flowtracer] forward: a prompt runs once for its G rows, packed, in each forward where that saves "
            f"{1 - MAX_PACKED:.0%} of the tokens or more (model.share_prefix)")


def plan_packs(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> list[Pack] | None:
    """Greedy packs of consecutive rows (TRL and the suite keep a prompt's G rows together), or None
    where packing does not pay. A pack's (N, N) map stays within twice the padded (B, T, T) map.

    Every forward asks, so it runs on tensors: one copy to the CPU, one comparison per row."""
    B, T = input_ids.shape
    valid = attention_mask.bool().cpu()
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # each row's real tokens first, in order
    ids, pos = input_ids.cpu().gather(1, order), position_ids.cpu().gather(1, order)
    lengths = valid.sum(1).tolist()
    cap = int(T * math.sqrt(2 * B))
    packs: list[Pack] = []
    for b, n in enumerate(lengths):
        if n == 0:
            continue  # an all-padding row: its map stays zero
        last = packs[-1] if packs else None
        if last is not None:
            first, m = last.rows[0], min(n, last.lengths[0])
            same = (ids[first, :m] == ids[b, :m]) & (pos[first, :m] == pos[b, :m])
            shared = min(last.prefix, int(same.cumprod(0).sum()))
            k = len(last.rows)
            size = sum(last.lengths) + n - k * shared
            # join if the row shares enough, no token of the pack is lost to a shorter prefix, and it fits
            if shared >= max(1, MIN_SHARE * n) and k * shared >= (k - 1) * last.prefix and size <= cap:
                last.rows.append(b)
                last.lengths.append(n)
                last.prefix = shared
                continue
        packs.append(Pack([b], [n], n, ids, pos))
    if not packs or sum(p.size for p in packs) > MAX_PACKED * B * T:
        return None
    return packs


def pack_inputs(pack: Pack, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(input_ids (1, N), 4-D bool mask (1, 1, N, N), position_ids (1, N), each row's token indices in the pack)."""
    p, first = pack.prefix, pack.rows[0]
    ids, pos, seg, index = [pack.ids[first, :p]], [pack.pos[first, :p]], [torch.full((p,), -1)], []
    start = p
    for k, (b, n) in enumerate(zip(pack.rows, pack.lengths)):
        ids.append(pack.ids[b, p:n])
        pos.append(pack.pos[b, p:n])
        seg.append(torch.full((n - p,), k))
        index.append(torch.cat([torch.arange(p), torch.arange(start, start + n - p)]).to(device))
        start += n - p
    s = torch.cat(seg).to(device)
    i = torch.arange(start, device=device)
    allowed = (i[None, :] <= i[:, None]) & ((s[None, :] == -1) | (s[None, :] == s[:, None]))
    return torch.cat(ids).to(device)[None], allowed[None, None], torch.cat(pos).to(device)[None], index


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
