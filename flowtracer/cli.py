"""The `flowtracer` command: one entry point, every subcommand.

    flowtracer fit --config experiments/quickstart.yaml          # GRPO + a credit arm (LightningCLI)
    flowtracer <subcommand> --help                                # the options of one subcommand
    flowtracer --help | --version

Each subcommand's module is imported only when it runs (so `flowtracer plan` or `grid` does not
load the training stack); each has a `main(argv)` that returns an exit status.
"""

from __future__ import annotations

import importlib
import sys

from flowtracer import __version__
from flowtracer.errors import run_or_fail

# name -> (module:function, one line for `flowtracer --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("flowtracer.train.lightning_cli:main", "train a policy with GRPO and a credit arm (LightningCLI)"),
    "validate": ("flowtracer.train.lightning_cli:main", "validation metrics of a config (LightningCLI)"),
    "sft": ("flowtracer.train.lightning_cli:sft_main", "supervised warm start on worked solutions, merged export"),
    "eval": ("flowtracer.tools.eval:main", "per-benchmark avg@k / pass@k / maj@k of a checkpoint or model"),
    "test": ("flowtracer.tools.eval:main", "the same as eval (Lightning's test/predict are not offered)"),
    "export": ("flowtracer.tools.export:main", "a checkpoint as a PEFT adapter or a merged Hugging Face model"),
    "plan": ("flowtracer.tools.plan:main", "predicted peak memory per phase of a config, before launch"),
    "grid": ("flowtracer.tools.grid:main", "an ablation grid (arms x seeds x values) of fit runs, and its report"),
    "view": ("flowtracer.tools.view:main", "one offline HTML page of a run's rollouts (tokens by weight) and curves"),
    "trace": ("flowtracer.tools.trace:main", "one response's flow: tokens by throughput, hubs, dominant paths"),
    "probe": ("flowtracer.tools.probe:main", "causal probe: mask 20% of the reasoning, regenerate the answer"),
    "attribution": ("flowtracer.tools.attribution:main", "credit scorers against the chains task's ground truth"),
}
LIGHTNING = ("fit", "validate")  # their subcommand name stays in argv: LightningCLI parses it


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"flowtracer {__version__}: RL with verifiable rewards and FlowTracer token credit.", "",
             "usage: flowtracer <subcommand> [options]   (flowtracer <subcommand> --help for its options)", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> int:
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"flowtracer {__version__}")
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"flowtracer: error: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = SUBCOMMANDS[name][0].split(":")
    entry = getattr(importlib.import_module(module), func)
    code = run_or_fail(f"flowtracer {name}", entry, argv if name in LIGHTNING else argv[1:])
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
