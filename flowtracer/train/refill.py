"""A step's rollouts with DAPO's dynamic sampling and overlong handling (flowtracer.rl.dapo).

`sample_rollouts(source, rows, positions, step, timer)` is the module's generate-and-score phase:
without DAPO knobs it is one `source.generate` + `source.score`. `source` (a RolloutSource)
carries what the loop needs from the trainer as callables and settings, so it knows no
LightningModule. With `dapo.dynamic_sampling` it keeps generating from more prompts (at most
`max_extra_rounds` rounds) until the step has as many groups with non-zero reward spread as it has
prompts, then keeps exactly that many groups (informative first). Refill prompts of round k come
from a data position that is a function of (seed, step, k) only (`REFILL_BASE` steps past the run,
wrapping over epochs), so resume stays exact. Under DDP every process runs the same number of
rounds (any process short -> all go on), because sharded generation may need every process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass

import torch
from torch import Tensor

from flowtracer.batch import Generated, RolloutBatch
from flowtracer.config import DapoConfig
from flowtracer.rl import group_advantages
from flowtracer.rl.dapo import apply_overlong, informative_groups, select_groups

REFILL_BASE = 10**6  # refill prompts come from data position REFILL_BASE + step * cap + round


@dataclass
class RolloutSource:
    """What generating and scoring a step's rollouts needs from the trainer.

    generate(rows, positions, key) -> Generated: sample G responses per row (key seeds the samples).
    score(rows, gen) -> RolloutBatch: rewards, answer spans, group advantages.
    refill_rows(key) -> (rows, positions): this process's prompts at data position `key`.
    any_process(flag) -> bool: True when the flag is True on any process (identity with one).
    """

    generate: Callable[[list[dict], list[int], int], Generated]
    score: Callable[[list[dict], Generated], RolloutBatch]
    refill_rows: Callable[[int], tuple[list[dict], list[int]]]
    any_process: Callable[[bool], bool]
    dapo: DapoConfig
    max_new_tokens: int
    advantage: str
    pad_id: int
    reduce_sum: Callable[[Tensor], Tensor] | None = None  # sums over processes (reinforce_pp's batch statistics)


def sample_rollouts(source: RolloutSource, rows, positions, step: int, timer):
    """(Generated, RolloutBatch) of this step, with the `dapo` settings applied."""
    cfg = source.dapo
    gen, batch = _round(source, rows, positions, step, timer)
    if cfg.dynamic_sampling:
        gen, batch = _refill(source, rows, gen, batch, step, timer)
    if cfg.dynamic_sampling or cfg.overlong != "off":
        shaped, keep = _shaped(source, gen, batch)
        adv, stats = group_advantages(shaped, batch.group_ids, mode=source.advantage, reduce_sum=source.reduce_sum)
        batch.advantages = (adv * keep).float()
        batch.metrics.update({f"adv/{k}": float(v) for k, v in stats.items()})
        batch.metrics["dapo/overlong_masked"] = float((~keep).sum())
        batch.metrics["dapo/overlong_penalty_mean"] = float((shaped - batch.rewards).mean())
    return gen, batch


def _round(source: RolloutSource, rows, positions, step, timer):
    with timer("generate"):
        gen = source.generate(rows, positions, step)
    with timer("score"):
        batch = source.score(rows, gen)
    return gen, batch


def _shaped(source: RolloutSource, gen, batch) -> tuple[Tensor, Tensor]:
    lengths = batch.response_mask.sum(1)
    return apply_overlong(batch.rewards, lengths, gen.truncated.to(lengths.device), source.dapo, source.max_new_tokens)


def _refill(source: RolloutSource, rows, gen, batch, step: int, timer):
    cfg, target = source.dapo, len(rows)
    g = len(gen.responses) // len(rows)
    parts = [(gen, batch)]
    _, info = informative_groups(_shaped(source, gen, batch)[0], batch.group_ids, cfg.spread_eps)
    dropped, n_info, rounds = int((~info).sum()), int(info.sum()), 0
    while rounds < cfg.max_extra_rounds and source.any_process(n_info < target):
        rounds += 1
        key = REFILL_BASE + step * cfg.max_extra_rounds + rounds - 1
        more, pos = source.refill_rows(key)
        gen_k, batch_k = _round(source, more, pos, key, timer)
        _, info_k = informative_groups(_shaped(source, gen_k, batch_k)[0], batch_k.group_ids, cfg.spread_eps)
        parts.append((gen_k, batch_k))
        dropped, n_info = dropped + int((~info_k).sum()), n_info + int(info_k.sum())
    gen, batch = merge(parts, source.pad_id)
    _, info = informative_groups(_shaped(source, gen, batch)[0], batch.group_ids, cfg.spread_eps)
    keep = select_groups(info, target)
    refilled = int(((keep >= target) & info[keep]).sum())  # kept informative groups from extra rounds
    idx = (keep.unsqueeze(1) * g + torch.arange(g, device=keep.device)).flatten()  # rows of each group
    gen, batch = pick(gen, idx.to(gen.input_ids.device)), batch.inputs_of(idx.to(batch.input_ids.device))
    batch.group_ids = torch.arange(target, device=batch.group_ids.device).repeat_interleave(g)
    batch.metrics.update(parts[0][1].metrics)
    batch.metrics.update({"dapo/groups_dropped": float(dropped), "dapo/groups_refilled": float(refilled),
                          "dapo/extra_rounds": float(rounds)})
    return gen, batch


def _merge_2d(tensors: list[Tensor], widths: list[int], fill) -> Tensor:
    """Rows of [left-padded prompt | right-padded response] tensors, realigned at the widest prompt."""
    p = max(widths)
    r = max(t.shape[1] - w for t, w in zip(tensors, widths))
    out = tensors[0].new_full((sum(t.shape[0] for t in tensors), p + r), fill)
    row = 0
    for t, w in zip(tensors, widths):
        out[row:row + t.shape[0], p - w:p - w + t.shape[1]] = t
        row += t.shape[0]
    return out


def merge(parts, pad: int):
    """One (Generated, RolloutBatch) from several rounds' outputs (group ids made distinct)."""
    widths = [gen.prompt_len for gen, _ in parts]
    out = []
    for which in (0, 1):
        objs = [p[which] for p in parts]
        values = {}
        for f in fields(objs[0]):
            vals = [getattr(o, f.name) for o in objs]
            if f.name == "group_ids":
                shifted, offset = [], 0
                for v in vals:
                    shifted.append(v + offset)
                    offset = int(shifted[-1].max()) + 1
                values[f.name] = torch.cat(shifted)
            elif isinstance(vals[0], Tensor) and vals[0].dim() == 2:
                values[f.name] = _merge_2d(vals, widths, pad if f.name == "input_ids" else 0)
            elif isinstance(vals[0], Tensor):
                values[f.name] = torch.cat(vals)
            elif isinstance(vals[0], list):
                values[f.name] = [x for v in vals for x in v]
            elif f.name == "prompt_len":
                values[f.name] = max(widths)
            else:
                values[f.name] = vals[0] if not isinstance(vals[0], dict) else dict(vals[0])
        out.append(type(objs[0])(**values))
    return out[0], out[1]


def pick(gen, idx: Tensor):
    """The rows `idx` of a Generated (tensors indexed, lists picked, prompt_len kept)."""
    assert is_dataclass(gen)
    values = {}
    for f in fields(gen):
        v = getattr(gen, f.name)
        values[f.name] = v[idx] if isinstance(v, Tensor) else [v[i] for i in idx.tolist()] if isinstance(v, list) else v
    return type(gen)(**values)
