"""`flowtracer` entry point: LightningCLI (fit / validate / test) over GRPOModule and PromptDataModule.

    flowtracer fit --config experiments/quickstart.yaml
    flowtracer fit --config experiments/quickstart.yaml --trainer.max_steps 4 --model.seed 1
    flowtracer fit --config experiments/quickstart.yaml --print_config
    flowtracer fit --config experiments/quickstart.yaml --ckpt_path last   # resume the latest run
    flowtracer grid --config experiments/grid_quickstart.yaml   # ablation grid + report (flowtracer.tools.grid)
    flowtracer trace --model smollm2-135m-instruct --prompt "What is 3 + 4?"   (flowtracer.tools.trace)
    flowtracer probe --n 100                                    # causal masking probe (flowtracer.tools.probe)
    flowtracer sft --config experiments/sft_chains.yaml         # supervised warm start (flowtracer.sft)
    flowtracer attribution --config experiments/attribution_chains.yaml  # flow vs ground truth

A run writes under lightning_logs/<name>/version_N/: config.yaml (resolved), metrics.csv,
rollouts.jsonl and checkpoints/. A resumed run (`--ckpt_path last`, or a path inside a run folder)
continues in the folder of its checkpoint: metrics.csv and rollouts.jsonl go on where the
checkpoint left them (flowtracer.ckpt). Errors a user can cause end in one line naming the fix,
exit status 2, and are found before anything is written (flowtracer.checks; FLOWTRACER_DEBUG=1
shows the traceback).
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, RuntimeError)
# Config loggers of these classes get flowtracer's crash-safe drop-in (same arguments).
_CSV_LOGGERS = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger", "CSVLogger")
_SAFE_CSV = "flowtracer.csvlog.CSVLogger"


def _default_loggers(name: str = "run") -> list[dict]:
    loggers = [{"class_path": _SAFE_CSV,
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
        from lightning.pytorch.callbacks import RichProgressBar

        from flowtracer.ckpt import StepCheckpoint

        # StepCheckpoint = ModelCheckpoint that saves once the step's logs are on disk (crash-safe resume)
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 1,
                             "checkpoint.save_top_k": 0})
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")

    def before_instantiate_classes(self) -> None:
        # `--ckpt_path last` resumes the newest checkpoint of this run name.
        sub = self.config.get(self.subcommand) if self.subcommand else None
        if sub is None:
            return
        if sub.get("ckpt_path") == "last":
            sub["ckpt_path"] = _latest_checkpoint(sub)
        for lg in _loggers(sub):
            if lg.get("class_path") in _CSV_LOGGERS:
                lg["class_path"] = _SAFE_CSV
        if sub.get("ckpt_path"):
            _continue_run_folder(sub)

    def before_fit(self) -> None:
        # Every input check runs here, before Lightning writes config.yaml or opens a log folder.
        from flowtracer.checks import preflight

        cbs = [cb for cb in self.trainer.callbacks]
        preflight(self.model, self.datamodule, self.trainer.world_size, _rollout_callbacks(cbs))
        self.model.preflight_done = True


def _rollout_callbacks(callbacks):
    from flowtracer.credit.base import RolloutCallback

    return [cb for cb in callbacks if isinstance(cb, RolloutCallback)]


def _loggers(cfg) -> list:
    loggers = cfg["trainer"].get("logger") or []
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [lg for lg in loggers if hasattr(lg, "get") and lg.get("init_args") is not None]


def _continue_run_folder(cfg) -> None:
    """Resume into the run folder that holds the checkpoint (<save_dir>/<name>/version_N/checkpoints/),
    so metrics.csv and rollouts.jsonl continue instead of starting a new version_N+1."""
    ckpt = os.path.realpath(str(cfg["ckpt_path"]))
    run_dir = os.path.dirname(os.path.dirname(ckpt))
    version = os.path.basename(run_dir)
    for lg in _loggers(cfg):
        args = lg["init_args"]
        if args.get("version") is not None or not version.startswith("version_"):
            continue
        root = os.path.realpath(os.path.join(str(args.get("save_dir", "lightning_logs")), str(args.get("name") or "")))
        if os.path.dirname(run_dir) == root and version[len("version_"):].isdigit():
            args["version"] = int(version[len("version_"):])


def _latest_checkpoint(cfg) -> str:
    import glob

    first = next(iter(_loggers(cfg)), None)
    name = first["init_args"].get("name", "run") if first is not None else "run"
    save_dir = first["init_args"].get("save_dir", "lightning_logs") if first is not None else "lightning_logs"
    pattern = os.path.join(str(save_dir), str(name), "version_*", "checkpoints", "last.ckpt")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"--ckpt_path last: no {pattern} yet; start the run without --ckpt_path")
    return found[-1]


TOOLS = {"grid": "flowtracer.tools.grid", "trace": "flowtracer.tools.trace", "probe": "flowtracer.tools.probe",
         "attribution": "flowtracer.tools.attribution"}


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


def run_lightning_cli(cli_cls, module_cls, datamodule_cls, args: list[str] | None, name: str = "run") -> int:
    """LightningCLI with flowtracer's defaults; user errors end in one line and exit status 2."""
    from jsonargparse import ArgumentError

    trainer_defaults = {
        "logger": _default_loggers(name),
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "check_val_every_n_epoch": None,
    }
    try:
        # exit_on_error=False: a bad key or type raises, and is reported below in one line
        # instead of jsonargparse's full usage text
        no_exit = {"exit_on_error": False}
        cli_cls(module_cls, datamodule_cls, args=args, trainer_defaults=trainer_defaults,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={**no_exit, **{c: no_exit for c in ("fit", "validate", "test", "predict")}})
    except ArgumentError as err:
        if os.environ.get("FLOWTRACER_DEBUG"):
            raise
        msg = " ".join(str(err).split())
        print(f"flowtracer: error: config: {msg} (run `flowtracer fit --help` or --print_config to see "
              "every key and its type)", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as err:
        if os.environ.get("FLOWTRACER_DEBUG"):
            raise
        print(f"flowtracer: error: {err}", file=sys.stderr)
        sys.exit(2)
    return 0


def _quiet_warnings() -> None:
    import warnings

    # The module saves only after its optimizer steps; Lightning's generic manual-optimisation
    # advice about pre-step state does not apply.
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    # The data position is a function of the step (PromptDataModule.train_batch,
    # SFTDataModule.train_batch), not of the pacing dataloader, so resuming mid-epoch is exact.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in TOOLS:
        return _run_tool(argv[0], argv[1:])
    _quiet_warnings()
    if argv and argv[0] == "sft":  # supervised warm start (flowtracer.sft): fit's flags, SFT's module
        from flowtracer.sft import main as sft_main

        sft_main(argv[1:])
        return
    from flowtracer.data import PromptDataModule
    from flowtracer.module import GRPOModule

    run_lightning_cli(FlowtracerCLI, GRPOModule, PromptDataModule, args)


if __name__ == "__main__":
    main()
