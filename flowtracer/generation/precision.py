"""Rollout precision: the dtype the sampler computes in, the cast that makes it so, and the sampler's
own log-probs (what truncated importance sampling compares the learner with).

* `native_bf16(device)`: whether the device multiplies bf16 in hardware (CUDA sm80+, a CPU with
  AVX512-BF16 or AMX-BF16, an ARM CPU with the BF16 extension), and by which feature.
* `resolve_dtype(setting, ...)`: `sampling.dtype` ("auto", "float32", "bfloat16") as a torch dtype,
  with the reason, for the step line. "auto" = bf16 when training multiplies in 16 bits
  (bf16-mixed, 16-mixed, bf16 weights) and the hardware does bf16 natively (bf16 emulated in
  float32 is slower than float32), else the weights' own dtype: a float32 run stays float32 end to
  end unless asked otherwise.
* `rollout_dtype(model, dtype)`: inside the block every floating parameter of the model holds a
  `dtype` copy and autocast is off, so the rollout's numerics are those of `dtype` alone (a
  bf16-mixed trainer's autocast would otherwise round a "float32" sampler's matmuls to bf16).
  Copies of frozen parameters (a LoRA base) are kept between steps (flowtracer.model.casts);
  trainable ones are cast on every call. Buffers (rotary frequencies) keep their dtype.
* `LogprobRecorder`: a logits processor that records log p(sampled token) under the sampler's
  tempered distribution log_softmax(logits / T), T as in flowtracer.model.forward, from the
  float32 copy of the logits `generate` hands its processors (before its own temperature, top-k
  and top-p warpers, which transformers appends after user processors). One step's log-softmax
  is held until the next step reveals the token drawn from it.

The MKL-packed CPU linears (flowtracer.generation.cpu_linear) are float32 only: bf16 rollouts on a
CPU run the plain bf16 GEMM (oneDNN, AVX512-BF16/AMX), measured in docs/generation-and-memory.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from flowtracer.model.casts import cast

SAMPLER_DTYPES = ("auto", "float32", "bfloat16", "float16")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def describe_cpu() -> str:
    """The CPU's model name and the vector features that decide matmul speed, for results files."""
    flags = _cpu_flags()
    avx512 = [f.removeprefix("avx512").removeprefix("_").upper() for f in sorted(flags)
              if f.startswith("avx512") and f != "avx512_bf16"]
    parts = [f"AVX512 {'/'.join(avx512)}" if avx512 else ("AVX2, no AVX512" if "avx2" in flags else "no AVX2")]
    parts.append("AVX512-BF16" if "avx512_bf16" in flags else "no AVX512-BF16")
    parts.append("AMX" if any(f.startswith("amx") for f in flags) else "no AMX")
    return f"{_cpu_model()} ({os.cpu_count()} cores; {', '.join(parts)})"


def cpu_kind() -> str:
    """A short name for the CPU kind in results file names: vendor, widest vector unit, bf16 hardware."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
        return kind_name(vendor, _cpu_flags())
    return "cpu"


def kind_name(vendor: str, flags: frozenset[str]) -> str:
    """`cpu_kind` from a vendor_id and cpuinfo flags. AMX and AVX512-BF16 get their own suffix: they
    change bf16 speed several-fold, so their figures are no promise for a plain AVX512 part."""
    name = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, vendor.lower() or "cpu")
    vector = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    bf16 = "-amx" if "amx_bf16" in flags else "-bf16" if "avx512_bf16" in flags else ""
    return f"{name}-{vector}{bf16}"


def native_bf16(device) -> str | None:
    """The hardware feature that multiplies bf16 natively on `device` ("CUDA", "CPU AVX512-BF16",
    "CPU AMX-BF16", "CPU ARM BF16"), or None where bf16 would be emulated."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA (planned: sm80+ assumed)"  # `flowtracer plan` of a GPU config on another machine
        return "CUDA" if torch.cuda.get_device_capability(dev)[0] >= 8 else None
    if dev.type != "cpu":
        return None
    flags = _cpu_flags()
    for flag, name in (("amx_bf16", "CPU AMX-BF16"), ("avx512_bf16", "CPU AVX512-BF16"), ("bf16", "CPU ARM BF16")):
        if flag in flags:
            return name
    return None


def resolve_dtype(setting: str, *, weights: torch.dtype, learner_half: bool, device) -> tuple[torch.dtype, str]:
    """(the sampler's dtype, why) for `sampling.dtype` = `setting` (see the module docstring);
    `learner_half`: training multiplies in bf16 or fp16 (autocast, or half-precision weights)."""
    if setting not in SAMPLER_DTYPES:
        raise ValueError(f"sampling.dtype = {setting!r}: use one of {', '.join(SAMPLER_DTYPES)}")
    if setting != "auto":
        return getattr(torch, setting), "set"
    native = native_bf16(device) if learner_half else None
    if native:
        return torch.bfloat16, f"auto: training in 16 bits, {native}"
    why = f"no native bf16 on this {torch.device(device).type}" if learner_half else "training in float32"
    return weights, f"auto: {why}"


@contextlib.contextmanager
def rollout_dtype(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[int]:
    """Inside this block the model's floating parameters are `dtype` (None = as they are) and
    autocast is off; yields how many parameters were swapped. Use under no_grad, outside
    inference_mode (the swapped-in tensors must be ordinary tensors)."""
    params = [p for p in model.parameters() if p.is_floating_point() and dtype is not None and p.dtype != dtype]
    saved = []
    device = next(model.parameters()).device.type
    no_autocast = (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
                   else contextlib.nullcontext())
    try:
        with torch.no_grad(), torch.inference_mode(False):  # ordinary tensors, even under `validate`
            for p in params:
                saved.append((p, p.data))
                p.data = cast(p, dtype)
        with no_autocast:
            yield len(params)
    finally:
        for p, data in saved:
            p.data = data


class LogprobRecorder:
    """Logits processor: records log p(token) of every sampled token under log_softmax(logits / T).

    Put it first in the processor list; it returns the scores unchanged. Call `result(new_tokens)`
    after `generate` for the (R, W) float32 log-probs aligned with the W generated columns.
    """

    def __init__(self, temperature: float):
        self.inv_t = 1.0 / temperature if temperature > 0 else 1.0  # greedy: T = 1, as the learner
        self.pending: Tensor | None = None
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.pending is not None:  # the token drawn from the previous step's distribution
            self.steps.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float() * self.inv_t, dim=-1)
        return scores

    def result(self, new_tokens: Tensor) -> Tensor:
        w = new_tokens.shape[1]
        if self.pending is not None and len(self.steps) < w:
            self.steps.append(self.pending.gather(-1, new_tokens[:, len(self.steps), None]).squeeze(-1))
        self.pending = None
        out = torch.zeros(new_tokens.shape, dtype=torch.float32, device=new_tokens.device)
        if self.steps:
            got = torch.stack(self.steps, 1)[:, :w]
            out[:, :got.shape[1]] = got.to(out.device)
        return out
