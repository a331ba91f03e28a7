"""Memory planner: predicted peak memory of each phase of an RL step, from the model's shape only.

No weights are loaded: a `ModelShape` comes from a config.json (or a loaded model's config) or a
named shape (SHAPES). `plan(shape, run)` returns the per-phase peaks; each phase's peak is what
stays resident (weights, LoRA / trainable weights with gradients and AdamW states) plus that
phase's transient memory:
  * generate: KV cache of one chunk (rows x (prompt + max_new_tokens) x 2 x layers x kv_heads x
    head_dim x dtype bytes), plus the larger of the prefill activations and the decode logits;
    all in the rollouts' dtype (`sampler_dtype`, sampling.dtype), which, when it differs from the
    weights', adds a copy of the weights in it (kept for the run for frozen weights, rebuilt each
    step for trainable ones) and the sampler's log-prob recorder (one float32 vocabulary row per row);
  * old_pass (no grad) and update (with grad), per micro-batch of `micro_batch_size` rows of
    T = prompt + max_new_tokens tokens: activations saved for the backward (all layers, or only
    the layer inputs plus one layer's recompute with gradient checkpointing), the vocabulary
    projection in chunks of `logits_budget_mb`, and, when the credit arm needs attention, the
    captured (B, T, T) float32 map; under autocast (`autocast`, trainer.precision bf16-mixed /
    16-mixed) activations take ACT_AUTOCAST_BYTES per element, frozen weights keep a 16-bit copy
    for the run on a CPU (flowtracer.model.casts), and trainable ones (full fine-tuning) a 16-bit
    cast per use until the backward;
  * flow: the map plus the float64 (B, T, T) flow solve of one micro-batch (8 B T^2 bytes).
The constants (`ACT_*`) were calibrated on CPU against measured peaks (benchmarks/plan_accuracy.py
prints predicted vs measured); on CUDA the same model applies to the caching allocator's
allocated bytes (benchmarks/gpu_step.py prints both). Everything after generation is bounded by
the micro-batch (the step design); generation by the chunk (flowtracer.generation).
`fit` uses the planner for `generation_batch_size: auto` and refuses a config whose peak exceeds
the device (flowtracer.train.preflight.check_memory). FLOWTRACER_MEMORY_GB overrides the device's memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from flowtracer.errors import InputError

GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
# Activation elements saved per token and layer for the backward (calibrated, see module docstring):
# hidden-sized tensors (norm inputs/outputs, residual, attention output), MLP-sized tensors (gate,
# up, activation), and attention-sized ones (q, k, v after rotary, as the attention kernel saves).
ACT_HIDDEN, ACT_MLP, ACT_QKV = 6.0, 3.0, 2.0
ACT_FULL_FT_EXTRA = 2.0  # hidden-sized inputs linear layers keep when their weights are trainable
HEADROOM = 0.9  # plan to this fraction of the device: allocator fragmentation, CUDA context
# Bytes per saved activation element under autocast over float32 weights: linear inputs and outputs
# are 16-bit, the residual stream, norms and softmax statistics stay float32 (calibrated, see above).
ACT_AUTOCAST_BYTES = 3.0


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = True
    max_positions: int = 32768

    @property
    def params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * layer + self.hidden

    def _dims(self) -> dict[str, tuple[int, int]]:
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def lora_params(self, r: int, targets) -> int:
        return self.layers * sum(r * (a + b) for t, (a, b) in self._dims().items() if t in set(targets))

    def target_params(self, targets) -> int:
        """Base weights of the LoRA-adapted layers (generation holds a merged copy of them)."""
        return self.layers * sum(a * b for t, (a, b) in self._dims().items() if t in set(targets))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _qwen3(hidden, inter, layers, heads, tied=True):
    return ModelShape(151936, hidden, inter, layers, heads, 8, 128, tied, 40960)


SHAPES = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, tied=False),
    "smollm2-135m": ModelShape(49152, 576, 1536, 30, 9, 3, 64, True, 8192),
}
# model names in configs -> named shape (no download needed to plan them)
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "qwen/qwen3-0.6b": "qwen3-0.6b",
           "qwen/qwen3-0.6b-base": "qwen3-0.6b", "qwen/qwen3-1.7b": "qwen3-1.7b",
           "qwen/qwen3-1.7b-base": "qwen3-1.7b", "qwen/qwen3-4b": "qwen3-4b",
           "qwen/qwen3-4b-base": "qwen3-4b", "qwen/qwen3-8b": "qwen3-8b", "qwen/qwen3-8b-base": "qwen3-8b"}


def shape_from_config(cfg) -> ModelShape:
    """A ModelShape from a transformers config object or a config.json dict."""
    get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    text = get("text_config")
    if text:
        return shape_from_config(text)
    heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    return ModelShape(
        vocab=int(get("vocab_size")), hidden=hidden, intermediate=int(get("intermediate_size")),
        layers=int(get("num_hidden_layers")), heads=heads,
        kv_heads=int(get("num_key_value_heads") or heads), head_dim=int(get("head_dim") or hidden // heads),
        tied=bool(get("tie_word_embeddings", True)), max_positions=int(get("max_position_embeddings") or 32768))


def resolve_shape(name: str) -> ModelShape:
    """Named shape, alias of one, a folder with config.json, or a config.json path."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key in SHAPES:
        return SHAPES[key]
    path = Path(name)
    path = path / "config.json" if path.is_dir() else path
    if path.name == "config.json" and path.is_file():
        return shape_from_config(json.loads(path.read_text()))
    raise InputError(f"no model shape for {name!r}: pass --shape one of {', '.join(SHAPES)} "
                     "or a folder holding config.json")


@dataclass
class RunSpec:
    """The settings of a run that decide its memory (per process)."""

    rollouts: int = 64  # rollouts per step on this process: prompts_per_step / world x G
    num_generations: int = 8
    prompt_tokens: int = 256  # longest prompt in tokens
    max_new_tokens: int = 1024
    dtype: str = "bfloat16"
    lora_r: int | None = 16  # None = full fine-tuning
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    gradient_checkpointing: bool = True
    micro_batch_size: int = 0  # 0 = the whole step (one mini-batch)
    mini_batches: int = 1
    logits_budget_mb: float = 512.0
    needs_attention: bool = True  # the credit arm captures attention and solves the flow
    generation_batch_size: int | str = 0
    generation_token_budget: int = 0
    accelerator: str = "cuda"  # "cpu": attention kernels materialise the prefill scores
    sampler_dtype: str | None = None  # the rollouts' dtype (sampling.dtype) if not the weights'; None = dtype
    autocast: bool = False  # trainer.precision bf16-mixed / 16-mixed: the forward runs under autocast

    @property
    def seq(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    @property
    def micro(self) -> int:
        return self.micro_batch_size or math.ceil(self.rollouts / self.mini_batches)

    @property
    def sampler(self) -> str:
        return self.sampler_dtype or self.dtype

    @property
    def recasts(self) -> bool:
        """The rollouts run on a copy of the weights in another dtype."""
        return self.sampler != self.dtype


@dataclass
class Plan:
    phases: dict[str, float]  # phase -> predicted peak bytes
    parts: dict[str, float]  # named components (bytes), for the printout
    generation_rows: int  # rows per generate call (auto resolved)
    tokens_per_step: int  # upper bound: every response runs to max_new_tokens
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def resident_bytes(shape: ModelShape, run: RunSpec) -> tuple[float, float]:
    """(weights, trainable state): LoRA adapters are float32 (peft upcasts them) with a gradient
    and two AdamW moments each; full fine-tuning keeps gradient and moments in the weights' dtype.
    Rollouts in another dtype keep a copy of the frozen weights in it (LoRA: all but the adapted
    layers, which are merged afresh each step) for the whole run."""
    b = _DTYPE_BYTES[run.dtype]
    weights = shape.params * b
    if run.lora_r:
        lora = shape.lora_params(run.lora_r, run.lora_targets)
        if run.autocast and b == 4 and run.accelerator == "cpu":  # frozen weights cached in 16 bits (model.casts)
            weights += shape.params * 2
        elif run.recasts:
            weights += (shape.params - shape.target_params(run.lora_targets)) * _DTYPE_BYTES[run.sampler]
        return weights + lora * 4, lora * 12
    return weights, shape.params * b * 3


def generation_bytes(shape: ModelShape, run: RunSpec, rows: int) -> float:
    """KV cache of `rows` rows, the merged copy of the LoRA-adapted weights (policy.merged_lora),
    plus the larger of the prefill and the decode-step transients (logits and sampler buffers, one
    layer's K/V repeated to every query head)."""
    b = _DTYPE_BYTES[run.sampler]
    kv = rows * run.seq * shape.kv_bytes_per_token(b)
    merged = shape.target_params(run.lora_targets) * _DTYPE_BYTES[run.dtype] if run.lora_r else 0
    if run.recasts:  # the merged layers (LoRA) or all trainable weights (full) cast for this call
        merged += (shape.target_params(run.lora_targets) if run.lora_r else shape.params) * b
    prompts = max(1, rows // run.num_generations)  # the prefill runs once per prompt (shared prefill)
    p = run.prompt_tokens
    prefill = prompts * p * (4 * shape.hidden + 3 * shape.intermediate) * b
    if run.accelerator == "cpu":
        prefill += prompts * shape.heads * p * p * 4  # the math attention kernel's scores
    decode = rows * shape.vocab * (b + 4 * 3)  # logits, their float32 copy, the sampler's temporaries
    if run.recasts or run.autocast:
        decode += rows * shape.vocab * 4  # the recorder's pending log-softmax (sampler log-probs for TIS)
    decode += rows * run.seq * 2 * shape.heads * shape.head_dim * b  # GQA: K/V of one layer per query head
    return kv + merged + max(prefill, decode)


def forward_bytes(shape: ModelShape, run: RunSpec, with_grad: bool) -> float:
    """Transient memory of one micro-batch's teacher-forced forward (and backward, with grad)."""
    b, B, T = _DTYPE_BYTES[run.dtype], run.micro, run.seq
    if run.autocast and b == 4:
        b = ACT_AUTOCAST_BYTES
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = ((ACT_HIDDEN + (0 if run.lora_r else ACT_FULL_FT_EXTRA)) * shape.hidden
                 + ACT_MLP * shape.intermediate + ACT_QKV * (q + 2 * kv))
    layer = B * T * per_layer * b
    if not with_grad:
        acts = 2 * layer  # no graph: one layer's temporaries at a time (and the residual stream)
    elif run.gradient_checkpointing:
        acts = shape.layers * B * T * shape.hidden * b + 1.5 * layer  # layer inputs + one recomputed layer
    else:
        acts = shape.layers * layer + layer  # + the backward's gradient buffers of one layer
    full_logits = B * run.max_new_tokens * shape.vocab * 4 * 2  # float32 logits and log-softmax
    logits = min(full_logits, run.logits_budget_mb * 2**20)
    attn = 4 * B * T * T if run.needs_attention else 0
    # full fine-tuning under autocast: each trainable weight's 16-bit cast is kept for the backward
    casts = shape.params * 2 if run.autocast and not run.lora_r and _DTYPE_BYTES[run.dtype] == 4 else 0
    return acts + logits + attn + casts


def flow_bytes(run: RunSpec) -> float:
    """The captured float32 map and its float64 copy the flow solve works in (one micro-batch)."""
    B, T = run.micro, run.seq
    return (4 + 8) * B * T * T if run.needs_attention else 0.0


def auto_rows(shape: ModelShape, run: RunSpec, budget: float, resident: float) -> int:
    """The most rows per generate call (whole groups) whose generation peak fits `budget`."""
    g, rows = run.num_generations, run.rollouts
    while rows > g and resident + generation_bytes(shape, run, rows) > budget * HEADROOM:
        rows -= g
    return rows


def plan(shape: ModelShape, run: RunSpec, device_bytes: float | None = None) -> Plan:
    """Per-phase predicted peaks; `generation_batch_size: auto` resolved against `device_bytes`."""
    weights, trainable = resident_bytes(shape, run)
    resident = weights + trainable
    size = run.generation_batch_size
    if isinstance(size, str):
        rows = auto_rows(shape, run, device_bytes or float("inf"), resident)
    else:
        rows = min(int(size), run.rollouts) if size and int(size) > 0 else run.rollouts
    rows = max(rows, run.num_generations)  # a chunk holds at least one prompt's G rows
    if run.generation_token_budget > 0:
        rows = min(rows, max(run.num_generations, run.generation_token_budget // run.seq))
    gen = generation_bytes(shape, run, rows)
    phases = {
        "generate": resident + gen,
        "old_pass": resident + forward_bytes(shape, run, with_grad=False),
        "update": resident + forward_bytes(shape, run, with_grad=True),
        "flow": resident + flow_bytes(run),
    }
    parts = {"weights": weights, "trainable+grads+adamw": trainable,
             "kv_cache/chunk": rows * run.seq * shape.kv_bytes_per_token(_DTYPE_BYTES[run.sampler]),
             "logits/chunk": min(run.micro * run.max_new_tokens * shape.vocab * 8, run.logits_budget_mb * 2**20),
             "activations(update)": forward_bytes(shape, run, True),
             "attention_map": 4 * run.micro * run.seq ** 2 * run.needs_attention,
             "flow_solve(float64)": 8 * run.micro * run.seq ** 2 * run.needs_attention}
    return Plan(phases, parts, rows, run.rollouts * run.max_new_tokens)


def largest_micro_batch(shape: ModelShape, run: RunSpec, budget: float) -> int:
    """The largest micro_batch_size whose update and flow phases fit `budget` (0 if none)."""
    best = 0
    for m in range(1, run.rollouts + 1):
        p = plan(shape, replace(run, micro_batch_size=m, generation_batch_size=run.num_generations), budget)
        if max(p.phases["update"], p.phases["flow"], p.phases["old_pass"]) > budget * HEADROOM:
            break
        best = m
    return best


def device_memory(device=None) -> float:
    """Bytes the run may use: FLOWTRACER_MEMORY_GB, else the CUDA device's total, else the RAM."""
    env = os.environ.get("FLOWTRACER_MEMORY_GB")
    if env:
        return float(env) * GIB

    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return float(torch.cuda.get_device_properties(dev).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def auto_generation_rows(model, seq_len: int, n_rows: int) -> int:
    """Rows per generate call for `generation_batch_size: auto` outside `fit` (which resolves it
    in its pre-flight check): the rows whose KV cache of `seq_len` tokens and decode logits fit
    the memory the loaded model leaves free (CUDA: total minus allocated; CPU: MemAvailable)."""

    shape = shape_from_config(model.config)
    param = next(model.parameters())
    b = param.element_size()
    if param.device.type == "cuda":
        free = device_memory(param.device) * HEADROOM - torch.cuda.memory_allocated(param.device)
    else:
        free = _mem_available() * HEADROOM
    free -= sum(m.get_base_layer().weight.numel() * b for m in model.modules()  # merged LoRA copies
                if hasattr(m, "lora_A") and hasattr(m, "get_base_layer"))
    per_row = seq_len * shape.kv_bytes_per_token(b) + shape.vocab * (b + 12)
    return max(1, min(n_rows, int(free // per_row)))


def _mem_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return device_memory("cpu") / 2


def memory_fix(shape, run, p, budget: float) -> str:
    """The setting that lowers the phase of plan `p` that does not fit `budget` bytes."""
    resident = sum(resident_bytes(shape, run))
    if resident > budget * HEADROOM:
        return ("the weights and optimizer states alone do not fit: enable LoRA (model.lora), set "
                "model.model_dtype: bfloat16, or pick a smaller model")
    if p.peak_phase == "generate":
        rows = auto_rows(shape, run, budget, resident)
        return (f"set model.sampling.generation_batch_size: auto (or at most {rows} rows)" if rows < p.generation_rows
                else "lower model.sampling.max_new_tokens or num_generations")
    micro = largest_micro_batch(shape, run, budget)
    if micro >= 1:
        return f"lower model.optim.micro_batch_size to {micro} or less"
    if not run.gradient_checkpointing:
        return "set model.gradient_checkpointing: true and model.optim.micro_batch_size: 1"
    return "lower model.sampling.max_new_tokens (even one sequence per micro-batch does not fit)"
