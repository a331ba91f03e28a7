"""Print the bad-input table: each case of tests/test_bad_inputs.py -> the one error line it gets.

    HF_HUB_OFFLINE=1 python scripts/bad_input_table.py

Runs every case the way the test does (a tiny random model, a 1-step config), catches the exit and
prints a markdown table of case, exit status and the `flowtracer: error:` message.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this checkout (not an installed flowtracer) and the test helpers
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    from test_bad_inputs import CASES, broken_model_dirs
    from test_cli import write_config
    from tiny import tiny_model, tiny_tokenizer

    from flowtracer.cli import main as cli_main

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, tok = tiny_model("llama"), tiny_tokenizer()
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp / "tiny")
        tok.save_pretrained(tmp / "tiny")
        dirs = broken_model_dirs(tmp, str(tmp / "tiny"))

        print("| case | exit | message |")
        print("| --- | --- | --- |")
        for i, (case, (extra, _)) in enumerate(CASES.items()):
            work = tmp / f"case{i}"
            cfg = write_config(work, dirs["tiny"], steps=1)
            err = io.StringIO()
            code = 0
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    cli_main(["fit", "--config", str(cfg), *extra(work, dirs)])
                except SystemExit as done:
                    code = done.code
            lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("flowtracer: error:")]
            message = lines[-1].removeprefix("flowtracer: error:").strip() if lines else "(no error line)"
            message = message.replace(str(work), "<tmp>").replace(str(tmp), "<models>").replace(str(ROOT), "<repo>")
            message = message.replace("|", "\\|")
            print(f"| {case} | {code} | {message} |")


if __name__ == "__main__":
    main()
