"""Render a chain trace page and check it in headless Chromium (screenshot + the DOM after scripts ran).

    python scripts/screenshot_trace.py --model lightning_logs/sft_chains/merged --chains 0 --out results/trace_chains

Writes <out>/trace.html (flowtracer trace --chains N), then runs `chromium --headless` twice: a full
page screenshot <out>/trace_screenshot.png, and --dump-dom to check that the page's script drew the
dominant paths (SVG <path> elements), that every token carries its f/tau/h tooltip and that the
per-arm table is there. Exits 1 with the reason when a check fails, 2 when no Chromium is found
(install it: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def run_chromium(exe: str, page: Path, *args: str) -> str:
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--virtual-time-budget=3000", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


def check(page: Path, shot: Path, exe: str) -> list[str]:
    """Problems found (empty = the page rendered as intended)."""
    problems = []
    run_chromium(exe, page, f"--screenshot={shot}", "--window-size=1300,1800")
    if not shot.exists() or shot.stat().st_size < 10_000:
        problems.append(f"no screenshot (or an empty one) at {shot}")
    dom = run_chromium(exe, page, "--dump-dom")
    n_paths = len(re.findall(r'<path [^>]*class="path"', dom))
    tokens = re.findall(r'<span class="tok[^"]*" id="t\d+" title="([^"]*)"', dom)
    if n_paths == 0:
        problems.append("the script drew no dominant-path curves (no <path class=path> in the live DOM)")
    if not tokens or not all("f=" in t and "tau=" in t and "h=" in t for t in tokens):
        problems.append("tokens without an f/tau/h tooltip")
    if "What each arm up-weights" not in dom:
        problems.append("no per-arm table")
    print(f"chromium: {n_paths} path curves drawn, {len(tokens)} tokens with tooltips, screenshot {shot}")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--chains", type=int, default=0)
    p.add_argument("--out", default="traces/chains")
    args = p.parse_args()
    exe = chromium()
    if exe is None:
        print("no chromium found; install it with `apt-get install chromium`", file=sys.stderr)
        return 2
    from flowtracer.tools.trace import main as trace_main

    out = Path(args.out)
    trace_main(["--model", args.model, "--chains", str(args.chains), "--out", str(out)])
    problems = check(out / "trace.html", out / "trace_screenshot.png", exe)
    for msg in problems:
        print(f"FAIL: {msg}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
