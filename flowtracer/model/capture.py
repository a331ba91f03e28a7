"""Head- and layer-averaged attention maps from a Hugging Face causal LM, without `output_attentions`.

FlowTracer needs, for every rollout, ``attn[b, q, k]``: the attention query token ``q`` pays to key
token ``k``, averaged over all query heads and a range of layers (docs/method.md). transformers only
returns attention from its eager path, which keeps every head of every layer (layers x heads x T^2
floats per sequence). This module gets the same average inside one ordinary fast
forward:

* A wrapper is registered in transformers' ``AttentionInterface`` (and the matching mask builder in
  ``AttentionMaskInterface``) under ``flowtracer_<base>``; for the duration of a capture the model's
  ``config._attn_implementation`` points at it. Every layer's real output still comes from the fast
  kernel (``sdpa``, or ``flash_attention_*`` where installed; eager/other models get ``sdpa``).
* For the selected layers only, the wrapper recomputes ``softmax(q k^T * scaling + mask)`` from the
  post-RoPE ``q`` and ``k`` it was handed, in chunks of query rows, sums it over all query heads
  (GQA: each key/value head serves a group of query heads, never materialised with ``repeat_kv``)
  and adds it into one float32 ``(B, T, T)`` buffer (``heads="max"``: the maximum over the query
  heads instead of their mean, taken chunk by chunk). Per chunk only the causally reachable key
  range is computed and the mask is applied only to the columns where it masks something, so the
  cost is about half of a dense ``T x T`` recompute.
* On CUDA in bf16/fp16 (``backend="auto"``) fused Triton kernels (flowtracer.model.kernels) replace that
  loop: per-row log-sum-exp per head, then per (query tile, key tile) the head sum of
  ``exp(s - lse)`` added into the buffer, skipping unreachable tiles. The torch path (always used on
  CPU) is the exact reference they are tested against.
* Padded query rows and key columns are exactly zero; the valid block equals the map of the
  unpadded sequence.

Public API (the teacher-forced pass that uses it for log-probs and entropies is
flowtracer.model.forward.teacher_forced_pass)::

    with capture_attention(model, "middle", attention_mask=mask) as cap:   # e.g. a training forward
        loss = policy_loss(model(input_ids, attention_mask=mask, ...))
    cap.attn                                                                # detached (B, T, T)
    cap.seconds                                                             # time spent on the map

Supported: decoders that call transformers' standard attention interface (Llama/SmolLM2,
Qwen2/2.5, Qwen3, Mistral with sliding windows, and others of that family), plain or wrapped by
peft (LoRA). Precisions: any; the torch path multiplies q k^T in the model's dtype (as eager does;
under autocast, the autocast dtype), the Triton path accumulates it in float32; softmax and sums
are always float32. A model whose selected layers never reach the wrapper gets one error naming
its class, never a silent wrong map.

This file imports only torch, transformers (and numpy), plus triton when it is installed; no
Lightning (the GPU benchmark relies on that).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from flowtracer.model import cpu_attention, kernels
from flowtracer.model.layers import HEADS, LAYER_PRESETS, resolve_layers

__all__ = ["HEADS", "LAYER_PRESETS", "AttentionCapture", "capture_attention", "resolve_layers"]

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
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
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
            f"{type(lm).__name__} is not supported by flowtracer.model.capture: its config has no num_hidden_layers "
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
        if base == "sdpa":  # transformers' sdpa, in float32 for bf16 tensors on a CPU
            fast_fn, mask_fn = cpu_attention.sdpa_forward, sdpa_mask
        else:
            # optional: flash kernels need the flash-attn package, imported only when asked for
            from transformers.integrations.flash_attention import (
                flash_attention_forward as fast_fn,  # optional (flash-attn)
            )
            from transformers.masking_utils import flash_attention_mask as mask_fn  # optional (flash-attn)
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


class _Timed:
    """Times a block: host wall clock on CPU, a pair of CUDA events on CUDA (no synchronisation)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds, self.events = 0.0, None

    def __enter__(self):
        if self.cuda:
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.events[1].record()
        else:
            self.seconds = time.perf_counter() - self._t0


# --------------------------------------------------------------------------- the capture
class AttentionCapture:
    """Accumulates the head- and layer-averaged attention map during one forward.

    Created by :func:`capture_attention`. After the ``with`` block, ``attn`` is the float32
    ``(B, T, T)`` map (detached), ``layers`` the captured layer indices. Each selected layer is
    captured at most once per context, so a gradient-checkpointing recompute inside the context
    adds nothing twice; run one forward per context. ``heads`` ("mean" | "max") aggregates each
    layer's query heads; with ``per_layer`` each layer's map is also kept in ``layer_attn``
    ({layer: (B, T, T)}, for sweeps over layers; ``attn`` is then their mean).
    """

    def __init__(
        self, layers: list[int], model_name: str, attention_mask: torch.Tensor | None,
        chunk_bytes: int | None, vocab_size: int | None = None, backend: str = "auto",
        heads: str = "mean", per_layer: bool = False,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        check_heads(heads, backend)
        self.backend = backend
        self.heads = heads
        self.per_layer = bool(per_layer)
        self.layer_attn: dict[int, torch.Tensor] = {}  # per_layer: each layer's own map
        self.layers = tuple(layers)
        self.model_name = model_name
        self.chunk_bytes = chunk_bytes
        self.vocab_size = vocab_size
        self.valid = attention_mask.bool() if attention_mask is not None else None
        self.attn: torch.Tensor | None = None
        self._selected = frozenset(layers)
        self._seen: set[int] = set()
        self._masks: list[tuple[object, int | None, bool, torch.Tensor, dict]] = []
        self._seconds = 0.0  # host wall time of the recompute (exact on CPU)
        self._events: list = []  # CUDA: (start, end) events per layer, read once at the end

    # ---------------------------------------------------------------- called by the wrapper
    def observe(self, module, query, key, attention_mask, kwargs) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer not in self._selected or layer in self._seen:
            return
        for unsupported in ("s_aux", "position_bias"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(
                    f"{self.model_name}: attention with `{unsupported}` is not supported by flowtracer.model.capture "
                    "(the recomputed map would ignore it)"
                )
        self._seen.add(layer)
        timed = _Timed(query.device)
        q, k = _compute_dtype(query.detach(), key.detach())
        with timed, torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            # the map is a detached statistic: nothing enters the autograd graph
            self._accumulate(module, q, k, attention_mask, kwargs)
        if timed.events is None:
            self._seconds += timed.seconds
        else:
            self._events.append(timed.events)

    @property
    def seconds(self) -> float:
        """Time spent recomputing the map. On CUDA the kernels run asynchronously, so host time
        would under-report: it is measured with CUDA events (one synchronisation, on first read)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1e3
            self._events.clear()
        return self._seconds

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
        out = self._buffer(module.layer_idx, B, T, q.device)
        scaling = kwargs.get("scaling")
        scaling = D**-0.5 if scaling is None else float(scaling)
        softcap = kwargs.get("softcap")
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        allowed, plans = self._mask(attention_mask, kwargs.get("sliding_window"), is_causal, B, T, q.device)
        # mean: the head sum / H; max: the head maximum. Each layer then counts 1/L (1 in its own map).
        weight = (1.0 / H if self.heads == "mean" else 1.0) / (1 if self.per_layer else len(self.layers))
        if softcap is None and self.heads == "mean" and kernels.use_triton(self.backend, q):
            try:
                return self._accumulate_triton(q, k, allowed, plans, scaling, weight, out)
            except Exception as exc:  # noqa: BLE001 - an unusable Triton install must not break the RL step
                if self.backend == "triton":
                    raise
                kernels.disable_triton(exc)

        # Query rows per chunk so that the (B, H, rows, T) scores plus float32 probabilities fit the budget.
        budget = self.chunk_bytes
        if budget is None:
            budget = auto_budget(B * T * (self.vocab_size or 0) * q.element_size() / 4)
        per_row = B * H * T * (q.element_size() + 4)
        rows = max(1, min(T, int(budget) // per_row))
        if rows >= 16:
            rows -= rows % 16
        plan = plans.get(rows)
        if plan is None:
            plan = plans[rows] = chunk_plan(allowed, self.valid, rows, T)

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
            # (B, Hkv, G, c, keys) -> (B, c, keys): only this chunk of this layer's heads is ever held
            heads = probs.sum(dim=(1, 2)) if self.heads == "mean" else probs.amax(dim=(1, 2))
            out[:, s:e, k0:k1].add_(heads, alpha=weight)
            del probs, heads

    def _buffer(self, layer: int, B: int, T: int, device) -> torch.Tensor:
        """The float32 (B, T, T) map this layer adds into: the shared one, or its own (per_layer)."""
        if self.attn is None:
            self.attn = torch.zeros(B, T, T, dtype=torch.float32, device=device)
        elif self.attn.shape != (B, T, T):
            raise RuntimeError(
                f"one capture context saw two forwards of different shapes {tuple(self.attn.shape)} and {(B, T, T)}; "
                "use one context per forward"
            )
        if not self.per_layer:
            return self.attn
        return self.layer_attn.setdefault(layer, torch.zeros_like(self.attn))

    def _accumulate_triton(self, q, k, allowed, plans, scaling, weight, out) -> None:
        """Fused path (flowtracer.model.kernels): the key range of each block of query rows comes from the
        same chunk plan as the torch path."""
        bm = kernels.BLOCK
        key = ("triton", bm)
        if key not in plans:
            T = q.shape[2]
            n_q = -(-T // bm)
            lo, hi = np.zeros(n_q, np.int32), np.zeros(n_q, np.int32)
            for s, _e, k0, k1, _segs in chunk_plan(allowed, self.valid, bm, T):
                lo[s // bm], hi[s // bm] = k0, k1
            plans[key] = (torch.from_numpy(lo).to(q.device), torch.from_numpy(hi).to(q.device))
        klo, khi = plans[key]
        kernels.accumulate_attention(q, k, allowed, klo, khi, out, scaling, weight)

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
                    raise ValueError(
                        f"{self.model_name}: additive attention biases are not supported by flowtracer.model.capture")
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
                f"flowtracer.model.capture could not capture attention from {self.model_name}: layers {missing} never "
                "called transformers' attention interface (ALL_ATTENTION_FUNCTIONS) during the forward. This model "
                "class is not supported (it needs the standard `attention_interface(self, query, key, value, "
                "attention_mask, ...)` call with `layer_idx` on its attention modules), or no forward ran."
            )
        if self.per_layer and self.layer_attn:
            self.layer_attn = dict(sorted(self.layer_attn.items()))
            self.attn.zero_()
            for m in self.layer_attn.values():
                self.attn.add_(m, alpha=1.0 / len(self.layer_attn))
        if self.valid is not None:
            pair = self.valid[:, :, None] & self.valid[:, None, :]
            for m in (self.attn, *self.layer_attn.values()):
                m.masked_fill_(~pair, 0.0)  # padded rows/columns exactly zero (also clears NaN)
        self._masks.clear()


def _compute_dtype(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k in the dtype the model's own attention multiplies them in: under autocast (bf16-mixed)
    that is the autocast dtype even when rotary embeddings left them float32. The recompute then
    runs with autocast off, so the map's scores are those of the model's attention (and the fused
    Triton path applies on CUDA); softmax and sums stay float32."""
    dev = q.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return q.to(dt), k.to(dt)
    return q, k


def check_heads(heads: str, backend: str = "auto") -> str:
    """Validate the `heads` knob ("mean" | "max"); the fused Triton kernel only sums heads."""
    if heads not in HEADS:
        raise ValueError(f"heads = {heads!r} is not an option; use 'mean' (the paper's, default) or 'max'")
    if heads == "max" and backend == "triton":
        raise ValueError("heads='max' has no Triton kernel; use backend='auto' or 'torch' (the chunked torch path)")
    return heads


def chunk_plan(allowed: torch.Tensor, valid: torch.Tensor | None, rows: int, T: int):
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


def auto_budget(nbytes: float) -> int:
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
    heads: str = "mean",
    per_layer: bool = False,
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
    where it applies, else torch). ``heads``: "mean" (default, the paper's) or "max" over each layer's
    query heads (torch path: per chunk of query rows the head maximum is taken before anything is
    added, so per-head maps never exist beyond one chunk of one layer); layers are averaged either
    way. ``per_layer`` also keeps each selected layer's map (``capture.layer_attn``).
    """
    lm = unwrap(model)
    name = type(lm).__name__
    selected = resolve_layers(layers, _num_layers(lm))
    capture = AttentionCapture(selected, name, attention_mask, chunk_bytes, _vocab_size(lm), backend, heads, per_layer)

    attn_modules = [m for m in lm.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")]
    if not any(m.layer_idx in selected for m in attn_modules):
        raise RuntimeError(
            f"flowtracer.model.capture does not support {name}: no attention module with a `layer_idx` for layers "
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
