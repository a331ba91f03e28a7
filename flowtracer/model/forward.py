"""The teacher-forced forward of an RL step: log-probs and entropies at the sampling temperature,
optionally with the attention map captured in the same forward.

The policy gradient is taken for the distribution that produced the samples: rollouts drawn at
temperature T > 0 are scored with log_softmax(logits / T) everywhere a log-prob or an entropy feeds
the loss (ratio, KL) or a credit arm (EntropyCredit), as TRL, verl and torchtune do
(`logprob_temperature`). Greedy decoding (T = 0) has no sampling distribution to match; it scores at
T = 1. top-k / top-p truncation is NOT applied here: log-probs are those of the full tempered
distribution, so they are exact for untruncated sampling; with truncation a sampled token's
probability under the truncated sampler is larger by the kept mass (the same approximation TRL and
verl make). The ratio of the first PPO epoch is 1 either way.

Full-vocabulary logits are never materialised for the whole batch: positions are projected in
chunks whose float32 logits fit a byte budget, and with a graph each chunk is recomputed in the
backward (activation checkpointing).

Under autocast (trainer.precision bf16-mixed / 16-mixed) the vocabulary projection runs in the
autocast dtype, and its output is upcast to float32 before the temperature and the log-softmax:
log-probs and entropies are always float32, so the PPO ratio and the TIS weights compare float32
numbers. The entropy's dot product runs with autocast off (it would round to bf16 otherwise).
Frozen linear layers multiply with cached autocast-dtype copies of their weights
(flowtracer.model.casts.autocast_linears: the same numbers, without a cast per call).

Rows that share a prompt (a GRPO group's G completions) run it once, packed into one sequence
(flowtracer.model.prefix; `share_prefix`), in every pass, with or without a graph: the same
log-probs, entropies, map and gradients up to float rounding, for a fraction of the tokens.

An arm that reads only the map (FlowCredit, AttentionCredit) asks for `token_stats=False`: then no
log-prob or entropy is projected, and the forward stops right after the attention of the last
captured layer (its MLP, the layers above it and the vocabulary head cannot change the map).

Lightning-free (floor 2): the GRPO module, the credit weights API and the TRL adapter share it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from flowtracer.model import kernels, prefix
from flowtracer.model.capture import BACKENDS, MAX_CHUNK_BYTES, auto_budget, capture_attention, unwrap
from flowtracer.model.casts import autocast_linears
from flowtracer.model.layers import resolve_layers


def logprob_temperature(sampling_temperature: float) -> float:
    """The temperature log-probs are taken at: the sampling temperature, or 1 for greedy (T = 0)."""
    return float(sampling_temperature) if sampling_temperature > 0 else 1.0


@dataclass
class TeacherForcedOutput:
    """What one teacher-forced pass returns (all (B, T) / (B, T, T) float32, zero where undefined)."""

    logprobs: torch.Tensor | None  # None with token_stats=False
    entropy: torch.Tensor | None
    attn: torch.Tensor | None
    layers: tuple[int, ...] | None = None
    attn_seconds: float = 0.0  # of the forward's wall time, the part spent recomputing the map


def teacher_forced_pass(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    capture_layers: str | Sequence[int] | None = "middle",
    capture_heads: str = "mean",
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_grad: bool = False,
    attn_chunk_bytes: int | None = None,
    logits_chunk_bytes: int | None = None,
    backend: str = "auto",
    stats_mask: torch.Tensor | None = None,
    token_stats: bool = True,
    stop_early: bool = True,
    entropy_grad: bool = False,
    share_prefix: bool = True,
) -> TeacherForcedOutput:
    """One teacher-forced forward over prompt+response: log-probs, entropies and the attention map.

    Args:
        model: a transformers causal LM (or a peft wrapper of one), any dtype/device.
        input_ids: (B, T) token ids; prompts may be left-padded and responses right-padded.
        attention_mask: (B, T) 1 for real tokens, 0 for padding (default: all ones).
        capture_layers: "middle" (default), "early", "late", "all", a list of layer indices, or None
            to skip the attention map.
        capture_heads: "mean" (default, the paper's) or "max": how each layer's query heads are
            aggregated into the map (flowtracer.model.capture).
        position_ids: default ``cumsum(attention_mask) - 1`` (what ``generate`` uses), so a padded
            row sees the same positions as its unpadded sequence.
        temperature: logits are divided by it before log-softmax (match the sampling temperature).
        with_grad: keep the autograd graph for the log-probs (the map is always a detached
            statistic, and so are the entropies unless `entropy_grad`).
        attn_chunk_bytes / logits_chunk_bytes: memory budgets of the chunked recompute and of the
            chunked vocabulary projection (full-vocabulary logits are never materialised at once);
            default 1/4 and 1/2 of what (B, T, vocab) logits would take, each at most 256 MiB
            (with_grad: 256 MiB). With grad and more than one chunk, each chunk's logits are
            recomputed in the backward (activation checkpointing), so the budget also bounds what
            the autograd graph keeps.
        stats_mask: (B, T) bool, the positions whose log-prob/entropy are wanted (e.g. the response
            tokens); the others stay 0 and cost nothing. Default: every token with a real predecessor.
        backend: "auto" (fused Triton kernels for the map and the token statistics on CUDA in
            bf16/fp16, torch elsewhere), "torch" or "triton".
        token_stats: False = the map only (no log-probs or entropies, which are then None): the
            forward stops after the last captured layer. Needs capture_layers and no grad.
        stop_early: with token_stats=False, stop after the last captured layer (an exception raised
            by a hook); False runs every layer (same map), for wrappers that must see each forward
            end (DeepSpeed ZeRO-3, FSDP).
        entropy_grad: with `with_grad`, the entropies keep their graph too (an entropy bonus in the
            loss, `loss.entropy_coef`); the backward then also differentiates -sum p log p.
        share_prefix: consecutive rows that share a prefix (a prompt's G completions) run it once,
            packed into one row (flowtracer.model.prefix), where the model's layers take one packed
            mask and it saves a quarter of the tokens or more; the same outputs and gradients up to
            float rounding. False: the padded (B, T) forward.

    Returns:
        TeacherForcedOutput with ``logprobs[b, t] = log p(input_ids[b, t] | tokens < t)`` and
        ``entropy[b, t]`` of that predictive distribution (0 where t is the first real token or
        padding), and ``attn`` (B, T, T) or None.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid = attention_mask.bool()
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    if not token_stats and (capture_layers is None or with_grad):
        raise ValueError("token_stats=False computes only the attention map: pass capture_layers and with_grad=False")
    lm = unwrap(model)
    packs = prefix.plan_packs(input_ids, attention_mask, position_ids) if share_prefix and prefix.packable(lm) else None
    capture = (None if capture_layers is None else
               dict(layers=capture_layers, chunk_bytes=attn_chunk_bytes, backend=backend, heads=capture_heads))
    if not token_stats:
        return _map_only(model, lm, input_ids, attention_mask, position_ids, capture, stop_early, packs)
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (lm_head); a causal LM is required")
    with torch.enable_grad() if with_grad else torch.no_grad(), autocast_linears(model):
        ran = _run(model, input_ids, attention_mask, position_ids, packs, capture,
                   lambda ids, mask, pos: _last_hidden(model, lm, ids, mask, pos))
        stats_backend = "torch" if with_grad else backend  # the kernel has no backward
        wanted = valid if stats_mask is None else valid & stats_mask.bool()
        logprobs, entropy = _token_stats(
            lm, head, ran.hidden, input_ids, valid, temperature, logits_chunk_bytes, stats_backend, wanted=wanted,
            entropy_grad=with_grad and entropy_grad)
        _check_head(lm, head, *ran.last)
    return TeacherForcedOutput(logprobs=logprobs, entropy=entropy, attn=ran.attn, layers=ran.layers,
                               attn_seconds=ran.seconds)


@dataclass
class _Ran:
    """What the decoder runs gave: hidden states (B, T, d) in the padded layout (None for the map
    alone), the map (B, T, T) or None, and one (last hidden state, the model's last logits) pair."""

    hidden: torch.Tensor | None
    attn: torch.Tensor | None
    layers: tuple[int, ...] | None
    seconds: float
    last: tuple[torch.Tensor, torch.Tensor] | None


def _run(model, input_ids, attention_mask, position_ids, packs, capture: dict | None, call) -> _Ran:
    """`call(ids, mask, position_ids) -> (hidden, last logits) | None` once on the padded batch, or once per
    pack of rows sharing a prompt (flowtracer.model.prefix), with the map captured if `capture`; the packs'
    hidden states and maps are read back into the padded (B, T) layout (hidden states by a gather, which
    keeps their graph: the backward sums each row's gradient into the prompt they share)."""

    def one(ids, mask, pos, valid):
        ctx = capture_attention(model, attention_mask=valid, **capture) if capture else contextlib.nullcontext()
        with ctx as captured:
            out = call(ids, mask, pos)
        return out, captured

    if packs is None:
        out, captured = one(input_ids, attention_mask, position_ids, attention_mask)
        hidden, last = (out[0], (out[0][:, -1], out[1])) if out is not None else (None, None)
        if captured is None:
            return _Ran(hidden, None, None, 0.0, last)
        return _Ran(hidden, captured.attn, captured.layers, captured.seconds, last)
    B, T = input_ids.shape
    attn = torch.zeros(B, T, T, dtype=torch.float32, device=input_ids.device) if capture else None
    parts, gather, offset, layers, seconds, last = [], None, 0, None, 0.0, None
    for pack in packs:
        ids, mask4d, pos, index = prefix.pack_inputs(pack, input_ids.device)
        out, captured = one(ids, mask4d, pos, None)
        if captured is not None:
            prefix.unpack_map(pack, captured.attn, index, attention_mask, attn)
            layers, seconds = captured.layers, seconds + captured.seconds
        if out is not None:
            parts.append(out[0][0])
            gather = prefix.gather_index(pack, index, attention_mask, offset, gather)
            offset += ids.shape[1]
            last = last or (out[0][:, -1], out[1])
    hidden = None
    if parts:  # padding (and any unpacked all-padding row) reads a zero row
        parts.append(parts[0].new_zeros(1, parts[0].shape[-1]))
        hidden = torch.cat(parts)[gather.masked_fill(gather < 0, offset)]
    return _Ran(hidden, attn, layers, seconds, last)


class _StopForward(Exception):
    """Raised by a hook after the last layer the map needs; caught by `_map_only`."""


@torch.no_grad()
def _map_only(model, lm, input_ids, attention_mask, position_ids, capture: dict, stop_early: bool,
              packs) -> TeacherForcedOutput:
    """The attention map alone: the decoder runs up to the attention of the last captured layer, then
    stops (no later layer, no MLP of that one, no vocabulary head); rows that share a prompt run it
    once (`packs`). Decoders without a `layers` list (no place to stop) run to the end; the map is the same.
    """
    stack = getattr(_decoder(lm), "layers", None)
    stop_at = None
    if stop_early and isinstance(stack, torch.nn.ModuleList):
        last = resolve_layers(capture["layers"], len(stack))[-1]
        # the attention module of that layer (what the capture reads), else the layer itself
        stop_at = next((m for m in stack[last].modules()
                        if getattr(m, "layer_idx", None) == last and hasattr(m, "config")), stack[last])

    def stop(_module, _args, _output):
        raise _StopForward

    def call(ids, mask, pos):
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
        except _StopForward:
            pass

    handle = stop_at.register_forward_hook(stop) if stop_at is not None else None
    try:
        ran = _run(model, input_ids, attention_mask, position_ids, packs, capture, call)
    finally:
        if handle is not None:
            handle.remove()
    return TeacherForcedOutput(logprobs=None, entropy=None, attn=ran.attn, layers=ran.layers, attn_seconds=ran.seconds)


def _decoder(lm):
    return lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, lm.base_model_prefix)


def _last_hidden(model, lm, input_ids, attention_mask, position_ids):
    """(the decoder's final hidden states (B, T, d), the model's own logits of the last position).

    logits_to_keep=1: the model's head runs on the last position only (checked against ours);
    the chunked projection does the rest without a (B, T, vocab) tensor.
    """
    decoder = _decoder(lm)
    hidden: list[torch.Tensor] = []

    def grab(_module, _args, output):
        hidden.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(grab)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(hidden) != 1:
        raise RuntimeError(f"{type(lm).__name__}: expected one decoder call in the forward, saw {len(hidden)}")
    return hidden[0], out.logits[:, -1]


def _project(lm, head, h: torch.Tensor) -> torch.Tensor:
    logits = head(h)
    cap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _token_stats(lm, head, h, input_ids, valid, temperature, chunk_bytes, backend="torch", wanted=None,
                 entropy_grad=False):
    """Log-prob of each realised token and entropy of its predictive distribution, chunked over positions.

    Only positions in `wanted` (default `valid`) are projected. Under autograd (h requires grad) the
    log-probs keep their graph and the entropies do not (unless `entropy_grad`); when the positions span more than one
    chunk, every chunk runs under activation checkpointing, so no more than one chunk of logits
    (and of saved log-softmax output) is alive at a time, in the forward and in the backward.
    """
    B, T = input_ids.shape
    logprobs = torch.zeros(B, T, dtype=torch.float32, device=h.device)
    entropy = torch.zeros(B, T, dtype=torch.float32, device=h.device)
    # Token t is predicted from position t-1; defined only when both are real tokens.
    target = torch.zeros_like(valid)
    target[:, 1:] = valid[:, 1:] & valid[:, :-1]
    if wanted is not None:
        target &= wanted.bool()
    b_idx, t_idx = target.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return logprobs, entropy
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    grad = torch.is_grad_enabled() and h.requires_grad
    if chunk_bytes is None:
        chunk_bytes = MAX_CHUNK_BYTES if grad else auto_budget(B * T * vocab * h.element_size() / 2)
    fused = not grad and kernels.use_triton(backend, h, need_dot=False)
    # Per row: the logits, plus (torch path) float32 log-probs and probabilities; the probabilities
    # reuse the logits' buffer when that is float32 already (never under autograd).
    extra = 0 if fused else (4 if h.dtype == torch.float32 and not grad else 8)
    rows = max(1, int(chunk_bytes) // (vocab * (h.element_size() + extra)))
    tokens = input_ids[b_idx, t_idx]
    checkpointed = grad and b_idx.numel() > rows
    lp_parts, ent_parts = [], []
    for s in range(0, b_idx.numel(), rows):
        hb = h[b_idx[s : s + rows], t_idx[s : s + rows] - 1]
        tok = tokens[s : s + rows]
        if fused:
            try:
                lp, ent = kernels.token_stats(_project(lm, head, hb), tok, 1.0 / temperature)
                lp_parts.append(lp)
                ent_parts.append(ent)
                continue
            except Exception as exc:  # noqa: BLE001 - fall back to torch, loudly, once
                if backend == "triton":
                    raise
                kernels.disable_triton(exc)
                fused = False
        if checkpointed:
            # The backward recomputes this chunk's logits instead of keeping them (the memory budget).
            lp, ent = torch.utils.checkpoint.checkpoint(
                _chunk_stats, lm, head, hb, tok, temperature, entropy_grad, use_reentrant=False)
        else:
            lp, ent = _chunk_stats(lm, head, hb, tok, temperature, entropy_grad)
        lp_parts.append(lp)
        ent_parts.append(ent)
    logprobs = logprobs.index_put((b_idx, t_idx), torch.cat(lp_parts))
    entropy = entropy.index_put((b_idx, t_idx), torch.cat(ent_parts))
    return logprobs, entropy


def _chunk_stats(lm, head, hb, tokens, temperature, entropy_grad=False):
    """(log p(token), entropy) for one chunk of hidden states; only the log-probs carry a graph
    (and the entropies with `entropy_grad`)."""
    logits = _project(lm, head, hb).float()  # a no-op in float32; under autocast the bf16 logits upcast
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, tokens[:, None]).squeeze(-1)
    if entropy_grad and logp.requires_grad:
        with torch.autocast(hb.device.type, enabled=False):
            return lp, -(logp.exp() * logp).sum(-1)
    with torch.no_grad(), torch.autocast(hb.device.type, enabled=False):
        reuse = logits.dtype == torch.float32 and not (logits.requires_grad or logp.requires_grad)
        logp = logp.detach()
        probs = torch.exp(logp, out=logits) if reuse else logp.exp()
        del logits
        # H = -sum p log p, as a batched dot product (no extra (rows, vocab) temporary).
        ent = -torch.bmm(probs.unsqueeze(1), logp.unsqueeze(2)).view(-1)
    return lp, ent


def _check_head(lm, head, h_last: torch.Tensor, model_logits: torch.Tensor) -> None:
    """Refuse models whose forward transforms logits in a way the chunked projection does not replicate."""
    with torch.no_grad():
        ours = _project(lm, head, h_last[:, None]).squeeze(1).float()
        theirs = model_logits.float()
        tol = 1e-2 * (1.0 + theirs.abs().max())
        if ours.shape != theirs.shape or (ours - theirs).abs().max() > tol:
            raise ValueError(
                f"{type(lm).__name__}: the model's logits differ from lm_head(hidden states); flowtracer "
                "cannot compute log-probs for this model class"
            )
