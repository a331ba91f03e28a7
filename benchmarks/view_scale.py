"""How `flowtracer view` scales: build and open the page of a synthetic run of N rollouts. Prints a table.

    python benchmarks/view_scale.py [--rollouts 10000] [--words 16,128] [--repeats 3]

For each response length a synthetic run folder is written (tests/view_runs.py: rollouts.jsonl with
byte-level tokens, weights, scores and entropies, as `model.log_token_scores: true` logs them;
8 responses a prompt, 4 prompts a step; metrics.csv), then:
  - build: `flowtracer.tools.view.write_page` (read the run, write the HTML), seconds;
  - open: headless Chromium loads the file (flowtracer.tools.browser); "render" is the page's own
    clock (performance.now() at the end of its first render, from navigation start: reading and
    parsing the HTML, parsing the index, drawing the first 20 rollouts); "dump-dom" and
    "screenshot" the wall time of a whole Chromium run (start, load, render, then serialise the DOM
    (all data blocks included) or paint and save a PNG, exit), with a blank page's for Chromium's
    own start and exit. Medians of --repeats.
Needs chromium (apt-get install chromium). Run it from the repository root, under /work/tools/measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from view_runs import write_run  # noqa: E402

from flowtracer.tools.browser import load, take_screenshot  # noqa: E402
from flowtracer.tools.view import write_page  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rollouts", type=int, default=10_000)
    p.add_argument("--words", default="16,128", help="words a response (about 1.3 tokens a word)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    group, prompts = 8, 4
    steps = max(1, args.rollouts // (group * prompts))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        blank = Path(tmp) / "blank.html"
        blank.write_text("<!doctype html><html><body><script>document.documentElement.dataset.renderMs="
                         "performance.now().toFixed(0)</script></body></html>")
        blank_s = statistics.median(load(blank).seconds for _ in range(args.repeats))
        blank_shot = statistics.median(shot_seconds(blank, Path(tmp) / "b.png") for _ in range(args.repeats))
        for words in map(int, args.words.split(",")):
            run = write_run(Path(tmp) / f"run{words}", steps=steps, prompts=prompts, group=group, words=words)
            n = sum(1 for _ in open(run / "rollouts.jsonl"))
            tokens = sum(len(json.loads(line)["tokens"]) for line in open(run / "rollouts.jsonl"))
            build = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                page = write_page([run])
                build.append(time.perf_counter() - t0)
            loads = [load(page) for _ in range(args.repeats)]
            for r in loads:
                r.raise_on_errors()
            shot = statistics.median(shot_seconds(page, Path(tmp) / "p.png") for _ in range(args.repeats))
            rows.append((n, tokens / n, os.path.getsize(run / "rollouts.jsonl") / 2**20, os.path.getsize(page) / 2**20,
                         statistics.median(build), statistics.median(r.render_ms for r in loads) / 1000,
                         statistics.median(r.seconds for r in loads), shot))
    print("| rollouts | tokens/response | rollouts.jsonl MiB | page MiB | build s | render s | dump-dom s "
          "| screenshot s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| blank page | | | | | | {blank_s:.2f} | {blank_shot:.2f} |")
    for n, tpr, jsonl, mib, build, render, wall, shot in rows:
        print(f"| {n} | {tpr:.0f} | {jsonl:.1f} | {mib:.1f} | {build:.2f} | {render:.2f} | {wall:.2f} | {shot:.2f} |")


def shot_seconds(page: Path, png: Path) -> float:
    """Wall time of one Chromium run that loads the page and saves a screenshot (load, render, paint)."""
    console, seconds = take_screenshot(page, png)
    assert not console, console
    return seconds

if __name__ == "__main__":
    main()
