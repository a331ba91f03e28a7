"""CPU benchmark: averaged attention capture vs a plain sdpa forward vs eager `output_attentions`.

Model: the SmolLM2-135M shape with random weights (LlamaConfig: hidden 576, 30 layers, 9 heads,
3 kv heads, intermediate 1536, vocab 49152, tied embeddings), fp32 on CPU, no network.

Rows, per sequence length T (batch B, no padding):
  sdpa      model(input_ids) with sdpa attention (full (B, T, vocab) logits)
  eager     eager attention with output_attentions=True (every head of every layer kept)
  tf-only   flowtracer teacher_forced_pass(capture_layers=None): log-probs + entropies, chunked
  capture   teacher_forced_pass(capture_layers=<layers>): the same plus the (B, T, T) map
Time is wall-clock (and, in brackets, process CPU time, less sensitive to other jobs on a shared
machine), the best of --reps runs (eager: one run, it is the slow reference) after a short warm-up.
Peak is the process's peak resident memory above the loaded model: each row runs in its own
subprocess with glibc's mmap threshold pinned (so freed tensors leave the resident set at once)
and VmHWM reset after loading. CPU timings are sensitive to other load on the machine.
Targets: capture peak <= (sdpa peak + B*T*T*4) * 1.1 and capture time <= 1.5 x sdpa.

    python benchmarks/attention_bench.py                   # T in 512 1024 2048, B = 1 (~4 min on 2 cores)
    python benchmarks/attention_bench.py --lengths 256 --reps 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("sdpa", "eager", "tf-only", "capture")


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_theta=100000.0,
    )


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def load_model(weights: str, impl: str):
    """The benchmark model with the saved random weights (skipping the slow random init)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = None
    ctx = no_init_weights() if no_init_weights is not None else contextlib.nullcontext()
    with ctx:
        model = AutoModelForCausalLM.from_config(smollm2_config(), attn_implementation=impl)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def worker(mode: str, T: int, B: int, reps: int, layers: str, weights: str) -> dict:
    """Run one (mode, T) measurement in this process and return its numbers."""
    import torch

    sys.path.insert(0, ROOT)
    from flowtracer.model.forward import teacher_forced_pass

    model = load_model(weights, "eager" if mode == "eager" else "sdpa")
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)

    def run(ids=ids, mask=mask):
        with torch.no_grad():
            if mode == "sdpa":
                return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            if mode == "eager":
                return model(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True).attentions
            return teacher_forced_pass(model, ids, mask, capture_layers=None if mode == "tf-only" else layers)

    out = run(ids[:, :64], mask[:, :64])  # warm-up: thread pools, lazy imports, kernel dispatch
    del out
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS watermark after loading
    except OSError:
        pass
    base = _status("VmRSS")
    times, cpu = [], []
    for _ in range(1 if mode == "eager" else reps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del out
    return {"time_s": min(times), "cpu_s": min(cpu), "peak_bytes": _status("VmHWM") - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--layers", default="middle", help="capture_layers preset (default middle = layers 10..19)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), a.batch, a.reps, a.layers, a.weights)))
        return

    from transformers import AutoModelForCausalLM

    tmp = tempfile.mkdtemp(prefix="flowtracer_bench_")
    weights = os.path.join(tmp, "smollm2_random.pt")
    torch.manual_seed(0)
    torch.save(AutoModelForCausalLM.from_config(smollm2_config()).state_dict(), weights)
    # Pinned thresholds: large tensors are mmapped and returned on free, so RSS follows live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    print(f"SmolLM2-135M shape, random weights, fp32 CPU ({torch.get_num_threads()} threads), B={a.batch}, "
          f"capture_layers={a.layers}, best of {a.reps} (eager: 1); load average at start "
          f"{os.getloadavg()[0]:.1f}")
    header = (f"{'T':>5} {'mode':>8} {'time (s)':>9} {'x sdpa':>7} {'[cpu s]':>8} {'[x sdpa]':>8} "
              f"{'peak (MiB)':>11} {'mem target (MiB)':>17}")
    print(header)
    print("-" * len(header))
    for T in a.lengths:
        res = {}
        for mode in MODES:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, str(T), "--batch", str(a.batch),
                   "--reps", str(a.reps), "--layers", a.layers, "--weights", weights]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                res[mode] = None
                msg = "OOM" if "memory" in proc.stderr.lower() else "failed: " + proc.stderr.strip().splitlines()[-1]
                print(f"{T:>5} {mode:>8} {msg}")
                continue
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        sdpa = res.get("sdpa")
        target = (sdpa["peak_bytes"] + a.batch * T * T * 4) * 1.1 if sdpa else None
        for mode in MODES:
            r = res.get(mode)
            if r is None:
                continue
            ratio = f"{r['time_s'] / sdpa['time_s']:.2f}" if sdpa else "-"
            cratio = f"{r['cpu_s'] / sdpa['cpu_s']:.2f}" if sdpa else "-"
            tgt = f"{target / 2**20:.0f}" if (mode == "capture" and target) else ""
            print(f"{T:>5} {mode:>8} {r['time_s']:>9.3f} {ratio:>7} {r['cpu_s']:>8.2f} {cratio:>8} "
                  f"{r['peak_bytes'] / 2**20:>11.1f} {tgt:>17}")
        cap = res.get("capture")
        if sdpa and cap:
            ok_t = min(cap["time_s"] / sdpa["time_s"], cap["cpu_s"] / sdpa["cpu_s"]) <= 1.5
            ok_m = cap["peak_bytes"] <= target
            print(f"{T:>5} targets: time <= 1.5x sdpa (wall or cpu) {'OK' if ok_t else 'MISSED'}, "
                  f"peak <= (sdpa + B*T*T*4) * 1.1 {'OK' if ok_m else 'MISSED'}")
    os.remove(weights)
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
