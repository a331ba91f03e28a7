"""Memory of the training data: load a large synthetic JSONL and draw 10 batches. Prints a table.

    python benchmarks/data_memory.py [--rows 100000,1000000] [--batches 10] [--prompts 8]

For each size a synthetic JSONL is written (one arithmetic question per row, ~150 bytes a row),
then two fresh processes each build `PromptDataModule(<file>, val_source=None, val_size=0)`, call
`setup()` and draw `--batches` training batches (`train_batch(step)`): a cold one (empty `datasets`
cache: the file is converted to Arrow first) and a warm one (the Arrow cache exists). Each process
reports its peak resident memory (VmHWM), split by a sampling thread (every 5 ms) into anonymous
memory (Python objects, tensors: what a Python list of rows costs) and file-backed pages (the
memory-mapped Arrow cache, which the kernel may drop at will), minus what it held after its imports
(`datasets` and pyarrow included, for both versions of the code: their pages are not the data's).
Run it from the repository root; PYTHONPATH picks the code measured (e.g. an export of main).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


class PeakSampler(threading.Thread):
    """Highest RssAnon and RssFile seen while running (sampled; VmHWM is the exact total peak)."""

    def __init__(self, every: float = 0.005):
        super().__init__(daemon=True)
        self.every, self.anon, self.file, self.stop = every, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            s = _status()
            self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])
            time.sleep(self.every)


def child(path: str, batches: int, prompts: int) -> None:
    """One measurement: imports, then load + draw; prints a JSON line."""
    import datasets  # noqa: F401 - imported before the baseline by both versions: library pages are not data
    import pyarrow.json  # noqa: F401

    import flowtracer.data as data
    from flowtracer.data import PromptDataModule

    base = _status()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    dm = PromptDataModule(path, val_source=None, val_size=0, prompts_per_step=prompts)
    dm.setup()
    t_load = time.perf_counter() - t0
    drawn = [dm.train_batch(step) for step in range(batches)]
    t_all = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    end = _status()
    assert sum(len(b) for b in drawn) == batches * prompts and drawn[0][0]["question"]
    print(json.dumps({
        "code": str(Path(data.__file__).resolve().parents[2]), "rows": dm.num_train_rows,
        "base_mib": base["VmRSS"] / 1024, "peak_mib": end["VmHWM"] / 1024,
        "peak_anon_mib": (max(sampler.anon, end["RssAnon"]) - base["RssAnon"]) / 1024,
        "peak_file_mib": (max(sampler.file, end["RssFile"]) - base["RssFile"]) / 1024,
        "load_s": t_load, "total_s": t_all}))


def write_jsonl(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            a, b = i % 997, (i * 7) % 991
            f.write(json.dumps({"question": f"Problem {i}: a shop sells {a} apples in the morning and "
                                            f"{b} in the afternoon. How many apples did it sell?",
                                "answer": str(a + b), "tag": f"t{i % 5}"}) + "\n")


def measure(path: Path, cache: Path, batches: int, prompts: int) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, __file__, "--child", str(path), "--batches", str(batches),
                          "--prompts", str(prompts)], env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="100000,1000000", help="comma-separated file sizes (rows)")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--prompts", type=int, default=8, help="prompts per batch")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.batches, args.prompts)
    print("| rows | file MiB | run | peak RSS MiB | after imports MiB | peak anon. growth MiB "
          "| peak file-backed growth MiB | load s | load + draws s |")
    print("|---|---|---|---|---|---|---|---|---|")
    code = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.rows.split(",")):
            path = Path(tmp) / f"synthetic_{n}.jsonl"
            write_jsonl(path, n)
            cache = Path(tmp) / f"hf_cache_{n}"
            for run in ("cold", "warm"):
                r = measure(path, cache, args.batches, args.prompts)
                code = r["code"]
                print(f"| {n:,} | {path.stat().st_size / 2**20:.0f} | {run} | {r['peak_mib']:.0f} | "
                      f"{r['base_mib']:.0f} | {r['peak_anon_mib']:.0f} | {r['peak_file_mib']:.0f} | "
                      f"{r['load_s']:.1f} | {r['total_s']:.1f} |", flush=True)
            path.unlink()
    print(f"\ncode measured: {code}; {args.batches} batches of {args.prompts} prompts")


if __name__ == "__main__":
    main()
