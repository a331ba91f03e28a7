"""Speed and memory of flowtracer.flow.trace_flow on CPU (2 threads), next to a per-node loop.

    python benchmarks/flow_bench.py            # full table, about 1-2 minutes
    python benchmarks/flow_bench.py --quick    # B=1 only
    python benchmarks/flow_bench.py --device cuda        # on a GPU (adds T=8192), in one process

Each (B, T) runs in its own subprocess, so peak memory is measured, not estimated: the extra peak
RSS of the first trace_flow call over the RSS just before it (ru_maxrss, which is process-wide and
never decreases; the input is built in row chunks so that its own temporaries stay below that).
The "theory" column is the one T x T float64 buffer the engine allocates (8 B T^2 bytes; the
float32 input itself is not counted). The loop baseline is a straightforward implementation with
one Python step per token (two sweeps), run once, for T <= 1024; "max|diff|" compares its tau.
On CUDA, peak memory is torch.cuda.max_memory_allocated over the call (exact, allocator-level).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flowtracer.flow import dominant_paths, trace_flow  # noqa: E402

SIZES = [(1, 256), (1, 1024), (1, 2048), (1, 4096), (8, 256), (8, 1024), (8, 2048), (8, 4096)]
MAX_GB = 8.0  # skip a size whose float32 input plus float64 working copy would exceed this


def make_inputs(B: int, T: int, seed: int = 0, device: str = "cpu"):
    """Softmax attention over causal keys (peaky, like a real middle layer), built in row chunks."""
    g = torch.Generator(device=device).manual_seed(seed)
    attn = torch.empty(B, T, T, device=device)
    rows = torch.arange(T, device=device)
    for b in range(B):
        for s in range(0, T, 256):
            e = min(T, s + 256)
            logits = torch.randn(e - s, T, generator=g, device=device) * 2.0
            logits.masked_fill_(rows[None, :] > rows[s:e, None], float("-inf"))
            attn[b, s:e] = logits.softmax(-1)
    src = torch.zeros(B, T, dtype=torch.bool, device=device)
    ans = torch.zeros(B, T, dtype=torch.bool, device=device)
    src[:, : T // 5] = True  # question inside the prompt
    ans[:, T - T // 16 : T - T // 32] = True  # answer span near the end, a few tokens after it
    return attn, src, ans


def loop_tau(attn: torch.Tensor, src: torch.Tensor, ans: torch.Tensor) -> torch.Tensor:
    """Reference implementation, one sequence: per-token backward sweep for h, forward for f."""
    T = attn.shape[-1]
    W = attn.double().T.triu(1)
    W[ans] = 0.0
    h = torch.zeros(T, dtype=torch.float64, device=attn.device)
    for i in range(T - 1, -1, -1):
        h[i] = 1.0 if ans[i] else W[i, i + 1 :] @ h[i + 1 :]
    alive = h > 0
    Wp = torch.where(alive[:, None], W * h[None, :] / torch.where(alive, h, 1.0)[:, None], 0.0)
    q = src & alive
    inj = q.double() / max(1, int(q.sum()))
    f = torch.zeros(T, dtype=torch.float64, device=attn.device)
    for k in range(T):
        f[k] = inj[k] + f[:k] @ Wp[:k, k]
    return f + f * Wp.sum(-1) + f * ans


def cpu_idle(window: float = 1.0) -> float:
    """Fraction of all cores idle over `window` seconds (/proc/stat), to flag contended rows."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    i0, t0 = read()
    time.sleep(window)
    i1, t1 = read()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, need: float = 0.9) -> float:
    """Wait (up to max_wait s) until the CPUs are >= `need` idle; return the last idle fraction."""
    deadline = time.monotonic() + max_wait
    idle = cpu_idle()
    while idle < need and time.monotonic() < deadline:
        idle = cpu_idle()
    return idle


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one(B: int, T: int, reps: int, device: str = "cpu") -> dict:
    torch.set_num_threads(2)
    attn, src, ans = make_inputs(B, T, device=device)
    out = {"B": B, "T": T, "theory_mb": 8 * B * T * T / 2**20}
    if device == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = trace_flow(attn, src, ans)
        _sync(device)
        out.update(peak_mb=(torch.cuda.max_memory_allocated() - base) / 2**20, peak_exact=True)
    else:
        before = rss_bytes()
        peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res = trace_flow(attn, src, ans)  # first call: also the memory measurement
        peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.update(peak_mb=max(0, peak1 - max(before, peak0)) / 2**20, peak_exact=peak1 > peak0)
    del res
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        res = trace_flow(attn, src, ans)
        _sync(device)
        times.append(time.perf_counter() - t0)
    out["ms"] = 1e3 * statistics.median(times)
    t0 = time.perf_counter()
    dominant_paths(res, 0, 8)
    out["paths_ms"] = 1e3 * (time.perf_counter() - t0)
    if T <= 1024:
        t0 = time.perf_counter()
        taus = [loop_tau(attn[b], src[b], ans[b]) for b in range(B)]
        _sync(device)
        out["loop_ms"] = 1e3 * (time.perf_counter() - t0)
        out["diff"] = float((torch.stack(taus) - res.throughput).abs().max())
    del attn, src, ans, res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B=1 only")
    p.add_argument("--one", nargs=2, type=int, metavar=("B", "T"), help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--wait-quiet", type=float, default=10.0,
                   help="CPU only: wait up to this many s before each row for idle CPUs (shared machines)")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.reps)))
        return

    cuda = args.device == "cuda"
    where = torch.cuda.get_device_name() if cuda else "CPU, torch.set_num_threads(2)"
    print(f"torch {torch.__version__}, {where}, float32 softmax input, float64 engine, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'B':>2} {'T':>5} | {'trace ms':>9} {'ms/seq':>7} | {'loop ms':>8} {'speed-up':>8} {'max|diff|':>9} "
          f"| {'peak MB':>8} {'theory MB':>9} {'B/(B*T^2)':>9} | {'paths k=8 ms':>12} | {'idle':>4}")
    for B, T in SIZES + ([(1, 8192), (8, 8192)] if cuda else []):
        if args.quick and B > 1:
            continue
        need_gb = 12 * B * T * T / 2**30
        if need_gb > MAX_GB and not cuda:
            print(f"{B:>2} {T:>5} | skipped: needs ~{need_gb:.1f} GB (> {MAX_GB} GB)")
            continue
        reps = args.reps if B * T * T <= 2 * 2048**2 else 2
        idle = 1.0 if cuda else wait_quiet(args.wait_quiet)
        if cuda:
            r = one(B, T, max(reps, 5), "cuda")
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", str(B), str(T), "--reps", str(reps)]
            run = subprocess.run(cmd, check=True, capture_output=True, text=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
        loop = f"{'-':>8} {'-':>8} {'-':>9}"
        if "loop_ms" in r:
            loop = f"{r['loop_ms']:>8.0f} {r['loop_ms'] / r['ms']:>7.0f}x {r['diff']:>9.1e}"
        peak = f"{r['peak_mb']:>8.0f}" + ("" if r["peak_exact"] else "<")
        per = r["peak_mb"] * 2**20 / (B * T * T)
        print(f"{B:>2} {T:>5} | {r['ms']:>9.1f} {r['ms'] / B:>7.1f} | {loop} | {peak:>8} {r['theory_mb']:>9.0f} "
              f"{per:>9.1f} | {r['paths_ms']:>12.0f} | {idle:>4.0%}", flush=True)
    mem = "GPU allocator peak" if cuda else "extra peak RSS"
    print(f"peak MB: measured {mem} of one trace_flow call (incl. the returned FlowResult); "
          "'<' = a lower bound. theory MB = 8*B*T^2 bytes (the float64 capacity buffer). "
          "paths: dominant_paths(res, 0, k=8) on sequence 0. idle: share of all CPUs idle just "
          "before the row (CPU); well below 100% means other processes competed and the row is slow.")


if __name__ == "__main__":
    main()
