"""FlowCredit: the FlowTracer arm. Score = throughput tau of the answer-conditioned attention flow."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from flowtracer.batch import RolloutBatch
from flowtracer.credit.base import ScoreCredit
from flowtracer.credit.select import check_choice
from flowtracer.flow import trace_flow
from flowtracer.flow.trace import INJECTS
from flowtracer.model.layers import HEADS, check_layers

SOURCES = ("question", "prompt")
FALLBACKS = ("uniform", "last_token")


class FlowCredit(ScoreCredit):
    """Up-weight the hub tokens that carry the question-to-answer flow (arXiv 2606.10646).

    Reads the head/layer-averaged attention the module captured in its teacher-forced pass
    (`rollouts.attn`, layers from `layers`), traces the flow from the source tokens to the answer
    span, and gives the top `top_frac` of each response's tokens by throughput the weight `gamma`.
    Prompt tokens carry flow but are never weighted.

    Args:
        layers (str | list[int], default "middle"): attention layers averaged into the map:
            "early", "middle" ([L/3, 2L/3)), "late", "all", or a list of layer indices.
        heads (str, default "mean"): how each layer's query heads make its map: "mean" (the
            paper's) or "max" (element-wise maximum over the heads; flowtracer.model.capture).
        inject (str, default "uniform"): flow into the sources: "uniform" 1/|Q'| (the paper's) or
            "reachability" h(q) / sum h (the walk conditioned to reach the answer;
            flowtracer.flow.trace_flow).
        top_frac (float, default 0.4): share of each response's tokens that get `gamma`
            (k = round-half-up(top_frac * n), at least 1; ties go to the earlier token).
        gamma (float, default 1.5): weight of the selected tokens; the other response tokens keep 1.
        select (str, default "top"): "top" = highest throughput, "bottom" = lowest (ablation).
        mapping (str, default "hard"): "hard" 0/1 selection; "linear" 1 + (gamma-1) tau / max tau;
            "rank" 1 + (gamma-1) * rank percentile (continuous maps ignore top_frac).
        normalize (bool, default False): rescale each response's weights to mean 1.
        condition_on_answer (bool, default True): Doob h-transform toward the answer (ablation switch).
        conserve (bool, default True): local flow conservation (ablation switch).
        edge_eps (float, default 0.0): prune edges whose attention is below this.
        source (str, default "question"): flow source tokens: "question" (rollouts.question_mask) or
            "prompt" (every prompt token, rollouts.prompt_mask).
        fallback (str, default "uniform"): a response with no answer span: "uniform" gives it all-ones
            weights; "last_token" traces the flow to its last token instead. Any response whose
            flow does not reach the sink gets all-ones weights; both cases count in
            credit/fallback_frac.

    Logged besides ScoreCredit's: credit/no_answer_frac (responses without an answer span),
    credit/reached_frac (share of the traced responses whose flow reaches the answer),
    credit/answer_mass (mean over reached responses of the flow into the answer tokens; 1 when
    conditioned), credit/flow_seconds (time in the flow engine).
    """

    needs_attention = True

    def __init__(self, layers: str | list[int] = "middle", top_frac: float = 0.4, gamma: float = 1.5,
                 select: str = "top", mapping: str = "hard", normalize: bool = False,
                 condition_on_answer: bool = True, conserve: bool = True, edge_eps: float = 0.0,
                 source: str = "question", fallback: str = "uniform", heads: str = "mean",
                 inject: str = "uniform"):
        super().__init__(top_frac=top_frac, gamma=gamma, select=select, mapping=mapping, normalize=normalize)
        check_choice("source", source, SOURCES)
        check_choice("heads", heads, HEADS)
        check_choice("inject", inject, INJECTS)
        self.capture_heads, self.inject = heads, inject
        check_choice("fallback", fallback, FALLBACKS)
        if not edge_eps >= 0:
            raise ValueError(f"edge_eps must be >= 0, got {edge_eps}")
        self.capture_layers = check_layers(layers)
        self.condition_on_answer, self.conserve = bool(condition_on_answer), bool(conserve)
        self.edge_eps, self.source, self.fallback = float(edge_eps), source, fallback

    def scores(self, rollouts: RolloutBatch, step: int | None) -> tuple[Tensor, Tensor]:
        if rollouts.attn is None:
            raise RuntimeError("FlowCredit needs rollouts.attn: run the teacher-forced pass with "
                               "capture_layers (token_weights and the GRPO module do so when needs_attention=True)")
        valid = rollouts.attention_mask.bool()
        resp = rollouts.response_mask.bool() & valid
        src = (rollouts.question_mask if self.source == "question" else rollouts.prompt_mask).bool() & valid
        ans = rollouts.answer_mask.bool() & valid
        no_answer = ~ans.any(-1)
        if self.fallback == "last_token":
            ans = ans | (_last_token(resp) & no_answer.unsqueeze(-1))
        traced = ans.any(-1)  # trace_flow rejects an empty answer set: trace only these rows
        B, T = resp.shape
        tau = torch.zeros(B, T, dtype=torch.float64, device=resp.device)
        reached = torch.zeros(B, dtype=torch.bool, device=resp.device)
        mass = torch.zeros(0, dtype=torch.float64)
        t0 = time.perf_counter()
        if bool(traced.any()):
            rows = slice(None) if bool(traced.all()) else traced.nonzero().squeeze(-1)
            res = trace_flow(rollouts.attn[rows], src[rows], ans[rows], valid_mask=valid[rows],
                             edge_eps=self.edge_eps, condition_on_answer=self.condition_on_answer,
                             conserve=self.conserve, inject=self.inject)
            tau[rows], reached[rows] = res.throughput, res.reached
            mass = res.sink_flow.sum(-1)[res.reached]
            if tau.is_cuda:
                torch.cuda.synchronize(tau.device)
        n_traced = int(traced.sum())
        rollouts.metrics.update({
            "credit/flow_seconds": time.perf_counter() - t0,
            "credit/no_answer_frac": float(no_answer.float().mean()),
            "credit/reached_frac": float(reached.sum()) / n_traced if n_traced else 0.0,
            "credit/answer_mass": float(mass.mean()) if mass.numel() else 0.0,
        })
        return tau, ~reached


def _last_token(resp: Tensor) -> Tensor:
    """(B, T) bool: the last response token of each row (none for an empty response)."""
    T = resp.shape[-1]
    pos = torch.arange(T, device=resp.device).expand_as(resp)
    last = torch.where(resp, pos, -1).amax(-1, keepdim=True)
    return (pos == last) & resp
