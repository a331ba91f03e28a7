"""Ground truth of the variable-chains task as token masks and token groups (flowtracer.tools.attribution).

The generator's character spans (flowtracer.data.chains: dep_spans, distractor_spans) and the steps
parsed from the model's own response (parse_steps) are mapped onto tokens through offsets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowtracer.data.chains import parse_steps
from flowtracer.errors import InputError
from flowtracer.generation import response_token_offsets
from flowtracer.rewards.spans import char_span_to_token_mask


def spans_mask(offsets, spans, length: int, shift: int = 0) -> Tensor:
    """(length,) bool: tokens overlapping any of the character spans (shifted by `shift`)."""
    mask = torch.zeros(length, dtype=torch.bool)
    for a, b in spans:
        mask |= char_span_to_token_mask(offsets, (a + shift, b + shift), length)
    return mask


def has_truth(rows: list[dict], strict: bool = False) -> bool:
    """Whether every row carries chain ground truth (meta.dep_spans); `strict`: a mix is an error."""
    flags = ["dep_spans" in (r.get("meta") or {}) for r in rows]
    if strict and any(flags) and not all(flags):
        raise InputError("some problems carry chain ground truth (meta.dep_spans) and some do not; "
                         "give attribution one kind (data/chains_*.jsonl, or problems without ground truth)")
    return bool(flags) and all(flags)


def _groups(masks: list[Tensor], width: int) -> Tensor:
    """(width,) long: index of the last mask holding each token, -1 for none."""
    out = torch.full((width,), -1, dtype=torch.long)
    for j, m in enumerate(masks):
        out[m] = j
    return out


def _labels(rows_labels: list[list[int]]) -> Tensor:
    """(B, G) long: per row its groups' labels (1 positive, 0 negative), padded with -1."""
    width = max((len(x) for x in rows_labels), default=0)
    return torch.tensor([x + [-1] * (width - len(x)) for x in rows_labels], dtype=torch.long).view(len(rows_labels),
                                                                                                  width)


def ground_truth(tokenizer, rb, rows: list[dict], qspans) -> dict[str, Tensor]:
    """(B, T) masks and groups of a batch of chain problems and responses:

    q_dep, q_dis      tokens of the dependency / distractor statements (bool)
    q_stmt            statement of each question token, -1 for none (long); q_stmt_label (B, S)
    r_used, r_read    write sites / read sites of the used intermediate results (bool)
    r_line            step line of each response token, -1 for none (long); r_line_label (B, L):
                      1 = a later step reads its result, 0 = none does
    """
    B, T = rb.input_ids.shape
    out = {k: torch.zeros(B, T, dtype=torch.bool) for k in ("q_dep", "q_dis", "r_used", "r_read")}
    out["q_stmt"] = torch.full((B, T), -1, dtype=torch.long)
    out["r_line"] = torch.full((B, T), -1, dtype=torch.long)
    q_labels, r_labels = [], []
    plen = int(rb.prompt_mask.any(0).nonzero().max()) + 1  # prompts end at this column
    for i, row in enumerate(rows):  # per problem (text offsets), never per token
        meta, span = row.get("meta") or {}, qspans[i]
        if span is None or "dep_spans" not in meta:
            raise InputError("attribution needs chain problems with ground truth (meta.dep_spans); "
                             "use data/chains_*.jsonl or the 'chains' source")
        enc = tokenizer(rb.prompts[i], add_special_tokens=False, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        cols = slice(plen - n, plen)
        stmts = [(s, 1) for s in meta["dep_spans"]] + [(s, 0) for s in meta["distractor_spans"]]
        masks = [spans_mask(enc["offset_mapping"], [s], n, span[0]) for s, _ in stmts]
        out["q_dep"][i, cols] = spans_mask(enc["offset_mapping"], meta["dep_spans"], n, span[0])
        out["q_dis"][i, cols] = spans_mask(enc["offset_mapping"], meta["distractor_spans"], n, span[0])
        out["q_stmt"][i, cols] = _groups(masks, n)
        q_labels.append([lab for _, lab in stmts])
        r_labels.append(_response_truth(tokenizer, rb, i, row["question"], out))
    out["q_stmt_label"], out["r_line_label"] = _labels(q_labels), _labels(r_labels)
    return {k: v.to(rb.input_ids.device) for k, v in out.items()}


def _response_truth(tokenizer, rb, i: int, question: str, out: dict[str, Tensor]) -> list[int]:
    """Fill row i's write/read sites and step lines into `out`; return the lines' labels."""
    rcols = rb.response_mask[i].nonzero().squeeze(-1)
    ids = rb.input_ids[i, rcols].tolist()
    text = rb.responses[i]
    offsets = response_token_offsets(tokenizer, ids, text)
    steps = parse_steps(text, question)
    used = [s for s in steps if s["used"]]
    out["r_used"][i, rcols] = spans_mask(offsets, [s["result_span"] for s in used], len(ids))
    out["r_read"][i, rcols] = spans_mask(offsets, [u for s in used for u in s["use_spans"]], len(ids))
    out["r_line"][i, rcols] = _groups([spans_mask(offsets, [s["line_span"]], len(ids)) for s in steps], len(ids))
    return [int(s["used"]) for s in steps]


def excluded_mask(rb, protected: Tensor) -> Tensor:
    """(B, T) bool: response tokens never counted as negatives: the protected scaffold and every
    token from the first answer token on (the answer, `</answer>`, eos)."""
    resp = rb.response_mask.bool()
    cols = torch.arange(resp.shape[-1], device=resp.device)
    ans = rb.answer_mask.bool()
    first = torch.where(ans, cols, resp.shape[-1]).amin(-1, keepdim=True)
    return resp & (protected | (cols >= first))
