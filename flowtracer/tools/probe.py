"""`flowtracer probe`: does the flow find the tokens that matter? (the paper's causal check)

    flowtracer probe                                   # SmolLM2-135M-Instruct, the 100 quickstart problems
    flowtracer probe --model path/to/model --data data/sample_math.jsonl --n 50 --frac 0.2
    flowtracer probe ... --protect none                # the scaffold may be masked too (the old probe)

For each problem:
  1. Greedy response r (max_new_tokens tokens). The verifier parses its final answer; the answer's
     first token is the cut c. The *protected* tokens are the answer's opening scaffold (the marker
     of the extractor that produced it: `<answer>`, `\\boxed{`, `####`, or "The answer is" before
     a fallback answer; flowtracer.rewards.extract.scaffold_span) and the token right before the
     answer. With `--protect scaffold` (default) the reasoning is r[:c] minus the protected tokens;
     with `--protect none` it is all of r[:c]. Problems with no parsed answer, no reasoning, or
     whose flow does not reach the answer are skipped (counted as not eligible), so every arm is
     compared on the same problems.
  2. One teacher-forced pass gives every arm's per-token score on r (flow throughput, entropy,
     received attention, uniform noise). Each arm picks round-half-up(frac * n) of the n reasoning
     tokens: top flow, bottom flow, random, class-matched random, top entropy, top point-wise
     attention. Class-matched random masks, per problem, as many tokens of each token class
     (digit, operator, "=", newline, space, word, punctuation, special, scaffold: the protected
     tokens; flowtracer.credit.stats.FINE_CLASSES) as top flow did, drawn at random within the
     class: the control for "flow picks delimiters, and masking any delimiter hurts".
  3. Regenerate greedily from c with the attention TO the chosen tokens masked: the chosen key
     columns are zeroed in the 2D attention mask of every layer, for the prefix and the new tokens
     alike, while position ids keep the original positions (so the masked tokens carry no
     information forward, yet nothing is shifted, unlike deleting them). Arm "none" masks nothing
     and checks that the regeneration reproduces the original answer.
  4. Answer changed = the parsed answer differs (a missing answer counts as changed); correctness
     flipped = the reward crosses 0.5 either way. Rates over all eligible problems, and over the
     eligible problems where "none" reproduced the answer. Per arm, the class histogram of what it
     masked.

Greedy decoding on both sides makes every change an effect of the mask, not of sampling noise.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowtracer.config import SamplingConfig
from flowtracer.credit.select import rank_in_response, select_mask
from flowtracer.credit.stats import FINE_CLASSES, fine_class_ids
from flowtracer.errors import InputError
from flowtracer.evaluation.stats import fmt_ci, wilson_ci
from flowtracer.generation import eos_ids, generate
from flowtracer.generation.fast import greedy_after_segment, unsupported_reason
from flowtracer.model.policy import load_policy
from flowtracer.tools.analysis import (
    QUICKSTART_SOURCES,
    Verifiers,
    arm_scores,
    format_prompts,
    given_responses,
    judge,
    load_problems,
    protected_mask,
    require_positive,
    rollout_batch,
    teacher_force,
    tool_parser,
)

PROTECT = ("scaffold", "none")
PROBE_ARMS = ("flow_top", "flow_bottom", "random", "class_random", "entropy", "attention")


@dataclass
class ProbeResult:
    frac: float
    protect: str = "scaffold"
    n_problems: int = 0
    n_eligible: int = 0
    n_repro: int = 0  # eligible problems whose "none" regeneration reproduced the answer
    changed: dict[str, int] = field(default_factory=dict)
    flipped: dict[str, int] = field(default_factory=dict)
    changed_repro: dict[str, int] = field(default_factory=dict)
    flipped_repro: dict[str, int] = field(default_factory=dict)
    masked_tokens: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, list[int]] = field(default_factory=dict)  # arm -> count per FINE_CLASSES
    reasoning_tokens: int = 0
    records: list[dict] = field(default_factory=list)

    def table(self) -> list[dict]:
        """One row per arm: rates with 95% Wilson intervals (lo/hi) over the eligible problems, and
        (`*_repro`) over those where "none" reproduced the answer."""
        out = []
        for arm in ("none", *PROBE_ARMS):
            row = {"arm": arm}
            for key, counts, n in (("changed", self.changed, self.n_eligible),
                                   ("flipped", self.flipped, self.n_eligible),
                                   ("changed_repro", self.changed_repro, self.n_repro),
                                   ("flipped_repro", self.flipped_repro, self.n_repro)):
                rate, lo, hi = wilson_ci(counts.get(arm, 0), n)
                row.update({key: rate if n else 0.0, f"{key}_lo": lo, f"{key}_hi": hi})
            row["masked_share"] = self.masked_tokens.get(arm, 0) / max(self.reasoning_tokens, 1)
            out.append(row)
        return out

    def class_table(self) -> list[dict]:
        """One row per arm: how many masked tokens fell in each token class (FINE_CLASSES)."""
        return [{"arm": arm, **dict(zip(FINE_CLASSES, self.class_counts.get(arm, [0] * len(FINE_CLASSES))))}
                for arm in PROBE_ARMS]

    def markdown(self) -> str:
        lines = [f"{self.n_eligible}/{self.n_problems} problems eligible, {self.n_repro} of them with `none` "
                 f"reproducing the answer; protect = {self.protect}; {self.frac:.0%} of the reasoning tokens "
                 "masked per arm; rates with 95% Wilson intervals", "",
                 "| arm | answer changed | correctness flipped | changed (none reproduces) | "
                 "flipped (none reproduces) | masked share |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['arm']} | " + " | ".join(fmt_ci(r[k], r[f"{k}_lo"], r[f"{k}_hi"]) for k in
                                                  ("changed", "flipped", "changed_repro", "flipped_repro"))
                  + f" | {r['masked_share']:.1%} |" for r in self.table()]
        lines += ["", "Token classes of the masked tokens (count, share of the arm's picks):", "",
                  "| arm | " + " | ".join(f"`{c}`" if c == "=" else c for c in FINE_CLASSES) + " |",
                  "|---" * (len(FINE_CLASSES) + 1) + "|"]
        for r in self.class_table():
            total = max(sum(r[c] for c in FINE_CLASSES), 1)
            lines.append(f"| {r['arm']} | " + " | ".join(f"{r[c]} ({r[c] / total:.0%})" for c in FINE_CLASSES) + " |")
        return "\n".join(lines)

    def write_results(self, prefix: str, command: str) -> None:
        """<prefix>.csv (rates), <prefix>_classes.csv (class histograms), <prefix>.md (the command, both)."""
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        rows = self.table()
        extra = {"n_eligible": self.n_eligible, "n_repro": self.n_repro, "n_problems": self.n_problems,
                 "frac": self.frac, "protect": self.protect}
        with open(prefix + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*rows[0], *extra])
            w.writeheader()
            w.writerows({**{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, **extra}
                        for r in rows)
        with open(prefix + "_classes.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["arm", *FINE_CLASSES, "protect"])
            w.writeheader()
            w.writerows({**r, "protect": self.protect} for r in self.class_table())
        Path(prefix + ".md").write_text(f"`{command}`\n\n{self.markdown()}\n")


def cut_points(rb) -> Tensor:
    """(B,) long: column of the first answer token (T where there is no answer)."""
    T = rb.input_ids.shape[1]
    cols = torch.arange(T, device=rb.input_ids.device).expand_as(rb.input_ids)
    return torch.where(rb.answer_mask, cols, T).amin(-1)


def class_matched(reference: Tensor, eligible: Tensor, classes: Tensor, noise: Tensor) -> Tensor:
    """(B, T) bool: per row and class, as many `eligible` tokens of that class as `reference` holds,
    the ones with the highest `noise` (uniform noise: drawn at random within the class). Exact as
    long as `reference` lies inside `eligible`."""
    out = torch.zeros_like(eligible)
    for c in classes[eligible].unique().tolist():
        pool = eligible & (classes == c)
        k = (reference & pool).sum(-1, keepdim=True)
        out |= (rank_in_response(noise, pool, "top") < k) & pool
    return out


def probe_masks(scores: dict[str, Tensor], reasoning: Tensor, frac: float, classes: Tensor | None = None,
                noise: Tensor | None = None) -> dict[str, Tensor]:
    """{arm: (B, T) bool}: round-half-up(frac * n) of each row's `reasoning` tokens, chosen by the arm;
    with `classes` and `noise`, also "class_random" (class-matched to flow_top)."""
    out = {"none": torch.zeros_like(reasoning)}
    for arm, s in scores.items():
        out[arm] = select_mask(s, reasoning, top_frac=frac, select="bottom" if arm == "flow_bottom" else "top")
    if classes is not None and noise is not None:
        out["class_random"] = class_matched(out["flow_top"], reasoning, classes, noise)
    return out


def relative_positions(mask: Tensor, reasoning: Tensor) -> Tensor:
    """(N,) float: where each masked token sits in its row's reasoning, 0 = its first reasoning
    token, 1 = its last (a row with one reasoning token counts as 1)."""
    rank = reasoning.long().cumsum(-1) - 1  # index among the row's reasoning tokens
    n = reasoning.sum(-1, keepdim=True).expand_as(rank)
    rel = rank / (n - 1).clamp(min=1)
    rel = torch.where(n > 1, rel, 1.0)
    return rel[mask & reasoning].float()


def reasoning_segment(rb, rows: Tensor, cut: Tensor, masks: list[Tensor], pad_id: int):
    """The tokens r[:c] of `rows`, right-aligned in a (B, W) segment (W = max c), and each arm's
    blocked columns in that segment, stacked (A, B, W). Left of a short segment is masked padding."""
    plen = int((rb.prompt_mask[rows].any(0)).nonzero().max()) + 1  # prompts are left-padded to end at plen
    c = cut[rows] - plen  # reasoning length per row
    width = int(c.max())
    src = plen + torch.arange(width, device=c.device).unsqueeze(0) - (width - c).unsqueeze(1)
    ok = src >= plen
    srcc = src.clamp(min=plen)
    ids = torch.where(ok, rb.input_ids[rows].gather(1, srcc), pad_id)
    blocked = torch.stack([m[rows].gather(1, srcc) & ok for m in masks])
    return ids, ok, blocked, plen


@torch.no_grad()
def regenerate(model, prompt_ids: Tensor, prompt_valid: Tensor, seg_ids: Tensor, seg_valid: Tensor,
               blocked: Tensor, max_new_tokens: int, eos_ids: list[int], pad_id: int) -> Tensor:
    """Greedy continuations of prompt + segment, one per (row, arm), no token attending to `blocked`.

    prompt_* (B, P) and seg_* (B, W) are shared by the A arms; blocked is (A, B, W). Returns
    (B * A, <= max_new_tokens), row b * A + a = arm a of problem b. The prompt is prefilled once and
    its cache repeated per arm (the masks only touch response tokens). The key mask is
    `valid & ~blocked` (2D, so every layer and head drops those columns); position ids come from
    `valid` alone, so the remaining tokens keep their original positions. Runs on the fast decode
    path (flowtracer.generation.fast) where it supports the model, else on the model's own forward."""
    run = greedy_after_segment if unsupported_reason(model) is None else regenerate_hf
    return run(model, prompt_ids, prompt_valid, seg_ids, seg_valid, blocked, max_new_tokens, eos_ids, pad_id)


@torch.no_grad()
def regenerate_hf(model, prompt_ids: Tensor, prompt_valid: Tensor, seg_ids: Tensor, seg_valid: Tensor,
                  blocked: Tensor, max_new_tokens: int, eos_ids: list[int], pad_id: int) -> Tensor:
    """`regenerate` on the model's own forward and KV cache (any architecture)."""
    A = blocked.shape[0]
    # logits_to_keep=1: only the last position's logits are used (the vocabulary projection of the
    # whole context would dominate the cost).
    pos = (prompt_valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = model(input_ids=prompt_ids, attention_mask=prompt_valid.long(), position_ids=pos, use_cache=True,
                  logits_to_keep=1).cache
    cache.batch_repeat_interleave(A)

    def rep(t):
        return t.repeat_interleave(A, 0)

    seg_keys = rep(seg_valid) & ~blocked.transpose(0, 1).flatten(0, 1)
    keys = torch.cat([rep(prompt_valid), seg_keys], 1).long()
    seg_pos = pos[:, -1:] + seg_valid.long().cumsum(-1)
    out = model(input_ids=rep(seg_ids), attention_mask=keys, position_ids=rep(seg_pos), cache=cache,
                use_cache=True, logits_to_keep=1)
    cache, nxt, last = out.cache, out.logits[:, -1].argmax(-1), rep(seg_pos[:, -1])
    eos = torch.tensor(eos_ids, device=nxt.device)
    done = torch.zeros_like(nxt, dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        nxt = torch.where(done, pad_id, nxt)
        new.append(nxt)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()):
            break
        keys = torch.cat([keys, torch.ones_like(keys[:, :1])], 1)
        last = last + 1
        out = model(input_ids=nxt.unsqueeze(1), attention_mask=keys, position_ids=last.unsqueeze(1),
                    cache=cache, use_cache=True, logits_to_keep=1)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1)
    return torch.stack(new, 1)


@dataclass
class ArmSelection:
    """One batch's responses, teacher-forced, and what every arm masks (probe_masks)."""
    rb: Any  # flowtracer.tools.analysis.rollout_batch's batch
    verdicts: list
    masks: dict[str, Tensor]
    reasoning: Tensor  # (B, T) bool: the maskable reasoning of the eligible rows
    protected: Tensor  # (B, T) bool: the protected scaffold inside r[:c]
    eligible: Tensor  # (B,) bool
    classes: Tensor  # (B, T) long: FINE_CLASSES ids
    cut: Tensor  # (B,) long: the answer's first column


@torch.no_grad()
def select_arms(model, tokenizer, rows: list[dict], *, verifiers: Verifiers, protect: str, frac: float,
                max_new_tokens: int, layers="middle", seed: int = 0, responses: list[str] | None = None,
                **prompt_kw) -> ArmSelection:
    """Steps 1-2 of the probe: greedy (or given) responses, one teacher-forced pass, every arm's masks."""
    prompts, spans = format_prompts(tokenizer, [r["question"] for r in rows], **prompt_kw)
    if responses is None:
        greedy = SamplingConfig(num_generations=1, max_new_tokens=max_new_tokens, temperature=0.0)
        gen = generate(model, tokenizer, prompts, spans, greedy)
    else:
        gen = given_responses(tokenizer, prompts, spans, responses)
    rb, verdicts = rollout_batch(tokenizer, verifiers, rows, gen, prompts)
    teacher_force(model, rb, layers)
    scores, reached = arm_scores(rb, seed=seed)
    cut = cut_points(rb)
    cols = torch.arange(rb.seq_len, device=cut.device)
    reasoning = rb.response_mask.bool() & (cols.unsqueeze(0) < cut.unsqueeze(1))
    protected = protected_mask(tokenizer, rb, verdicts) & reasoning
    if protect == "scaffold":
        reasoning = reasoning & ~protected
    eligible = reached & reasoning.any(-1)
    reasoning = reasoning & eligible.unsqueeze(1)
    classes = fine_class_ids(tokenizer, rb.input_ids, protected)
    noise = torch.rand(reasoning.shape, generator=torch.Generator().manual_seed(seed + 1_000_003)).to(cut.device)
    masks = probe_masks(scores, reasoning, frac, classes=classes, noise=noise)
    return ArmSelection(rb, verdicts, masks, reasoning, protected, eligible, classes, cut)


@torch.no_grad()
def probe_batch(model, tokenizer, rows: list[dict], result: ProbeResult, *, verifiers: Verifiers,
                max_new_tokens: int, layers="middle", seed: int = 0, responses: list[str] | None = None,
                **prompt_kw) -> dict[str, Tensor]:
    """Probe one batch of problems; adds to `result` and returns the masks (for tests), with the
    protected tokens under "protected" and the response tokens under "response".

    `responses` probes given responses (e.g. a run's rollouts) instead of greedy ones."""
    sel = select_arms(model, tokenizer, rows, verifiers=verifiers, protect=result.protect, frac=result.frac,
                      max_new_tokens=max_new_tokens, layers=layers, seed=seed, responses=responses, **prompt_kw)
    rb, verdicts, masks, reasoning, eligible = sel.rb, sel.verdicts, sel.masks, sel.reasoning, sel.eligible
    cut, classes, protected = sel.cut, sel.classes, sel.protected
    result.n_problems += len(rows)
    result.n_eligible += int(eligible.sum())
    result.reasoning_tokens += int(reasoning.sum())
    idx = eligible.nonzero().squeeze(-1)
    if idx.numel() > 0:
        # All arms of all eligible problems regenerate in one batch: the context is prompt + r[:c].
        pad = tokenizer.pad_token_id
        seg_ids, seg_valid, blocked, plen = reasoning_segment(rb, idx, cut, list(masks.values()), pad)
        new = regenerate(model, rb.input_ids[idx, :plen], rb.attention_mask[idx, :plen].bool(), seg_ids, seg_valid,
                         blocked, max_new_tokens, eos_ids(tokenizer, model), pad)
        # New response = r[:c] + continuation; decoded and verified like the original.
        A = len(masks)
        texts = tokenizer.batch_decode(torch.cat([seg_ids.repeat_interleave(A, 0), new], 1), skip_special_tokens=True)
        again = judge(verifiers, [rows[i] for i in idx.tolist() for _ in range(A)], texts)
        _tally(result, tokenizer, rows, rb, masks, classes, idx, [v.parsed for v in verdicts],
               [(v.parsed, v.reward) for v in again], texts)
    return {**masks, "protected": protected, "response": rb.response_mask.bool()}


def _tally(result: ProbeResult, tokenizer, rows, rb, masks: dict[str, Tensor], classes: Tensor, idx: Tensor,
           parsed: list, again: list[tuple], texts: list[str]) -> None:
    """Add one batch's outcomes to `result`: again[j * A + a] = (parsed, reward) of arm a on problem idx[j]."""
    arms, A = list(masks), len(masks)
    outcome = {}  # (arm, problem) -> (changed, flipped)
    for a, arm in enumerate(arms):
        for j, i in enumerate(idx.tolist()):
            p_new, r_new = again[j * A + a]
            outcome[arm, i] = (p_new is None or p_new != parsed[i], (r_new > 0.5) != (float(rb.rewards[i]) > 0.5))
    repro = {i for i in idx.tolist() if not outcome["none", i][0]}
    result.n_repro += len(repro)
    n_cls = len(FINE_CLASSES)
    for a, arm in enumerate(arms):
        for j, i in enumerate(idx.tolist()):
            changed, flipped = outcome[arm, i]
            result.changed[arm] = result.changed.get(arm, 0) + changed
            result.flipped[arm] = result.flipped.get(arm, 0) + flipped
            result.changed_repro[arm] = result.changed_repro.get(arm, 0) + (changed and i in repro)
            result.flipped_repro[arm] = result.flipped_repro.get(arm, 0) + (flipped and i in repro)
            if arm != "none":
                masked = tokenizer.batch_decode([[t] for t in rb.input_ids[i][masks[arm][i]].tolist()])
                result.records.append({"question": rows[i]["question"], "arm": arm, "original": rb.responses[i],
                                       "masked": masked, "regenerated": texts[j * A + a], "changed": changed,
                                       "flipped": flipped, "none_reproduces": i in repro})
        result.masked_tokens[arm] = result.masked_tokens.get(arm, 0) + int(masks[arm].sum())
        if arm != "none":
            counts = torch.bincount(classes[masks[arm]], minlength=n_cls).tolist()
            old = result.class_counts.get(arm, [0] * n_cls)
            result.class_counts[arm] = [x + y for x, y in zip(old, counts)]


def run_probe(model, tokenizer, rows: list[dict], *, frac: float = 0.2, max_new_tokens: int = 32,
              batch_size: int = 20, layers="middle", seed: int = 0, protect: str = "scaffold",
              **prompt_kw) -> ProbeResult:
    if not 0 < frac < 1:
        raise InputError(f"--frac must be in (0, 1), got {frac}")
    if protect not in PROTECT:
        raise InputError(f"--protect must be one of {PROTECT}, got {protect!r}")
    result = ProbeResult(frac=frac, protect=protect)
    verifiers = Verifiers()
    model.eval()
    for start in range(0, len(rows), batch_size):
        probe_batch(model, tokenizer, rows[start:start + batch_size], result, verifiers=verifiers,
                    max_new_tokens=max_new_tokens, layers=layers, seed=seed + start, **prompt_kw)
        print(f"[probe] {min(start + batch_size, len(rows))}/{len(rows)} problems", file=sys.stderr, flush=True)
    return result


def main(argv: list[str]) -> int:

    p = tool_parser("flowtracer probe", __doc__)
    p.add_argument("--data", nargs="+", default=list(QUICKSTART_SOURCES), help="problem sources (load_rows grammar)")
    p.add_argument("--n", type=int, default=100, help="problems (the first n of --data)")
    p.add_argument("--frac", type=float, default=0.2, help="share of the reasoning tokens masked")
    p.add_argument("--protect", choices=PROTECT, default="scaffold",
                   help="scaffold (default): the answer's opening scaffold and the token before the answer are "
                        "never masked; none: every token before the answer may be (the old probe)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=20, help="problems per batch (x 7 arms regenerate together)")
    p.add_argument("--layers", default="middle", help="attention layers of the map (flow and attention arms)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random arms")
    p.add_argument("--instruction", default=None, help="instruction appended to each question (default: quickstart's)")
    p.add_argument("--out", help="write the table and per-problem records to this JSON file")
    p.add_argument("--results", help="write <RESULTS>.csv, <RESULTS>_classes.csv and <RESULTS>.md "
                                     "(e.g. results/probe_chains)")
    args = p.parse_args(argv)
    require_positive(args, "n", "batch-size", "max-new-tokens")
    torch.manual_seed(args.seed)
    model, tokenizer = load_policy(os.path.expanduser(args.model), lora=None)
    rows = load_problems(args.data, args.n)
    kw = {"instruction": args.instruction} if args.instruction else {}
    result = run_probe(model, tokenizer, rows, frac=args.frac, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, layers=args.layers, seed=args.seed, protect=args.protect, **kw)
    print(result.markdown())
    wrote = []
    if args.results:
        result.write_results(args.results, shlex.join(["flowtracer", "probe", *argv]))  # quoted: runs as written
        wrote += [args.results + s for s in (".csv", "_classes.csv", ".md")]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"table": result.table(), "classes": result.class_table(), "n_problems": result.n_problems,
                       "n_eligible": result.n_eligible, "n_repro": result.n_repro, "args": vars(args),
                       "records": result.records}, f, indent=1)
        wrote.append(args.out)
    print(f"flowtracer probe: wrote {', '.join(wrote)}" if wrote else
          "flowtracer probe: wrote no files (--out FILE.json for the records, --results PREFIX for the tables)")
    return 0
