"""trace_flow: answer-conditioned flow from the question through the attention DAG (docs/method.md).

Pipeline per sequence, all batched, float64, two triangular solves and a few in-place passes:
  W (capacities) -> h (reachability, (I - W) h = 1_A) -> W' (Doob h-transform)
  -> f (node flow, (I - W'^T) f = inject) -> tau (throughput).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .graph import H_TINY, build_capacity, check_attn, check_mask, solve_unit

INJECTS = ("uniform", "reachability")


@dataclass
class FlowResult:
    """Everything `trace_flow` computed. Float tensors are float64; batched shapes shown, an
    unbatched call drops the leading B. Every entry at an invalid (padding) position is 0/False.

    reach       h (B, T): weighted number of paths to the answer; 1 on answer tokens.
    capacity    W' (B, T, T): `capacity[b, i, k]` = capacity of edge i -> k actually used (i < k),
                for the chosen switches. A transposed view of a row-major (receiver, sender)
                buffer, i.e. it is not contiguous.
    inflow      f (B, T): flow through each token.
    throughput  tau (B, T): inflow plus all outflow, the sink edge a -> s included.
    reached     (B,) bool: some source token reaches an answer token through positive edges.
    inject      (B, T): flow the super-source puts into each token (sums to 1 when reached, else 0).
    source_mask, answer_mask, valid_mask  (B, T) bool, as used (source/answer already AND valid).
    condition_on_answer, conserve, edge_eps, inject_mode  the switches this result was computed with.
    """

    reach: Tensor
    capacity: Tensor
    inflow: Tensor
    throughput: Tensor
    reached: Tensor
    inject: Tensor
    source_mask: Tensor
    answer_mask: Tensor
    valid_mask: Tensor
    condition_on_answer: bool = True
    conserve: bool = True
    edge_eps: float = 0.0
    inject_mode: str = "uniform"

    @property
    def batched(self) -> bool:
        return self.reached.dim() == 1

    @property
    def sink_flow(self) -> Tensor:
        """Flow on the edges a -> s (f(a) on answer tokens, 0 elsewhere), shape like `inflow`."""
        return self.inflow * self.answer_mask

    def edge_flow(self) -> Tensor:
        """phi[b, i, k] = f(i) W'(i, k), see `edge_flow`."""
        return edge_flow(self)


def edge_flow(res: FlowResult) -> Tensor:
    """Edge flow phi[b, i, k] = f(b, i) * W'[b, i, k], float64 (B, T, T) (or (T, T) unbatched).

    Token-to-token edges only; the sink edges a -> s carry `res.sink_flow`.
    """
    return res.inflow.unsqueeze(-1) * res.capacity


def trace_flow(
    attn: Tensor,
    source_mask: Tensor,
    answer_mask: Tensor,
    *,
    valid_mask: Tensor | None = None,
    edge_eps: float = 0.0,
    condition_on_answer: bool = True,
    conserve: bool = True,
    inject: str = "uniform",
) -> FlowResult:
    """Trace flow from the source (question) tokens to the answer tokens through attention.

    Args:
        attn: (T, T) or (B, T, T) float, `attn[b, q, k]` = attention query q pays to key k. Only the
            strict lower triangle is read: edge i -> k (i < k) has capacity W[i, k] = attn[k, i].
        source_mask, answer_mask: (T,) / (B, T) bool (0/1 ints accepted): question tokens Q, answer
            tokens A. Both are AND-ed with `valid_mask`.
        valid_mask: (T,) / (B, T) bool, False on padding (left or right). Rows and columns of invalid
            tokens are ignored (never read or checked) and every result there is 0. Default: all valid.
        edge_eps: capacities below this are set to 0 before anything else (pruning).
        condition_on_answer, conserve: the paper's ablation switches, see below.
        inject: how the unit of flow is put into the sources: "uniform" (the paper's) or
            "reachability", see below.

    Graph (all switch settings): answer tokens are absorbing, their only out-edge goes to the
    super-sink s with weight 1 (out-edges to later tokens are dropped). h is always computed on this
    graph: h(a) = 1 on A, h(i) = sum_{k>i} W[i,k] h(k) otherwise. A token is *alive* if h > 0
    (numerically h > 2.2e-308, the smallest normal float64, so that 1/h is finite).
    `reached` = some source token is alive; if not, inject = f = tau = 0 (whatever the switches), so
    callers can fall back to uniform credit.

    Switches (W' is the capacity used for the flow, stored as `capacity`):
      - both on (the method): Doob h-transform W'[i,k] = W[i,k] h(k) / h(i) on alive i, rows of dead
        tokens zero. Out-weights of alive non-answer tokens sum to 1; answers receive exactly 1.
      - condition_on_answer only: W'[i,k] = W[i,k] if k is alive else 0 (raw capacities).
      - conserve only: W' = W row-normalised (rows with zero out-weight stay zero).
      - both off: W' = W.
    Injection: with conditioning, 1/|Q'| into each alive source (Q' = alive part of Q); without it,
    1/|Q| into every source (the walk is not conditioned, so dead-end sources also get mass), in both
    cases only when `reached`.
    inject="reachability": h(q) / sum_{Q'} h into each alive source q instead (dead sources get 0,
    whatever the switches): the start distribution of a walk that starts uniformly on Q and is
    conditioned to reach A. With the uniform injection every alive source sends exactly its
    1/|Q'| to the answer in the Doob setting, so throughput cannot rank sources by relevance;
    with this one a source's share is its weight of paths to the answer.
    A source token that is also an answer token is a source like any other: it gets its injection
    (h = 1 > 0) and passes it straight to the sink (a one-token path in `dominant_paths`).

    Flow f(k) = inject(k) + sum_{i<k} f(i) W'[i,k]; throughput tau(k) = f(k) + sum_j f(k) W'[k,j]
    + [k in A] f(k), computed literally (on alive tokens it equals 2 f(k) in the Doob setting).

    Returns:
        FlowResult (unbatched tensors for unbatched input).

    Raises:
        ValueError: wrong dims/shapes/dtypes, mismatched mask shapes, NaN/inf or negative weights in
            the read part of attn, negative/NaN edge_eps, an empty answer set, or capacities so large
            that h overflows float64 (the batch index is named where one sequence is at fault).
    """
    if inject not in INJECTS:
        raise ValueError(f"inject = {inject!r} is not an option; use 'uniform' (the paper's, default) "
                         "or 'reachability'")
    inject_mode = inject
    A3, src, ans, val, batched = _inputs(attn, source_mask, answer_mask, valid_mask, edge_eps)
    G = build_capacity(A3, val, ans, float(edge_eps), batched)  # G[b, k, i] = W[b, i, k]
    f64 = G.dtype

    # Reachability h: (I - W) h = 1_A with W = G^T (upper triangular system).
    h = solve_unit(G, ans.to(f64), transpose=True)
    if not bool(torch.isfinite(h).all()):
        b = int((~torch.isfinite(h)).any(dim=-1).nonzero()[0])
        where = f" in sequence {b} of the batch" if batched else ""
        raise ValueError(
            f"reachability h overflows float64{where}: capacities too large (attention rows sum to <= 1)"
        )
    alive = h > H_TINY
    reached = (src & alive).any(dim=-1)

    _reweight(G, h, alive, condition_on_answer, conserve)
    inject = _injection(inject, src, alive, h, condition_on_answer) * reached.unsqueeze(-1)

    # Node flow: (I - W'^T) f = inject, W'^T = G (lower triangular system).
    f = solve_unit(G, inject, transpose=False)
    outflow = f * G.sum(dim=-2)  # sum_j f(k) W'[k, j]
    tau = f + outflow + f * ans  # the sink edge a -> s carries f(a)

    res = FlowResult(
        reach=h,
        capacity=G.mT,
        inflow=f,
        throughput=tau,
        reached=reached,
        inject=inject,
        source_mask=src,
        answer_mask=ans,
        valid_mask=val,
        condition_on_answer=bool(condition_on_answer),
        conserve=bool(conserve),
        edge_eps=float(edge_eps),
        inject_mode=inject_mode,
    )
    if not batched:
        for name in ("reach", "capacity", "inflow", "throughput", "reached", "inject", "source_mask",
                     "answer_mask", "valid_mask"):
            setattr(res, name, getattr(res, name).squeeze(0))
    return res

def _inputs(attn, source_mask, answer_mask, valid_mask, edge_eps):
    """Checked (B, T, T) attention and (B, T) masks (sources and answers restricted to valid tokens)."""
    check_attn(attn)
    batched = attn.dim() == 3
    A3 = attn if batched else attn.unsqueeze(0)
    B, T = A3.shape[0], A3.shape[-1]
    mshape = A3.shape[:-1] if batched else A3.shape[-1:]
    dev = attn.device
    src = check_mask(source_mask, "source_mask", mshape, dev)
    ans = check_mask(answer_mask, "answer_mask", mshape, dev)
    val = check_mask(valid_mask, "valid_mask", mshape, dev)
    if not batched:
        src, ans = src.unsqueeze(0), ans.unsqueeze(0)
        val = None if val is None else val.unsqueeze(0)
    if val is None:
        val = torch.ones(B, T, dtype=torch.bool, device=dev)
    if not (isinstance(edge_eps, (int, float)) and edge_eps >= 0 and edge_eps < float("inf")):
        raise ValueError(f"edge_eps must be a finite number >= 0, got {edge_eps!r}")
    src, ans = src & val, ans & val
    empty = ~ans.any(dim=-1)
    if bool(empty.any()):
        b = int(empty.nonzero()[0])
        where = f"sequence {b} of the batch has" if batched else "the sequence has"
        raise ValueError(f"empty answer set: {where} no valid answer token (answer_mask & valid_mask)")
    return A3, src, ans, val, batched


def _injection(mode: str, src: Tensor, alive: Tensor, h: Tensor, condition_on_answer: bool) -> Tensor:
    """(B, T) flow into each source, summing to 1 over a row with any injected source (0 otherwise)."""
    if mode == "reachability":
        w = torch.where(src & alive, h, 0.0)
    else:
        w = ((src & alive) if condition_on_answer else src).to(h.dtype)
    total = w.sum(dim=-1, keepdim=True)
    return w / torch.where(total > 0, total, 1.0)


def _reweight(G: Tensor, h: Tensor, alive: Tensor, condition_on_answer: bool, conserve: bool) -> None:
    """Turn the capacities G (G[b, k, i] = W[i, k]) into W' in place, per the two switches."""
    if condition_on_answer and conserve:
        # W'[i,k] = W[i,k] h(k) / h(i): scale row k of G by h(k), column i by 1/h(i) (0 if dead).
        # W[i,k] h(k) <= h(i), so the product stays <= 1 and cannot overflow.
        inv_h = torch.where(alive, 1.0 / torch.where(alive, h, 1.0), 0.0)
        G.mul_(h.unsqueeze(-1)).mul_(inv_h.unsqueeze(-2))
    elif condition_on_answer:
        G.masked_fill_(~alive.unsqueeze(-1), 0.0)  # drop edges into dead tokens
    elif conserve:
        out = G.sum(dim=-2)  # out-weight of each token (answer tokens: 0, their sink edge is implicit)
        live = out > H_TINY  # a subnormal total would make 1/out infinite
        G.mul_(torch.where(live, 1.0 / torch.where(live, out, 1.0), 0.0).unsqueeze(-2))
