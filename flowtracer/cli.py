"""`flowtracer` entry point: LightningCLI (fit / validate / test) over GRPOModule and PromptDataModule.

    flowtracer fit --config experiments/quickstart.yaml
    flowtracer fit --config experiments/quickstart.yaml --trainer.max_steps 4 --model.seed 1
    flowtracer fit --config experiments/quickstart.yaml --print_config
    flowtracer fit --config experiments/quickstart.yaml --ckpt_path last   # resume the latest run
    flowtracer grid --config experiments/grid_quickstart.yaml   # ablation grid + report (flowtracer.grid)
    flowtracer trace --model smollm2-135m-instruct --prompt "What is 3 + 4?"   (flowtracer.trace_view)
    flowtracer probe --n 100                                    # causal masking probe (flowtracer.probe)

A run writes under lightning_logs/<name>/version_N/: config.yaml (resolved), metrics.csv,
rollouts.jsonl and checkpoints/. Errors a user can cause end in one line naming the fix
(FLOWTRACER_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, RuntimeError)


def _default_loggers(name: str = "run") -> list[dict]:
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "lightning_logs", "name": name}}]
    try:
        import tensorboard  # noqa: F401

        loggers.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "lightning_logs", "name": name}})
    except ImportError:
        pass
    return loggers


class FlowtracerCLI(LightningCLI):
    """LightningCLI with flowtracer's defaults: CSV (+TensorBoard) logs, last.ckpt, rich progress."""

    def add_arguments_to_parser(self, parser) -> None:
        # Always on, configurable under `checkpoint.*` / `progress_bar.*`; `trainer.callbacks` stays
        # free for the credit arm, so swapping arms in YAML never drops checkpointing.
        from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 1,
                             "checkpoint.save_top_k": 0})
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")

    def before_instantiate_classes(self) -> None:
        # `--ckpt_path last` resumes the newest checkpoint of this run name.
        sub = self.config.get(self.subcommand) if self.subcommand else None
        if sub is not None and sub.get("ckpt_path") == "last":
            sub["ckpt_path"] = _latest_checkpoint(sub)


def _latest_checkpoint(cfg) -> str:
    import glob

    loggers = cfg["trainer"].get("logger") or []
    loggers = loggers if isinstance(loggers, list) else [loggers]
    name = next((lg["init_args"].get("name") for lg in loggers if isinstance(lg, dict)), "run")
    found = sorted(glob.glob(os.path.join("lightning_logs", str(name), "version_*", "checkpoints", "last.ckpt")),
                   key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"--ckpt_path last: no lightning_logs/{name}/version_*/checkpoints/last.ckpt "
                                "yet; start the run without --ckpt_path")
    return found[-1]


TOOLS = {"grid": "flowtracer.grid", "trace": "flowtracer.trace_view", "probe": "flowtracer.probe"}


def _run_tool(name: str, argv: list[str]) -> None:
    # The research tools have their own argparse front ends; fit/validate/test stay LightningCLI's.
    import importlib

    try:
        code = importlib.import_module(TOOLS[name]).main(argv)
    except USER_ERRORS as err:
        if os.environ.get("FLOWTRACER_DEBUG"):
            raise
        print(f"flowtracer {name}: error: {err}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)


def main(args: list[str] | None = None) -> None:
    import warnings

    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in TOOLS:
        return _run_tool(argv[0], argv[1:])

    # The module saves only after its optimizer steps; Lightning's generic manual-optimisation
    # advice about pre-step state does not apply.
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    from flowtracer.data import PromptDataModule
    from flowtracer.module import GRPOModule

    trainer_defaults = {
        "logger": _default_loggers(),
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "check_val_every_n_epoch": None,
    }
    try:
        FlowtracerCLI(GRPOModule, PromptDataModule, args=args, trainer_defaults=trainer_defaults,
                      save_config_kwargs={"overwrite": True})
    except USER_ERRORS as err:
        if os.environ.get("FLOWTRACER_DEBUG"):
            raise
        print(f"flowtracer: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
