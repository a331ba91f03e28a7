"""The "fast" engine: a decode loop of our own over a static KV cache, for Llama-shaped models.

Why: at decode time a step multiplies a handful of rows by every weight once, so its floor is one
read of the weights at memory bandwidth. `model.generate` spends most of a step elsewhere: cache
bookkeeping, mask building, logits processors, and the vocabulary projection taken with a GEMM
layout that is slow for skinny inputs on some CPUs. Here one step is, per layer: RMSNorm, one
fused QKV product, rotary, attention over the filled part of a preallocated cache, one output
product, one fused gate/up product, one down product; then the final norm, the vocabulary
product and the sampler. Measured per CPU kind in results/decode_*.md (benchmarks/decode.py).

What it keeps from the "hf" engine (tests/test_fast_decode.py compares the two):
  * the same numerics up to float rounding: RMSNorm in float32, rotary from the model's own
    rotary module (so its scaling variants hold), softmax in float32;
  * sampling: greedy; HF's sampler (temperature, top-k, top-p, then one draw per row and step on
    the global RNG: `torch.multinomial` as `generate` draws with `sampling.draw: multinomial`, the
    cheaper exact inverse-CDF draw by default, flowtracer.generation.sampler); per-row seeded
    Gumbel-max; the sampler's log-probs for TIS;
  * EOS and padding: a finished row emits pad; the loop ends when every row has finished;
  * LoRA: the weights are read from the modules at each call (adapters merged by `sample`, or
    added here when they are live), so adapters that change every step need no recompile.
Layout: which GEMM form is fastest for a skinny product differs by CPU kind (MKL's packed sgemm on
Intel; `(W @ x^T)^T` where MKL's plain path is slow, as on AMD Zen 2). `pick_layout` times the
candidates once per weight shape and row count in a process and keeps the fastest. Fused and
packed weights are kept while their source tensors are unchanged (frozen base layers: once per
run; merged LoRA layers: once per call). Cost: the fused QKV and gate/up copies, and with
"packed" one packed copy of each weight. Prefill (other row counts) uses `F.linear`.
Supported: model_type llama, mistral, qwen2, qwen3 with SiLU MLPs and no sliding window in reach;
`unsupported_reason(model)` says why not otherwise ("auto" then picks "hf").
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import Tensor

from flowtracer.generation.cpu_linear import available as packed_available
from flowtracer.generation.sampler import (
    filter_logits,
    gumbel_perturbed,
    hashed_uniform,
    inverse_cdf_draw,
    resolve_draw,
)

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_CACHE = "_flowtracer_fast"  # module attribute: (source tensors, their versions, derived tensor)
# A prefill runs a block of prompts at a time, about this many tokens per block. Why: 64 prompts of
# 400 tokens at once made ~0.6 GB gate/up outputs and 0.4 GB float32 attention scores per layer;
# glibc serves blocks over 32 MiB from fresh mmaps, so each layer faulted its pages in anew (351M
# page faults in a MATH-500 eval). 1024 tokens keep every intermediate under that, and the products
# still see 1024-row operands.
PREFILL_TOKENS = 1024
SWITCH_MARGIN = 1.5  # pick_layout leaves the default layout only for a layout this many times faster


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model) -> str | None:
    """Why the fast engine cannot run `model` (None = it can)."""
    base = _base(model)
    cfg = getattr(base, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"model_type {kind!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (only silu)"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no decoder layers / rotary module where a Llama-shaped model has them"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and "dynamic" in str(rope.get("rope_type", rope.get("type", ""))):
        return "dynamic rope scaling (the frequencies change with the length)"
    if getattr(cfg, "use_sliding_window", kind == "mistral") and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    for layer in inner.layers:
        for mod in (*_attn_modules(layer), layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            lin = mod.get_base_layer() if isinstance(mod, LoraLinear) else mod
            if type(lin) is not torch.nn.Linear:
                return f"a {type(lin).__name__} layer (quantised or custom linears)"
    return None


def _attn_modules(layer):
    a = layer.self_attn
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj


def _effective(mod) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) a linear layer applies: a live LoRA adapter's delta added, a merged one as is."""
    if not isinstance(mod, LoraLinear):
        return mod.weight, mod.bias
    base = mod.get_base_layer()
    active = [a for a in mod.active_adapters if a in mod.lora_A]
    if mod.disable_adapters or mod.merged or mod.merged_adapters or not active:
        return base.weight, base.bias
    w = base.weight.detach().clone()
    for name in active:
        w += mod.get_delta_weight(name).to(w.dtype)
    return w, base.bias


def _derived(owner, key: str, tag, sources: list[Tensor | None], make):
    """`make(*sources)`, kept on `owner` under `key` while every source is the same unchanged tensor
    and `tag` (layout, rows) is the same; one entry per key, so a new tag replaces the old one."""
    versions = [(-1 if s is None or s.is_inference() else s._version) for s in sources]
    store = owner.__dict__.setdefault(_CACHE, {})
    hit = store.get(key)
    if hit is not None and hit[3] == tag and all(a is b for a, b in zip(hit[0], sources)) and hit[1] == versions:
        return hit[2]
    store.pop(key, None)  # free the old copy before making the new one
    with torch.inference_mode(False), torch.no_grad():
        value = make(*sources)
    store[key] = (list(sources), versions, value, tag)
    return value


# (out, in, rows, dtype) -> the layout measured fastest for that product (this process)
_LAYOUTS: dict[tuple, str] = {}


def _candidates(dtype: torch.dtype) -> list[str]:
    return ["linear", "wx"] + (["packed"] if dtype == torch.float32 and packed_available() else [])


def pick_layout(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, rows: int) -> str:
    """The fastest way to multiply `rows` rows by a `shape` weight here, measured once per shape and
    row count in a process.

    "linear" = `F.linear(x, W)`; "wx" = `(W @ x^T)^T` (no copy: another GEMM operand order, several
    times faster for skinny x on some CPUs); "packed" = MKL's packed sgemm for exactly `rows` rows
    (Intel's fast path; one packed copy of the weight). Which one wins differs by CPU kind
    (results/decode_*.md); off the CPU it is always "linear". The candidates are timed in
    interleaved rounds (load drift hits all alike) and another layout replaces the default
    ("packed" where MKL has it, else "linear") only when the default's median is SWITCH_MARGIN times
    its median or more. Why so wide: this timing runs one hot weight, the decode step reads every
    weight from memory, and small wins here did not carry over. With a 1.1x margin, six processes on
    an AMX Xeon picked four different layout sets at 8 rows; the non-default picks made the whole
    step slower (gate/up as `(W @ x^T)^T`: 72 ms a step against 55 with it packed), and GRPO steps
    of two processes differed by 20% in generation. The gaps that matter are wide (the vocabulary
    product on AMD Zen 2: `(W @ x^T)^T` 14.6 ms, packed 48 ms)."""
    if torch.device(device).type != "cpu":
        return "linear"
    key = (*shape, rows, dtype)
    if key not in _LAYOUTS:
        # a private generator: the global RNG stream is the sampler's (HF's sampler draws from it)
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(shape, generator=gen).to(dtype)
        x = torch.randn(rows, shape[1], generator=gen).to(dtype)
        fns = {layout: _product(_prepare(layout, w, rows), layout, rows) for layout in _candidates(dtype)}
        times: dict[str, list[float]] = {layout: [] for layout in fns}
        for round_ in range(8):
            for layout, fn in fns.items():
                start = time.perf_counter()
                fn(x)
                if round_:  # the first round warms up
                    times[layout].append(time.perf_counter() - start)
        median = {layout: sorted(t)[len(t) // 2] for layout, t in times.items()}
        default = "packed" if "packed" in median else "linear"
        best = min(median, key=median.get)
        _LAYOUTS[key] = best if median[default] >= SWITCH_MARGIN * median[best] else default
    return _LAYOUTS[key]


def _prepare(layout: str, w: Tensor, rows: int):
    if layout == "packed":
        return w, torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    return w


def _product(prepared, layout: str, rows: int):
    """x (rows, in) -> x W^T in `layout`; any other row count (a prefill) takes `F.linear`."""
    if layout == "packed":
        w, packed = prepared

        def fn(x):
            if x.shape[0] != rows:
                return F.linear(x, w)
            return torch.ops.mkl._mkl_linear(x, packed, w, None, rows)
        return fn
    w = prepared
    if layout == "wx":
        return lambda x: torch.mm(w, x.t()).t() if x.shape[0] == rows else F.linear(x, w)
    return lambda x: F.linear(x, w)


def _fuse(*ws: Tensor) -> Tensor:
    """The weights stacked along their outputs (one product instead of several); one alone as is."""
    return ws[0].detach() if len(ws) == 1 else torch.cat([w.detach() for w in ws], 0)


def _cat_bias(*bs: Tensor | None) -> Tensor | None:
    return None if all(b is None for b in bs) else torch.cat([b.detach() for b in bs], 0)


class _Linear:
    """y = x W^T + b for one (fused) weight, in the layout picked for the decode row count."""

    def __init__(self, owner, key: str, weights: list[Tensor], bias: Tensor | None, rows: int):
        fused_shape = (sum(w.shape[0] for w in weights), weights[0].shape[1])
        layout = pick_layout(fused_shape, weights[0].dtype, weights[0].device, rows)
        prepared = _derived(owner, key, (layout, rows), weights,
                            lambda *ws: _prepare(layout, _fuse(*ws), rows))
        self.fn, self.bias, self.out = _product(prepared, layout, rows), bias, fused_shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        y = self.fn(x.reshape(-1, x.shape[-1]))
        y = y.reshape(*x.shape[:-1], self.out)
        return y if self.bias is None else y + self.bias


class DecodeModel:
    """One call's view of the model's weights in decode layout, and its forward for new tokens."""

    def __init__(self, model, rows: int):
        base = _base(model)
        cfg, inner = base.config, base.model
        self.cfg, self.inner = cfg, inner
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.embed = inner.embed_tokens.weight
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.layers = [self._layer(layer, rows) for layer in inner.layers]
        self.norm = inner.norm.weight
        head = base.get_output_embeddings()
        self.head = _Linear(head, "head", [head.weight], head.bias, rows)

    def _layer(self, layer, rows: int) -> dict:
        a, mlp = layer.self_attn, layer.mlp
        q, k, v, o = (_effective(m) for m in _attn_modules(layer))
        gate, up, down = _effective(mlp.gate_proj), _effective(mlp.up_proj), _effective(mlp.down_proj)
        return {
            "ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
            "qkv": _Linear(a, "qkv", [q[0], k[0], v[0]], _cat_bias(q[1], k[1], v[1]), rows),
            "q_norm": getattr(getattr(a, "q_norm", None), "weight", None),
            "k_norm": getattr(getattr(a, "k_norm", None), "weight", None),
            "o": _Linear(a, "o", [o[0]], o[1], rows),
            "gate_up": _Linear(mlp, "gate_up", [gate[0], up[0]], _cat_bias(gate[1], up[1]), rows),
            "down": _Linear(mlp, "down", [down[0]], down[1], rows),
        }

    def rotary(self, max_pos: int) -> tuple[Tensor, Tensor]:
        """(max_pos, head_dim) cos and sin tables from the model's rotary module."""
        pos = torch.arange(max_pos, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, max_pos, self.head_dim, dtype=self.dtype, device=self.device)
        cos, sin = self.inner.rotary_emb(probe, pos)
        return cos[0], sin[0]

    def _rms(self, x: Tensor, w: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)

    @staticmethod
    def _rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
        """x cos + rotate_half(x) sin, with rotate_half(x) sin = roll(x, d/2) [-sin_1, sin_2]: the same
        products and sum in the same order as HF's, without the negated copy."""
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed

    def forward(self, ids: Tensor, pos: Tensor, cache: KVCache, start: int, keys: Tensor,
                rows_per_input: int = 1) -> Tensor:
        """Run tokens `ids` (N, T) at positions `pos` (N, T) into cache slots [start, start+T); each
        query attends to the slots [0, start+T) its `keys` (N, T, start+T) bool allows. With
        `rows_per_input` g > 1 each input row's keys/values are written to g consecutive cache rows
        (a prompt prefilled once for its G samples). Returns (N, hidden) of the last position.
        Long inputs run PREFILL_TOKENS at a time, a block of rows per call (rows are independent)."""
        n, t = ids.shape
        block = max(1, PREFILL_TOKENS // t)
        if block >= n:
            return self._forward(ids, pos, cache, start, keys, rows_per_input, 0)
        return torch.cat([self._forward(ids[i:i + block], pos[i:i + block], cache, start, keys[i:i + block],
                                        rows_per_input, i) for i in range(0, n, block)])

    def _forward(self, ids: Tensor, pos: Tensor, cache: KVCache, start: int, keys: Tensor, g: int,
                 row0: int) -> Tensor:
        """`forward` for input rows [row0, row0 + N): cache rows [row0 * g, (row0 + N) * g)."""
        n, t = ids.shape
        h = F.embedding(ids, self.embed)
        cos, sin = cache.cos[pos].unsqueeze(2), cache.sin_signed[pos].unsqueeze(2)  # (N, T, 1, d)
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        end = start + t
        masked = ~keys.unsqueeze(1)  # (N, 1, T, S): the keys a query may not see, once for all layers
        for i, p in enumerate(self.layers):
            x = self._rms(h, p["ln1"])
            qkv = p["qkv"](x)
            v = qkv[..., (hq + hk) * d:].reshape(n, t, hk, d)
            if p["q_norm"] is None:  # one rotary pass over the query and key heads together
                qk = self._rope(qkv[..., :(hq + hk) * d].reshape(n, t, hq + hk, d), cos, sin)
                q, k = qk[:, :, :hq], qk[:, :, hq:]
            else:
                q, k = qkv[..., :hq * d].reshape(n, t, hq, d), qkv[..., hq * d:(hq + hk) * d].reshape(n, t, hk, d)
                q, k = self._rms(q, p["q_norm"]), self._rms(k, p["k_norm"])
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            kc, vc = cache.write(i, k.transpose(1, 2), v.transpose(1, 2), start, g, row0 * g)
            if g > 1:  # attend within the prompt's own keys (one copy per prompt)
                kc, vc = kc[::g], vc[::g]
            att = self._attend(q.transpose(1, 2), kc[:, :, :end], vc[:, :, :end], masked)
            h = h + p["o"](att.transpose(1, 2).reshape(n, t, hq * d))
            x = self._rms(h, p["ln2"])
            gate, up = p["gate_up"](x).chunk(2, -1)
            h = h + p["down"](F.silu(gate) * up)
        return self._rms(h[:, -1], self.norm)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masked: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d)) v with grouped query heads; q (N, Hq, T, d), k/v (N, Hkv, S, d),
        masked (N, 1, T, S) bool, true = not seen. Scores and softmax in float32."""
        n, hq, t, d = q.shape
        g = hq // k.shape[1]
        qg = q.reshape(n, k.shape[1], g * t, d).float()
        scores = torch.matmul(qg, k.float().transpose(-1, -2)) * (d ** -0.5)  # (N, Hkv, g*T, S)
        scores = scores.view(n, k.shape[1], g, t, -1).masked_fill(masked.unsqueeze(1), float("-inf"))
        probs = scores.softmax(-1).view(n, k.shape[1], g * t, -1)
        out = torch.matmul(probs, v.float()).view(n, hq, t, d)
        return out.to(q.dtype)

    def logits(self, h: Tensor) -> Tensor:
        return self.head(h)


class KVCache:
    """Preallocated keys and values (layers, rows, kv heads, slots, head_dim) and the rotary tables."""

    def __init__(self, dm: DecodeModel, rows: int, slots: int, max_pos: int):
        shape = (len(dm.layers), rows, dm.n_kv, slots, dm.head_dim)
        self.k = torch.zeros(shape, dtype=dm.dtype, device=dm.device)
        self.v = torch.zeros(shape, dtype=dm.dtype, device=dm.device)
        self.cos, sin = dm.rotary(max_pos)
        half = sin.shape[-1] // 2
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], -1)  # see DecodeModel._rope

    def write(self, layer: int, k: Tensor, v: Tensor, start: int, g: int, row0: int = 0) -> tuple[Tensor, Tensor]:
        """Store k/v (N, Hkv, T, d) in slots [start, start+T), each input row in g consecutive cache
        rows from `row0`; returns that layer's keys and values for those cache rows."""
        end, rows = start + k.shape[2], slice(row0, row0 + k.shape[0] * g)
        if g > 1:
            k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        self.k[layer, rows, :, start:end] = k
        self.v[layer, rows, :, start:end] = v
        return self.k[layer, rows], self.v[layer, rows]


class Sampler:
    """Picks each step's tokens as the "hf" engine would (greedy, HF's sampler, or per-row seeds)."""

    def __init__(self, sampling, row_seeds: Tensor | None):
        self.t = sampling.temperature
        self.top_k, self.top_p = sampling.top_k, sampling.top_p
        self.seeds = row_seeds if self.t > 0 else None
        self.greedy = self.t <= 0
        self.inverse_cdf = resolve_draw(sampling.draw, "fast") == "inverse_cdf"

    def __call__(self, logits: Tensor, step: int) -> Tensor:
        if self.greedy:
            return logits.argmax(-1)
        scores = filter_logits(logits / self.t, self.top_k, self.top_p)
        if self.seeds is not None:
            u = hashed_uniform(self.seeds.to(logits.device), step, logits.shape[-1])
            return gumbel_perturbed(scores, u).argmax(-1)
        if self.inverse_cdf:
            return inverse_cdf_draw(scores)
        return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)


def _prefill(dm: DecodeModel, prompt_ids: Tensor, valid: Tensor, cache: KVCache, copies: int) -> tuple[Tensor, Tensor]:
    """Run the left-padded prompts once into the cache (each to `copies` rows); (last hidden, positions).
    Each real token sees the real tokens up to it; a padding token sees itself only (its values are
    never read, but must stay finite)."""
    width = prompt_ids.shape[1]
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool, device=valid.device).tril()
    keys = (causal & valid.unsqueeze(1)) | torch.eye(width, dtype=torch.bool, device=valid.device)
    return dm.forward(prompt_ids, pos, cache, 0, keys, rows_per_input=copies), pos


def _run(dm: DecodeModel, cache: KVCache, logits: Tensor, key_valid: Tensor, next_pos: Tensor, slot0: int,
         steps: int, pick, eos: list[int], pad: int, inv_t: float | None):
    """The decode loop: pick a token per row from `logits`, pad rows that have finished, feed the
    tokens at positions next_pos + t into slot slot0 + t, until `steps` tokens or every row has hit EOS.
    Returns (tokens (R, W), stopped (R,), the picked tokens' log-probs (R, W) when `inv_t` is set)."""
    eos_t = torch.tensor(eos, device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens, lps = [], []
    for t in range(steps):
        nxt = pick(logits, t)
        if inv_t is not None:
            lps.append(torch.log_softmax(logits * inv_t, -1).gather(-1, nxt[:, None]).squeeze(-1))
        nxt = nxt.masked_fill(done, pad)
        tokens.append(nxt)
        done = done | torch.isin(nxt, eos_t)
        if t + 1 == steps or bool(done.all()):
            break
        slot = slot0 + t
        h = dm.forward(nxt[:, None], (next_pos + t)[:, None], cache, slot, key_valid[:, None, :slot + 1])
        logits = dm.logits(h).float()
    new = torch.stack(tokens, 1) if tokens else torch.zeros(logits.shape[0], 0, dtype=torch.long)
    lp = (torch.stack(lps, 1) if lps else torch.zeros(new.shape)).float() if inv_t is not None else None
    return new, torch.isin(new, eos_t).any(1), lp


@torch.no_grad()
def decode(model, prompt_ids: Tensor, prompt_attn: Tensor, g: int, sampling, eos: list[int], pad: int,
           row_seeds: Tensor | None = None, record_logprobs: bool = False):
    """Sample G continuations of each left-padded prompt (P, Tp): rows [i*G, (i+1)*G) answer prompt i.

    Returns (new tokens (R, W) long, pad after EOS; stopped (R,) bool[, log-probs (R, W) float32]).
    """
    n_prompts, width = prompt_ids.shape
    rows, steps = n_prompts * g, int(sampling.max_new_tokens)
    dm = DecodeModel(model, rows)
    valid = prompt_attn.bool()
    lengths = valid.long().sum(1)
    cache = KVCache(dm, rows, width + steps, int(lengths.max()) + steps + 1)
    h, _ = _prefill(dm, prompt_ids, valid, cache, g)
    logits = dm.logits(h).float().repeat_interleave(g, 0)
    key_valid = torch.cat([valid.repeat_interleave(g, 0),
                           torch.ones(rows, steps, dtype=torch.bool, device=valid.device)], 1)
    inv_t = 1.0 / sampling.temperature if sampling.temperature > 0 else 1.0  # greedy: T = 1, as the learner
    new, stopped, lp = _run(dm, cache, logits, key_valid, lengths.repeat_interleave(g, 0), width, steps,
                            Sampler(sampling, row_seeds), eos, pad, inv_t if record_logprobs else None)
    return (new, stopped) if not record_logprobs else (new, stopped, lp)


@torch.no_grad()
def greedy_after_segment(model, prompt_ids: Tensor, prompt_valid: Tensor, seg_ids: Tensor, seg_valid: Tensor,
                         blocked: Tensor, max_new_tokens: int, eos: list[int], pad: int) -> Tensor:
    """Greedy continuations of prompt + segment, one per (row, arm), no token attending to `blocked`
    (the causal probe's regeneration, flowtracer.tools.probe.regenerate, on this engine).

    prompt_* (B, P) and seg_* (B, W) are shared by the A arms; blocked is (A, B, W). Returns
    (B * A, <= max_new_tokens), row b * A + a = arm a of problem b. The prompt is prefilled once for
    its A rows. A segment or new token attends to the valid prompt tokens and to the segment tokens
    before it that are valid and not blocked; positions come from `valid` alone."""
    arms, (b, width), w = blocked.shape[0], prompt_ids.shape, seg_ids.shape[1]
    rows = b * arms
    dm = DecodeModel(model, rows)
    valid = prompt_valid.bool()
    cache = KVCache(dm, rows, width + w + max_new_tokens, width + w + max_new_tokens + 1)
    _, pos = _prefill(dm, prompt_ids, valid, cache, arms)
    seg_keys = seg_valid.bool().repeat_interleave(arms, 0) & ~blocked.transpose(0, 1).flatten(0, 1)
    key_valid = torch.cat([valid.repeat_interleave(arms, 0), seg_keys,
                           torch.ones(rows, max_new_tokens, dtype=torch.bool, device=valid.device)], 1)
    seg_pos = (pos[:, -1:] + seg_valid.long().cumsum(-1)).repeat_interleave(arms, 0)
    causal = torch.ones(w, w, dtype=torch.bool, device=valid.device).tril()
    keys = torch.cat([key_valid[:, None, :width].expand(rows, w, width), causal & seg_keys[:, None, :]], 2)
    h = dm.forward(seg_ids.repeat_interleave(arms, 0), seg_pos, cache, width, keys)
    logits = dm.logits(h).float()
    new, _, _ = _run(dm, cache, logits, key_valid, seg_pos[:, -1] + 1, width + w, max_new_tokens,
                     lambda x, t: x.argmax(-1), eos, pad, None)
    return new
