"""Optional fused Triton kernels (CUDA), each with a torch twin it is tested against.

* `token_stats`: one read of a chunk of logits -> log p(target) and the entropy, at 1/temperature
  (twin: flowtracer.model.forward's chunked log-softmax).
* `accumulate_attention`: the head-summed softmax of q k^T of one layer added into the (B, T, T)
  map, in two passes (per-row log-sum-exp per head, then per tile exp(s - lse)), skipping
  unreachable tiles (twin: flowtracer.model.capture's chunked matmul + softmax).

`use_triton(backend, x)` decides whether a kernel applies; a failed launch in "auto" mode switches
the kernels off for the process with one warning (`disable_triton`). With TRITON_INTERPRET=1 the
kernels run on CPU tensors through Triton's interpreter (how tests/test_kernels.py checks them
without a GPU).
"""

from __future__ import annotations

import os
import warnings

import torch

try:  # ships with CUDA builds of torch; CPU installs may lack it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 64  # query rows x key columns per tile of the attention kernels
_OFF: list[str] = []  # set once a launch failed in "auto" mode
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(backend: str, x: torch.Tensor, need_dot: bool = True) -> bool:
    """Whether the fused kernels apply: CUDA (or the interpreter), half precision for the attention
    dots (tl.dot), sm80+."""
    if backend == "torch":
        return False
    ok = triton is not None and (x.is_cuda or _INTERPRET) and not _OFF
    if ok and need_dot:
        ok = x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] >= 16
        ok = ok and (not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] >= 8)
    if backend == "triton" and not ok:
        raise ValueError(
            "backend='triton' needs triton, a CUDA sm80+ device and (for the map) bf16/fp16 q/k with head_dim >= 16"
        )
    return ok


def disable_triton(exc: BaseException) -> None:
    _OFF.append(repr(exc))
    warnings.warn(f"flowtracer: Triton kernels failed ({exc!r}); using the torch path", stacklevel=3)


def token_stats(logits: torch.Tensor, tokens: torch.Tensor, inv_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(tokens), entropy) of each row of `logits` scaled by `inv_temp`, both float32 (n,)."""
    n, vocab = logits.shape
    logits = logits.contiguous()
    lp = torch.empty(n, dtype=torch.float32, device=logits.device)
    ent = torch.empty(n, dtype=torch.float32, device=logits.device)
    _token_stats_kernel[(n,)](logits, logits.stride(0), tokens, lp, ent, vocab, inv_temp, BLOCK_V=4096, num_warps=8)
    return lp, ent


def accumulate_attention(q, k, allowed, klo, khi, out, scaling: float, weight: float) -> None:
    """out[b, q, k] += weight * sum over query heads of softmax(q k^T * scaling, masked by `allowed`).

    q (B, H, T, D), k (B, Hkv, T, D) (GQA: head h reads key head h // (H / Hkv)); allowed (Bm, 1, T, T)
    bool; klo/khi (ceil(T / BLOCK),) int32: the key range each block of BLOCK query rows may see.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    bm = bn = BLOCK
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
    _accum_kernel[(n_q, triton.cdiv(T, bn), B)](
        q, k, mask, lse, klo, khi, out, *strides, *out.stride(), T, H, Hkv, H // Hkv, D, scaling, weight,
        BM=bm, BN=bn, BD=bd, num_warps=4, num_stages=2,
    )


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
