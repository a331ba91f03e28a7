"""Head- and layer-averaged attention maps from a Hugging Face causal LM, without `output_attentions`.

FlowTracer needs, for every rollout, ``attn[b, q, k]``: the attention query token ``q`` pays to key
token ``k``, averaged over all query heads and a range of layers (METHOD.md). transformers only
returns attention from its eager path, which keeps every head of every layer (24 GiB for two
4096-token sequences of a 1.5B model). This module gets the same average inside one ordinary fast
forward:

* A wrapper is registered in transformers' ``AttentionInterface`` (and the matching mask builder in
  ``AttentionMaskInterface``) under ``flowtracer_<base>``; for the duration of a capture the model's
  ``config._attn_implementation`` points at it. Every layer's real output still comes from the fast
  kernel (``sdpa``, or ``flash_attention_*`` where installed; eager/other models get ``sdpa``).
* For the selected layers only, the wrapper recomputes ``softmax(q k^T * scaling + mask)`` from the
  post-RoPE ``q`` and ``k`` it was handed, in chunks of query rows, sums it over all query heads
  (GQA: each key/value head serves a group of query heads, never materialised with ``repeat_kv``)
  and adds it into one float32 ``(B, T, T)`` buffer. Per chunk only the causally reachable key
  range is computed and the mask is applied only to the columns where it masks something, so the
  cost is about half of a dense ``T x T`` recompute.
* On CUDA in bf16/fp16 (``backend="auto"``) two fused Triton kernels replace that loop: per-row
  log-sum-exp per head, then per (query tile, key tile) the head sum of ``exp(s - lse)`` added into
  the buffer, skipping unreachable tiles; a third reads each chunk of logits once for the log-probs
  and entropies. The torch path (always used on CPU) is the exact reference they are tested against.
* Padded query rows and key columns are exactly zero; the valid block equals the map of the
  unpadded sequence.

Public API::

    from flowtracer.attention import teacher_forced_pass, capture_attention
    out = teacher_forced_pass(model, input_ids, attention_mask, capture_layers="middle")
    out.logprobs  # (B, T) float32, log p(token t | tokens < t); 0 at t = 0 and at padding
    out.entropy   # (B, T) float32, entropy of the distribution that predicted token t; 0 likewise
    out.attn      # (B, T, T) float32 averaged map, or None when capture_layers is None

    with capture_attention(model, "middle", attention_mask=mask) as cap:   # e.g. a training forward
        loss = policy_loss(model(input_ids, attention_mask=mask, ...))
    cap.attn                                                                # detached (B, T, T)

Supported: decoders that call transformers' standard attention interface (Llama/SmolLM2,
Qwen2/2.5, Qwen3, Mistral with sliding windows, and others of that family), plain or wrapped by
peft (LoRA). Precisions: any; the torch path multiplies q k^T in the model's dtype (as eager does),
the Triton path accumulates it in float32; softmax and sums are always float32. A model whose
selected layers never reach the wrapper gets one error naming its class, never a silent wrong map.

This file imports only torch, transformers (and numpy), plus triton when it is installed; no
Lightning (the GPU benchmark relies on that).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from flowtracer.layers import LAYER_PRESETS, resolve_layers

try:  # optional fused kernels on CUDA; ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path does everything
    triton = None

__all__ = [
    "LAYER_PRESETS",
    "AttentionCapture",
    "TeacherForcedOutput",
    "capture_attention",
    "resolve_layers",
    "teacher_forced_pass",
]

BACKENDS = ("auto", "torch", "triton")
# Working-memory budgets of the chunked loops. Left as None they are 1/4 (attention) and 1/2
# (vocabulary) of the (B, T, vocab) logits a plain forward materialises, clamped to [MIN, MAX]; the
# two loops never overlap, so the pass needs less memory than the plain forward it replaces. (Few,
# large vocabulary chunks keep the lm_head GEMM efficient on CPU.)
MAX_CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_BYTES = 4 * 2**20
_PREFIX = "flowtracer_"
_STATE_ATTR = "_flowtracer_capture"


# --------------------------------------------------------------------------- model plumbing
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers PreTrainedModel inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def _num_layers(lm: torch.nn.Module) -> int:
    config = getattr(lm, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(
            f"{type(lm).__name__} is not supported by flowtracer.attention: its config has no num_hidden_layers "
            "(expected a transformers causal LM)"
        )
    return n


def _vocab_size(lm: torch.nn.Module) -> int | None:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _configs(lm: torch.nn.Module) -> list:
    """Every distinct config object held by the model's modules (the attention layers read their own)."""
    seen: dict[int, object] = {}
    for module in lm.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


_FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def _capture_impl_for(base: str | None) -> str:
    """Register (once) and return the capture implementation name wrapping ``base``.

    Flash kernels keep flash (their masks are 2D and the kernel is picked by name); everything else
    (sdpa, eager, None) runs on sdpa, which computes the same function as eager.
    """
    if base is not None and base.startswith(_PREFIX):
        raise RuntimeError("an attention capture is already active on this model (nested captures are not supported)")
    base = base if base in _FLASH else "sdpa"
    name = _PREFIX + base
    if name not in AttentionInterface._global_mapping:
        if base == "sdpa":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward as fast_fn

            mask_fn = sdpa_mask
        else:
            from transformers.integrations.flash_attention import flash_attention_forward as fast_fn
            from transformers.masking_utils import flash_attention_mask as mask_fn
        AttentionInterface.register(name, _make_wrapper(fast_fn, base))
        AttentionMaskInterface.register(name, mask_fn)
    return name


def _make_wrapper(fast_fn, base: str):
    """Attention function: the fast kernel's output, plus a capture side effect on selected layers."""
    needs_name = base in _FLASH

    def flowtracer_attention(module, query, key, value, attention_mask, **kwargs):
        if needs_name:
            # The flash integration picks its kernel from module.config._attn_implementation; show it
            # the real name for this call only (the attribute the property setter writes).
            cfg = module.config
            saved = cfg._attn_implementation_internal
            cfg._attn_implementation_internal = base
            try:
                out = fast_fn(module, query, key, value, attention_mask, **kwargs)
            finally:
                cfg._attn_implementation_internal = saved
        else:
            out = fast_fn(module, query, key, value, attention_mask, **kwargs)
        state = module.__dict__.get(_STATE_ATTR)
        if state is not None:
            state.observe(module, query, key, attention_mask, kwargs)
        return out

    flowtracer_attention.__name__ = f"flowtracer_{base}_attention"
    return flowtracer_attention


# --------------------------------------------------------------------------- the capture
class AttentionCapture:
    """Accumulates the head- and layer-averaged attention map during one forward.

    Created by :func:`capture_attention`. After the ``with`` block, ``attn`` is the float32
    ``(B, T, T)`` map (detached), ``layers`` the captured layer indices. Each selected layer is
    captured at most once per context, so a gradient-checkpointing recompute inside the context
    adds nothing twice; run one forward per context.
    """

    def __init__(
        self, layers: list[int], model_name: str, attention_mask: torch.Tensor | None,
        chunk_bytes: int | None, vocab_size: int | None = None, backend: str = "auto",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        self.backend = backend
        self.layers = tuple(layers)
        self.model_name = model_name
        self.chunk_bytes = chunk_bytes
        self.vocab_size = vocab_size
        self.valid = attention_mask.bool() if attention_mask is not None else None
        self.attn: torch.Tensor | None = None
        self._selected = frozenset(layers)
        self._seen: set[int] = set()
        self._masks: list[tuple[object, int | None, bool, torch.Tensor, dict]] = []
        self.seconds = 0.0  # wall time spent recomputing the map (host-side; CUDA work is async)

    # ---------------------------------------------------------------- called by the wrapper
    def observe(self, module, query, key, attention_mask, kwargs) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer not in self._selected or layer in self._seen:
            return
        for unsupported in ("s_aux", "position_bias"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(
                    f"{self.model_name}: attention with `{unsupported}` is not supported by flowtracer.attention "
                    "(the recomputed map would ignore it)"
                )
        self._seen.add(layer)
        t0 = time.perf_counter()
        with torch.no_grad():  # the map is a detached statistic: nothing enters the autograd graph
            self._accumulate(module, query.detach(), key.detach(), attention_mask, kwargs)
        self.seconds += time.perf_counter() - t0

    def _accumulate(self, module, q, k, attention_mask, kwargs) -> None:
        B, H, T, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        if Tk != T:
            raise ValueError(
                f"{self.model_name}: attention capture needs a full teacher-forced forward without a KV cache "
                f"(got {T} queries against {Tk} keys)"
            )
        if H % Hkv:
            raise ValueError(f"{self.model_name}: {H} query heads are not a multiple of {Hkv} key/value heads")
        G = H // Hkv
        if self.attn is None:
            self.attn = torch.zeros(B, T, T, dtype=torch.float32, device=q.device)
        elif self.attn.shape != (B, T, T):
            raise RuntimeError(
                f"one capture context saw two forwards of different shapes {tuple(self.attn.shape)} and {(B, T, T)}; "
                "use one context per forward"
            )
        scaling = kwargs.get("scaling")
        scaling = D**-0.5 if scaling is None else float(scaling)
        softcap = kwargs.get("softcap")
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        allowed, plans = self._mask(attention_mask, kwargs.get("sliding_window"), is_causal, B, T, q.device)
        weight = 1.0 / (H * len(self.layers))
        if softcap is None and _use_triton(self.backend, q):
            try:
                return self._accumulate_triton(q, k, allowed, plans, scaling, weight)
            except Exception as exc:  # noqa: BLE001 - an unusable Triton install must not break the RL step
                if self.backend == "triton":
                    raise
                _disable_triton(exc)

        # Query rows per chunk so that the (B, H, rows, T) scores plus float32 probabilities fit the budget.
        budget = self.chunk_bytes
        if budget is None:
            budget = _auto_budget(B * T * (self.vocab_size or 0) * q.element_size() / 4)
        per_row = B * H * T * (q.element_size() + 4)
        rows = max(1, min(T, int(budget) // per_row))
        if rows >= 16:
            rows -= rows % 16
        plan = plans.get(rows)
        if plan is None:
            plan = plans[rows] = _chunk_plan(allowed, self.valid, rows, T)

        k = k.contiguous()
        fill = torch.finfo(q.dtype).min  # finite: a fully masked (padded) row stays NaN-free
        for s, e, k0, k1, segments in plan:
            c = e - s
            # (B, H, c, D) -> (B, Hkv, G*c, D): query head h = j*G + g reads key/value head j.
            qc = (q[:, :, s:e] * scaling).reshape(B, Hkv, G * c, D)
            scores = torch.matmul(qc, k[:, :, k0:k1].transpose(-1, -2))
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            scores = scores.view(B, Hkv, G, c, k1 - k0)
            for u, v in segments:  # only the columns where the mask masks something
                block = allowed[:, :, s:e, u:v].unsqueeze(2)  # (Bm, 1, 1, c, v-u), broadcast over heads
                scores[..., u - k0 : v - k0].masked_fill_(~block, fill)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
            del scores
            self.attn[:, s:e, k0:k1].add_(probs.sum(dim=(1, 2)), alpha=weight)
            del probs

    def _accumulate_triton(self, q, k, allowed, plans, scaling, weight) -> None:
        """Fused path: per-row log-sum-exp per head, then per (query, key) tile the head sum of exp(s - lse)."""
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        bm = bn = _TRITON_BLOCK
        key = ("triton", bm)
        if key not in plans:
            # Key range per block of query rows, from the same plan as the torch path.
            n_q = triton.cdiv(T, bm)
            lo, hi = np.zeros(n_q, np.int32), np.zeros(n_q, np.int32)
            for s, _e, k0, k1, _segs in _chunk_plan(allowed, self.valid, bm, T):
                lo[s // bm], hi[s // bm] = k0, k1
            plans[key] = (torch.from_numpy(lo).to(q.device), torch.from_numpy(hi).to(q.device))
        klo, khi = plans[key]
        mask = allowed.view(torch.uint8)  # same itemsize; Triton loads it as bytes
        smb = mask.stride(0) if mask.shape[0] > 1 else 0
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        bd = max(16, triton.next_power_of_2(D))
        n_q = triton.cdiv(T, bm)
        strides = (*q.stride(), *k.stride(), smb, mask.stride(2), mask.stride(3))
        _lse_kernel[(n_q, B * H)](
            q, k, mask, lse, klo, khi, *strides, T, H, H // Hkv, D, scaling,
            BM=bm, BN=bn, BD=bd, num_warps=4, num_stages=2,
        )
        out = self.attn
        _accum_kernel[(n_q, triton.cdiv(T, bn), B)](
            q, k, mask, lse, klo, khi, out, *strides, *out.stride(), T, H, Hkv, H // Hkv, D, scaling, weight,
            BM=bm, BN=bn, BD=bd, num_warps=4, num_stages=2,
        )

    def _mask(self, attention_mask, sliding_window, is_causal, B, T, device):
        """The boolean (Bm, 1, T, T) mask this layer used, built once per distinct mask per forward."""
        for obj, window, causal, allowed, plans in self._masks:
            if obj is attention_mask and window == sliding_window and causal == is_causal:
                return allowed, plans
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            allowed = attention_mask
            if allowed.dtype != torch.bool:
                # An additive mask: 0 = attend, very negative = masked; other values would be a bias
                # that this recompute does not model, so refuse rather than drop it silently.
                masked = allowed <= torch.finfo(allowed.dtype).min / 2
                if not bool(((allowed == 0) | masked).all()):
                    raise ValueError(f"{self.model_name}: additive attention biases are not supported by flowtracer.attention")
                allowed = ~masked
        else:
            # sdpa's is_causal shortcut (mask None) or a flash 2D padding mask: build causal (+ window).
            idx = torch.arange(T, device=device)
            allowed = (idx[None, :] <= idx[:, None]) if is_causal else torch.ones(T, T, dtype=torch.bool, device=device)
            if sliding_window is not None:
                allowed = allowed & (idx[None, :] > idx[:, None] - int(sliding_window))
            allowed = allowed[None, None]
            if isinstance(attention_mask, torch.Tensor):  # (B, T) padding mask
                allowed = allowed & attention_mask.bool()[:, None, None, :]
        if self.valid is None:
            # No padding mask given: a token is valid iff it may attend to itself (padding masks
            # act on key columns, so a padded token's own diagonal entry is masked).
            self.valid = allowed[:, 0].diagonal(dim1=-2, dim2=-1).expand(B, T).clone()
        entry = (attention_mask, sliding_window, is_causal, allowed, {})
        self._masks.append(entry)  # keeps the mask object alive, so `is` comparisons stay sound
        return allowed, entry[4]

    # ---------------------------------------------------------------- called on context exit
    def finalize(self) -> None:
        missing = sorted(self._selected - self._seen)
        if missing:
            raise RuntimeError(
                f"flowtracer.attention could not capture attention from {self.model_name}: layers {missing} never "
                "called transformers' attention interface (ALL_ATTENTION_FUNCTIONS) during the forward. This model "
                "class is not supported (it needs the standard `attention_interface(self, query, key, value, "
                "attention_mask, ...)` call with `layer_idx` on its attention modules), or no forward ran."
            )
        if self.valid is not None:
            pair = self.valid[:, :, None] & self.valid[:, None, :]
            self.attn.masked_fill_(~pair, 0.0)  # padded rows/columns exactly zero (also clears NaN)
        self._masks.clear()


def _chunk_plan(allowed: torch.Tensor, valid: torch.Tensor | None, rows: int, T: int):
    """Per chunk of query rows: the key range to compute and the column segments to mask.

    Keys no valid row of the chunk may see are skipped (causality, sliding windows, common left
    padding); inside the key range, the longest run of columns every valid row may see needs no
    masking. One device-to-host copy per distinct mask and chunk size.
    """
    anys, alls = [], []
    for s in range(0, T, rows):
        a = allowed[:, 0, s : s + rows]  # (Bm, c, T)
        if valid is not None:
            v = valid[:, s : s + rows, None]  # padded query rows are zeroed later: ignore them here
            anys.append((a & v).any(dim=1).any(dim=0))
            alls.append((a | ~v).all(dim=1).all(dim=0))
        else:
            anys.append(a.any(dim=1).any(dim=0))
            alls.append(a.all(dim=1).all(dim=0))
    anys = torch.stack(anys).cpu().numpy()
    alls = torch.stack(alls).cpu().numpy()
    plan = []
    for i, s in enumerate(range(0, T, rows)):
        cols = np.flatnonzero(anys[i])
        if cols.size == 0:
            continue  # only padded rows: nothing to capture
        k0, k1 = int(cols[0]), int(cols[-1]) + 1
        a, b = _longest_run(alls[i][k0:k1])
        a, b = a + k0, b + k0
        segments = [(u, v) for u, v in ((k0, a), (b, k1)) if v > u]
        plan.append((s, min(s + rows, T), k0, k1, segments))
    return plan


def _auto_budget(nbytes: float) -> int:
    return int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, nbytes)))


def _longest_run(flags: np.ndarray) -> tuple[int, int]:
    """[start, end) of the longest run of True in a 1-D bool array ((0, 0) if none)."""
    if not flags.any():
        return 0, 0
    padded = np.concatenate(([0], flags.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    i = int(np.argmax(ends - starts))
    return int(starts[i]), int(ends[i])


@contextlib.contextmanager
def capture_attention(
    model: torch.nn.Module,
    layers: str | Sequence[int] = "middle",
    *,
    attention_mask: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
    backend: str = "auto",
) -> Iterator[AttentionCapture]:
    """Capture the averaged attention map of the selected layers during one forward of ``model``.

    Works under autograd too (e.g. inside a training forward): the recompute runs under
    ``no_grad`` on detached q/k, so it adds nothing to the graph, and each layer is captured once
    per context, so gradient-checkpointing recomputes are ignored. The model's attention
    implementation is switched for the duration of the block and restored afterwards, even on
    error. ``attention_mask`` (B, T) marks the valid tokens whose rows/columns are kept (without it,
    validity is read off the mask the model builds). ``chunk_bytes`` bounds the per-chunk temporary
    (default: a quarter of what (B, T, vocab) logits would take, at most 256 MiB). ``backend``:
    "torch" (chunked matmul + softmax), "triton" (fused kernels, CUDA bf16/fp16) or "auto" (Triton
    where it applies, else torch).
    """
    lm = _unwrap(model)
    name = type(lm).__name__
    selected = resolve_layers(layers, _num_layers(lm))
    capture = AttentionCapture(selected, name, attention_mask, chunk_bytes, _vocab_size(lm), backend)

    attn_modules = [m for m in lm.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")]
    if not any(m.layer_idx in capture._selected for m in attn_modules):
        raise RuntimeError(
            f"flowtracer.attention does not support {name}: no attention module with a `layer_idx` for layers "
            f"{selected} (the model lacks transformers' attention-interface plumbing)"
        )
    configs = _configs(lm)
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    try:
        for cfg, old in saved:
            # The internal attribute, not the property: the setter would overwrite sub-configs too.
            cfg._attn_implementation_internal = _capture_impl_for(old)
        for m in attn_modules:
            m.__dict__[_STATE_ATTR] = capture
        yield capture
        capture.finalize()
    finally:
        for m in attn_modules:
            m.__dict__.pop(_STATE_ATTR, None)
        for cfg, old in saved:
            cfg._attn_implementation_internal = old


# --------------------------------------------------------------------------- teacher-forced pass
@dataclass
class TeacherForcedOutput:
    """What one teacher-forced pass returns (all (B, T) / (B, T, T) float32, zero where undefined)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    attn: torch.Tensor | None
    layers: tuple[int, ...] | None = None
    attn_seconds: float = 0.0  # of the forward's wall time, the part spent recomputing the map


def teacher_forced_pass(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    capture_layers: str | Sequence[int] | None = "middle",
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_grad: bool = False,
    attn_chunk_bytes: int | None = None,
    logits_chunk_bytes: int | None = None,
    backend: str = "auto",
    stats_mask: torch.Tensor | None = None,
) -> TeacherForcedOutput:
    """One teacher-forced forward over prompt+response: log-probs, entropies and the attention map.

    Args:
        model: a transformers causal LM (or a peft wrapper of one), any dtype/device.
        input_ids: (B, T) token ids; prompts may be left-padded and responses right-padded.
        attention_mask: (B, T) 1 for real tokens, 0 for padding (default: all ones).
        capture_layers: "middle" (default), "early", "late", "all", a list of layer indices, or None
            to skip the attention map.
        position_ids: default ``cumsum(attention_mask) - 1`` (what ``generate`` uses), so a padded
            row sees the same positions as its unpadded sequence.
        temperature: logits are divided by it before log-softmax (match the sampling temperature).
        with_grad: keep the autograd graph for the log-probs (entropies and the map are always
            detached statistics).
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

    Returns:
        TeacherForcedOutput with ``logprobs[b, t] = log p(input_ids[b, t] | tokens < t)`` and
        ``entropy[b, t]`` of that predictive distribution (0 where t is the first real token or
        padding), and ``attn`` (B, T, T) or None.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid = attention_mask.bool()
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    lm = _unwrap(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, lm.base_model_prefix)
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (lm_head); a causal LM is required")

    hidden: list[torch.Tensor] = []

    def grab(_module, _args, output):
        hidden.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    captured = None
    handle = decoder.register_forward_hook(grab)
    grad_ctx = torch.enable_grad() if with_grad else torch.no_grad()
    try:
        with grad_ctx:
            capture_ctx = (
                capture_attention(
                    model, capture_layers, attention_mask=attention_mask, chunk_bytes=attn_chunk_bytes, backend=backend
                )
                if capture_layers is not None
                else contextlib.nullcontext()
            )
            with capture_ctx as captured:
                # logits_to_keep=1: the model's own head runs on the last position only (a check below);
                # our chunked projection does the rest without a (B, T, vocab) tensor.
                out = model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=1,
                )
            if len(hidden) != 1:
                raise RuntimeError(f"{type(lm).__name__}: expected one decoder call in the forward, saw {len(hidden)}")
            h = hidden[0]
            stats_backend = "torch" if with_grad else backend  # the kernel has no backward
            wanted = valid if stats_mask is None else valid & stats_mask.bool()
            logprobs, entropy = _token_stats(
                lm, head, h, input_ids, valid, temperature, logits_chunk_bytes, stats_backend, wanted=wanted)
            _check_head(lm, head, h[:, -1], out.logits[:, -1])
    finally:
        handle.remove()
    attn = captured.attn if captured is not None else None
    layers = captured.layers if captured is not None else None
    seconds = captured.seconds if captured is not None else 0.0
    return TeacherForcedOutput(logprobs=logprobs, entropy=entropy, attn=attn, layers=layers, attn_seconds=seconds)


def _project(lm, head, h: torch.Tensor) -> torch.Tensor:
    logits = head(h)
    cap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _token_stats(lm, head, h, input_ids, valid, temperature, chunk_bytes, backend="torch", wanted=None):
    """Log-prob of each realised token and entropy of its predictive distribution, chunked over positions.

    Only positions in `wanted` (default `valid`) are projected. Under autograd (h requires grad) the
    log-probs keep their graph and the entropies do not; when the positions span more than one
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
        chunk_bytes = MAX_CHUNK_BYTES if grad else _auto_budget(B * T * vocab * h.element_size() / 2)
    fused = not grad and _use_triton(backend, h, need_dot=False)
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
                lp, ent = _token_stats_triton(_project(lm, head, hb), tok, 1.0 / temperature)
                lp_parts.append(lp)
                ent_parts.append(ent)
                continue
            except Exception as exc:  # noqa: BLE001 - fall back to torch, loudly, once
                if backend == "triton":
                    raise
                _disable_triton(exc)
                fused = False
        if checkpointed:
            # The backward recomputes this chunk's logits instead of keeping them (the memory budget).
            lp, ent = torch.utils.checkpoint.checkpoint(
                _chunk_stats, lm, head, hb, tok, temperature, use_reentrant=False)
        else:
            lp, ent = _chunk_stats(lm, head, hb, tok, temperature)
        lp_parts.append(lp)
        ent_parts.append(ent)
    logprobs = logprobs.index_put((b_idx, t_idx), torch.cat(lp_parts))
    entropy = entropy.index_put((b_idx, t_idx), torch.cat(ent_parts))
    return logprobs, entropy


def _chunk_stats(lm, head, hb, tokens, temperature):
    """(log p(token), entropy) for one chunk of hidden states; only the log-probs carry a graph."""
    logits = _project(lm, head, hb)
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    lp = logp.gather(-1, tokens[:, None]).squeeze(-1)
    with torch.no_grad():
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
                f"{type(lm).__name__}: the model's logits differ from lm_head(hidden states); flowtracer.attention "
                "cannot compute log-probs for this model class"
            )


# --------------------------------------------------------------------------- fused Triton kernels
_TRITON_BLOCK = 64  # query rows x key columns per tile
_TRITON_OFF: list[str] = []  # set once a launch failed in "auto" mode


def _use_triton(backend: str, x: torch.Tensor, need_dot: bool = True) -> bool:
    """Whether the fused kernels apply: CUDA, half precision for the attention dots (tl.dot), sm80+."""
    if backend == "torch":
        return False
    ok = triton is not None and x.is_cuda and not _TRITON_OFF
    if ok and need_dot:
        ok = x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] >= 16
        ok = ok and torch.cuda.get_device_capability(x.device)[0] >= 8
    if backend == "triton" and not ok:
        raise ValueError(
            "backend='triton' needs triton, a CUDA sm80+ device and (for the map) bf16/fp16 q/k with head_dim >= 16"
        )
    return ok


def _disable_triton(exc: BaseException) -> None:
    _TRITON_OFF.append(repr(exc))
    warnings.warn(f"flowtracer.attention: Triton kernels failed ({exc!r}); using the torch path", stacklevel=3)


def _token_stats_triton(logits: torch.Tensor, tokens: torch.Tensor, inv_temp: float):
    n, vocab = logits.shape
    logits = logits.contiguous()
    lp = torch.empty(n, dtype=torch.float32, device=logits.device)
    ent = torch.empty(n, dtype=torch.float32, device=logits.device)
    _token_stats_kernel[(n,)](logits, logits.stride(0), tokens, lp, ent, vocab, inv_temp, BLOCK_V=4096, num_warps=8)
    return lp, ent


if triton is not None:

    @triton.jit
    def _token_stats_kernel(X, stride_x, TGT, LP, ENT, V, inv_temp, BLOCK_V: tl.constexpr):
        """One row of logits -> log p(target) and entropy, in one read (per-lane online softmax)."""
        row = tl.program_id(0).to(tl.int64)
        base = X + row * stride_x
        offs = tl.arange(0, BLOCK_V)
        m_v = tl.full([BLOCK_V], float("-inf"), tl.float32)  # running max per lane
        s_v = tl.zeros([BLOCK_V], tl.float32)  # sum exp(x - m)
        t_v = tl.zeros([BLOCK_V], tl.float32)  # sum exp(x - m) * (x - m): relative to m for precision
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m_v, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_v - m_safe)
            d = tl.where(m_v == float("-inf"), 0.0, m_v - m_safe)
            e = tl.exp(x - m_safe)
            t_v = alpha * (t_v + s_v * d) + tl.where(e > 0, e * (x - m_safe), 0.0)
            s_v = alpha * s_v + e
            m_v = m_new
        m = tl.max(m_v, 0)
        scale = tl.where(m_v == float("-inf"), 0.0, tl.exp(m_v - m))
        d = tl.where(m_v == float("-inf"), 0.0, m_v - m)
        s = tl.sum(scale * s_v, 0)
        t = tl.sum(scale * (t_v + s_v * d), 0)
        log_s = tl.log(s)
        xt = tl.load(base + tl.load(TGT + row)).to(tl.float32) * inv_temp
        tl.store(LP + row, xt - m - log_s)
        tl.store(ENT + row, log_s - t / s)  # H = log s - sum p (x - m)

    @triton.jit
    def _lse_kernel(
        Q, K, M, LSE, KLO, KHI,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd, smb, smq, smk,
        T, H, G, D, scale,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        """Pass 1: log-sum-exp of the masked scores of BM query rows of one (batch, head)."""
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        offs_m = qb * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
            mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0,
        )
        k_base = K + b * skb + (h // G) * skh
        m_base = M + b * smb
        klo = tl.load(KLO + qb)
        khi = tl.load(KHI + qb)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        for ks in range((klo // BN) * BN, khi, BN):
            offs_n = ks + tl.arange(0, BN)
            k = tl.load(
                k_base + offs_n[:, None] * skt + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0,
            )
            allowed = tl.load(
                m_base + offs_m[:, None] * smq + offs_n[None, :] * smk,
                mask=(offs_m[:, None] < T) & (offs_n[None, :] < T), other=0,
            ) != 0
            s = tl.where(allowed, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log(l_i), mask=offs_m < T)

    @triton.jit
    def _accum_kernel(
        Q, K, M, LSE, KLO, KHI, OUT,
        sqb, sqh, sqt, sqd, skb, skh, skt, skd, smb, smq, smk, sob, soq, sok,
        T, H, HKV, G, D, scale, weight,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        """Pass 2: OUT[b, q-tile, k-tile] += weight * sum over heads of exp(s - lse); skips unreachable tiles."""
        qb = tl.program_id(0)
        kb = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        klo = tl.load(KLO + qb)
        khi = tl.load(KHI + qb)
        ks = kb * BN
        if (ks + BN > klo) & (ks < khi):
            offs_m = qb * BM + tl.arange(0, BM)
            offs_n = ks + tl.arange(0, BN)
            offs_d = tl.arange(0, BD)
            in_q = offs_m < T
            tile = in_q[:, None] & (offs_n[None, :] < T)
            allowed = tl.load(M + b * smb + offs_m[:, None] * smq + offs_n[None, :] * smk, mask=tile, other=0) != 0
            acc = tl.zeros([BM, BN], tl.float32)
            for j in range(0, HKV):
                k = tl.load(
                    K + b * skb + j * skh + offs_n[:, None] * skt + offs_d[None, :] * skd,
                    mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0,
                )
                for g in range(0, G):
                    h = j * G + g
                    q = tl.load(
                        Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                        mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0,
                    )
                    lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=in_q, other=0.0)
                    s = tl.dot(q, tl.trans(k)) * scale
                    acc += tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
            ptrs = OUT + b * sob + offs_m[:, None] * soq + offs_n[None, :] * sok
            tl.store(ptrs, tl.load(ptrs, mask=tile, other=0.0) + acc * weight, mask=tile)
