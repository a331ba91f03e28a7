"""Shared plumbing of the analysis tools (trace, probe): prompts -> scored RolloutBatch -> arm scores.

Outside training there is no Trainer or GRPOModule; the tools use the trainer's own Lightning-free
pieces (flowtracer.train.step: scoring, the teacher-forced pass) and the arms' scores.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from flowtracer.batch import Generated, RolloutBatch
from flowtracer.credit import FlowCredit
from flowtracer.credit.attention import received_attention
from flowtracer.data.datamodule import DEFAULT_INSTRUCTION  # the quickstart's instruction
from flowtracer.data.prompts import format_prompt
from flowtracer.data.sources import load_rows
from flowtracer.errors import InputError
from flowtracer.generation import question_mask, response_token_offsets
from flowtracer.model.forward import teacher_forced_pass
from flowtracer.rewards import Score, VerifierCache, char_span_to_token_mask
from flowtracer.rewards.base import safe_score
from flowtracer.rewards.extract import row_extraction, scaffold_span
from flowtracer.train.step.score import rollout_batch as build_rollout_batch
from flowtracer.train.step.score import score_responses

QUICKSTART_SOURCES = ("data/arith_train.jsonl", "data/arith_val.jsonl")  # 80 + 20 = 100 problems


def tool_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line every analysis tool starts from: its docstring as help, and --model."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", default="smollm2-135m-instruct", help="bundled name, HF folder, .gguf or hub id")
    return p


def require_positive(args, *names: str) -> None:
    """Counts such as --n and --batch-size must be >= 1 (0 never means "all": say how many)."""
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value < 1:
            raise InputError(f"--{name} {value}: must be >= 1 (give the number you want; there is no 'all' value)")


def load_problems(sources: list[str], n: int | None = None) -> list[dict]:
    # generated tasks (reasoning_gym:<task>) need a size: n problems, or 1000 when n is not given
    rows = [r for s in sources for r in load_rows(s, size=(n or 1000) if s.startswith("reasoning_gym:") else None)]
    return rows[:n] if n else rows


def format_prompts(tokenizer, questions: list[str], *, instruction: str | None = DEFAULT_INSTRUCTION,
                   system_prompt: str | None = None, use_chat_template: bool = True):
    """(prompt texts, question character spans), as the datamodule formats them."""
    use_chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    out = [format_prompt(tokenizer, q, system_prompt=system_prompt, instruction=instruction,
                         use_chat_template=use_chat) for q in questions]
    return [o[0] for o in out], [o[1] for o in out]


Verifiers = VerifierCache  # the module's cache of verifier instances, by (name, kwargs)


def judge(verifiers: Verifiers, rows: list[dict], texts: list[str]) -> list:
    """The verifier's Score of each text against its row's answer (never raises)."""
    return [safe_score(verifiers(row), text, row.get("answer"), locate=row_extraction(row))[0]
            for row, text in zip(rows, texts)]


def rollout_batch(tokenizer, verifiers: Verifiers, rows: list[dict], gen: Generated,
                  prompts: list[str]) -> tuple[RolloutBatch, list[Score]]:
    """A RolloutBatch of one response per row (each its own group, zero advantages) and the
    verifier's Score of each (parsed answer, its span), scored exactly as the trainer scores
    (flowtracer.train.step.score)."""
    scored = score_responses(tokenizer, verifiers, rows, gen)
    rb = build_rollout_batch(gen, scored, prompts=prompts, answers=[str(r.get("answer")) for r in rows],
                             group_size=1, advantage=None)
    return rb, list(scored.scores)


def protected_mask(tokenizer, rb: RolloutBatch, scores: list[Score]) -> Tensor:
    """(B, T) bool: the answer's opening scaffold (flowtracer.rewards.extract.scaffold_span: `<answer>`,
    `\\boxed{`, `####`, "The answer is") and the token right before the first answer token, per row
    with an answer span (the probe never masks them; the attribution never counts them as negatives)."""
    out = torch.zeros_like(rb.response_mask, dtype=torch.bool)
    for i, score in enumerate(scores):
        ans = rb.answer_mask[i].nonzero().squeeze(-1)
        if score.answer_span is None or ans.numel() == 0:
            continue
        cols = rb.response_mask[i].nonzero().squeeze(-1)
        span = scaffold_span(rb.responses[i], score.answer_span)
        if span is not None:
            offsets = response_token_offsets(tokenizer, rb.input_ids[i, cols].tolist(), rb.responses[i])
            out[i, cols] = char_span_to_token_mask(offsets, span, cols.numel()).to(out.device)
        before = int(ans.min()) - 1
        if before >= 0 and bool(rb.response_mask[i, before]):
            out[i, before] = True
    return out


@torch.no_grad()
def teacher_force(model, rb: RolloutBatch, layers: str | list[int] = "middle") -> None:
    """Fill rb.old_logprobs, rb.entropies and rb.attn (the head/layer-averaged map of `layers`)."""
    out = teacher_forced_pass(model, rb.input_ids, rb.attention_mask, capture_layers=layers)
    rb.old_logprobs, rb.entropies, rb.attn = out.logprobs, out.entropy, out.attn




def arm_scores(rb: RolloutBatch, *, seed: int = 0, flow: FlowCredit | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """{arm: (B, T) score} for every probe arm, and `reached` (B,) bool (the flow reaches an answer).

    flow_top / flow_bottom share the throughput score (ranked from opposite ends); the others are
    the training arms' scores: uniform noise, old-policy entropy, mean received attention.
    """
    flow = flow or FlowCredit()
    tau, unreached = flow.scores(rb, None)
    gen = torch.Generator().manual_seed(seed)
    resp = rb.response_mask.bool()
    scores = {
        "flow_top": tau.float(), "flow_bottom": tau.float(),
        "random": torch.rand(resp.shape, generator=gen).to(resp.device),
        "entropy": rb.entropies.float(),
        "attention": received_attention(rb.attn, resp),
    }
    return scores, ~unreached


def given_responses(tokenizer, prompts: list[str], spans, responses: list[str]) -> Generated:
    """The Generated layout (prompts left-padded, responses right-padded) of responses supplied by
    the caller instead of sampled; no EOS is appended."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                    return_offsets_mapping=True)
    toks = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    if not all(toks):
        raise InputError("an empty response was given; give non-empty responses or let the tool generate them")
    width = max(len(t) for t in toks)
    r = torch.full((len(toks), width), tokenizer.pad_token_id, dtype=torch.long)
    lens = torch.tensor([len(t) for t in toks])
    resp = torch.arange(width).unsqueeze(0) < lens.unsqueeze(1)
    r[resp] = torch.tensor([i for t in toks for i in t])
    p_attn = enc["attention_mask"].bool()
    no = torch.zeros_like(resp)
    return Generated(
        input_ids=torch.cat([enc["input_ids"], r], 1), attention_mask=torch.cat([p_attn, resp], 1).long(),
        prompt_mask=torch.cat([p_attn, no], 1), response_mask=torch.cat([torch.zeros_like(p_attn), resp], 1),
        question_mask=torch.cat([question_mask(enc["offset_mapping"], enc["attention_mask"], spans), no], 1),
        responses=list(responses), truncated=torch.zeros(len(toks), dtype=torch.bool), prompt_len=p_attn.shape[1],
        prompts=list(prompts))
