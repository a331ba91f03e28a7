"""GPU benchmark of flowtracer.model.capture on a Qwen2.5-1.5B-shaped random model in bf16.

Prints one table (per shape): a plain sdpa forward (full logits), eager with output_attentions
(OOM caught), flowtracer's teacher-forced pass without the map (log-probs + entropies only) and
with the middle-layer map; time (CUDA events, median after a warm-up) and peak memory above the
weights (torch.cuda.max_memory_allocated), plus ratios and the targets. Then correctness
lines: max |capture - eager mean| and |log-probs - full-logit log-probs| at a small size (fp32
and bf16, with padding, and with a peft LoRA wrapper when peft is installed).

Needs only torch, transformers (>= 5.x) and, optionally, peft; flowtracer.model.capture imports only
torch and transformers.

    python benchmarks/gpu_attention.py                # H100: about a minute after start-up
    python benchmarks/gpu_attention.py --quick        # fewer reps, no padded rows
    python benchmarks/gpu_attention.py --device cpu --tiny   # smoke test of the code path on CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flowtracer.model.forward import teacher_forced_pass  # noqa: E402
from flowtracer.model.layers import resolve_layers  # noqa: E402


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    if tiny:
        cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=4096)
    else:  # Qwen2.5-1.5B shape
        cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=32768, rope_theta=1000000.0)
    torch.manual_seed(0)
    with torch.device(device):  # initialise directly on the GPU: seconds instead of a minute on CPU
        try:
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
        except TypeError:  # older keyword
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", torch_dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def set_attn(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def make_batch(B: int, T: int, vocab: int, device: str, padded: bool, seed: int = 0):
    """Random tokens; with padding, odd rows get a left-padded prompt and even rows a right-padded tail."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        for b in range(B):
            n = int(T * (0.1 + 0.3 * ((b * 7919) % 5) / 4))
            if b % 2:
                mask[b, :n] = 0
            else:
                mask[b, T - n :] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


class Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn, reps: int):
        """(median seconds, peak bytes above the allocation at entry or None on CPU)."""
        out = fn()  # warm-up
        del out
        self.sync()
        peak = None
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
            del out
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() - base
        return statistics.median(times), peak


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def bench(model, shapes, device, reps, padded_too, layers, backend="auto", compare_torch=False):
    timer = Timer(device)
    vocab = model.config.vocab_size
    rows = []
    for B, T in shapes:
        for padded in ([False, True] if padded_too else [False]):
            ids, mask = make_batch(B, T, vocab, device, padded)
            tag = f"{B}x{T}" + (" pad" if padded else "")

            def sdpa(ids=ids, mask=mask):
                with torch.no_grad():
                    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

            def eager(ids=ids, mask=mask):
                set_attn(model, "eager")
                try:
                    with torch.no_grad():
                        return model(input_ids=ids, attention_mask=mask, use_cache=False,
                                     output_attentions=True).attentions
                finally:
                    set_attn(model, "sdpa")

            def tf_only(ids=ids, mask=mask):
                return teacher_forced_pass(model, ids, mask, capture_layers=None, backend=backend)

            def capture(ids=ids, mask=mask):
                return teacher_forced_pass(model, ids, mask, capture_layers=layers, backend=backend)

            def capture_torch(ids=ids, mask=mask):
                return teacher_forced_pass(model, ids, mask, capture_layers=layers, backend="torch")

            modes = [("sdpa", sdpa), ("eager+attn", eager), ("tf (no map)", tf_only), ("capture", capture)]
            if compare_torch:
                modes.append(("capture torch", capture_torch))
            if padded:  # eager and tf-only add nothing new with padding: keep the run short
                modes = [m for m in modes if m[0] not in ("eager+attn", "tf (no map)")]
            res = {}
            for name, fn in modes:
                try:
                    res[name] = timer.measure(fn, reps)
                except Exception as exc:  # noqa: BLE001 - report OOM in the table, re-raise anything else
                    if not is_oom(exc):
                        raise
                    res[name] = None
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
            rows.append((tag, B, T, res))
    return rows


def print_table(rows, device):
    gib = 2**30
    print(f"\n{'shape':<12} {'mode':<14} {'time ms':>9} {'x sdpa':>7} {'peak GiB':>9}   notes")
    print("-" * 78)
    for tag, B, T, res in rows:
        base = res.get("sdpa")
        for name, r in res.items():
            if r is None:
                print(f"{tag:<12} {name:<14} {'OOM':>9}")
                continue
            t, peak = r
            ratio = f"{t / base[0]:.2f}" if base else "-"
            pk = f"{peak / gib:.2f}" if peak is not None else "-"
            note = ""
            if name.startswith("capture") and base:
                tf = res.get("tf (no map)")
                if tf and name == "capture":
                    note += f"map adds {(t - tf[0]) * 1e3:.1f} ms; "
                note += f"time target 1.5x: {'OK' if t <= 1.5 * base[0] else 'MISSED'}"
                if peak is not None and base[1] is not None:
                    target = (base[1] + B * T * T * 4) * 1.1
                    note += f"; mem target {target / gib:.2f} GiB: {'OK' if peak <= target else 'MISSED'}"
            print(f"{tag:<12} {name:<14} {t * 1e3:>9.1f} {ratio:>7} {pk:>9}   {note}")
    print(f"(device: {device}; peak = max allocated above the weights and inputs; map = layers "
          f"[L/3, 2L/3), averaged over all heads)")


def reference(model, ids, mask, layers):
    """Eager output_attentions mean over the layers and all heads, and full-logit log-probs/entropies."""
    set_attn(model, "eager")
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, output_attentions=True)
    finally:
        set_attn(model, "sdpa")
    valid = mask.bool()
    mean = torch.stack([out.attentions[i].float().mean(dim=1) for i in layers]).mean(dim=0)
    mean = mean.masked_fill(~(valid[:, :, None] & valid[:, None, :]), 0.0).nan_to_num(0.0)
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    target = torch.zeros_like(valid)
    target[:, 1:] = valid[:, 1:] & valid[:, :-1]
    lp = torch.zeros(ids.shape, device=ids.device)
    lp[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return mean, lp * target


def check(model, device, tiny, label, tol_attn, tol_lp, backend="auto"):
    vocab = model.config.vocab_size
    T = 64 if tiny else 256
    layers = resolve_layers("middle", model.config.num_hidden_layers)
    worst_a = worst_l = 0.0
    for B, padded in ((1, False), (2, True)):
        ids, mask = make_batch(B, T, vocab, device, padded, seed=1)
        ours = teacher_forced_pass(model, ids, mask, capture_layers="middle", backend=backend)
        ref_attn, ref_lp = reference(model, ids, mask, layers)
        worst_a = max(worst_a, (ours.attn - ref_attn).abs().max().item())
        worst_l = max(worst_l, (ours.logprobs - ref_lp).abs().max().item())
    ok = worst_a <= tol_attn and worst_l <= tol_lp
    print(f"check {label:<14} 1x{T} + 2x{T} padded: max|attn - eager mean| = {worst_a:.2e} (tol {tol_attn:g}), "
          f"max|logprob - full logits| = {worst_l:.2e} (tol {tol_lp:g})  {'OK' if ok else 'FAILED'}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny Qwen2 config and short sequences (smoke test)")
    p.add_argument("--quick", action="store_true", help="2 timed reps, no padded rows")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions after one warm-up (default 3)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness lines")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="flowtracer backend for the 'tf' and 'capture' rows "
                        "(auto: Triton kernels on CUDA when available)")
    a = p.parse_args()
    device = a.device
    reps = a.reps or (2 if a.quick else 3)
    t_start = time.perf_counter()
    import transformers

    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {dev_name}")
    model = build_model(a.tiny, device, torch.bfloat16)
    L = model.config.num_hidden_layers
    layers = resolve_layers("middle", L)
    print(f"model: {'tiny Qwen2' if a.tiny else 'Qwen2.5-1.5B shape'}, bf16, {L} layers, capture layers "
          f"{layers[0]}..{layers[-1]} ({len(layers)}), built in {time.perf_counter() - t_start:.1f} s")
    shapes = [(2, 64), (1, 128)] if a.tiny else [(8, 1024), (2, 4096)]
    from flowtracer.model import capture as attention

    fused = attention.triton is not None and device.startswith("cuda") and a.backend != "torch"
    print(f"backend {a.backend} ({'fused Triton kernels' if fused else 'torch'})"
          + ("; 'capture torch' = the pure-torch path for comparison" if fused and not a.quick else ""))
    # One untimed pass over every path first (Triton compiles its kernels on first use).
    for padded in (False, True):
        ids, mask = make_batch(2, 256, model.config.vocab_size, device, padded)
        teacher_forced_pass(model, ids, mask, capture_layers="middle", backend=a.backend)
        teacher_forced_pass(model, ids, mask, capture_layers=None, backend=a.backend)
    Timer(device).sync()
    rows = bench(model, shapes, device, reps, padded_too=not a.quick, layers="middle", backend=a.backend,
                 compare_torch=fused and not a.quick)
    print_table(rows, dev_name)

    ok = True
    if not a.no_check:
        # bf16: eager rounds its probabilities to bf16, so agreement is to ~1e-2 of a probability.
        ok &= check(model, device, a.tiny, "bf16", 2e-2, 0.25, a.backend)
        model.float()
        ok &= check(model, device, a.tiny, "fp32", 1e-4, 1e-3)
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            print("check lora: peft not installed, skipped")
        else:
            lora = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
            ok &= check(lora, device, a.tiny, "fp32 + LoRA", 1e-4, 1e-3)
    print(f"total {time.perf_counter() - t_start:.1f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
