"""The training commands: ``pretrain``, ``train-policy``, ``finetune``, ``baselines``."""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from paser.cli.common import (
    CONFIG,
    DEVICES,
    NUM_NODES,
    OVERRIDES,
    PRECISION,
    PRESET,
    RESUME,
    RUN_DIR,
    app,
    config_kept_on_error,
)


def _train(step: str, fn, run_dir: Path, overrides, preset, config, resume: bool,
           devices, num_nodes, precision):
    """A training command: its config (with the distributed options), ``fn(cfg, run_dir,
    resume=...)``, then the step in the run's ledger for `paser run` to skip."""
    from paser.checkpoints import checkpoint_files
    from paser.config import load_config, resolve_config, unread_overrides, with_distributed
    from paser.errors import ConfigError
    from paser.ranks import is_main_process
    from paser.run import record_stage, start_stage

    cfg = with_distributed(resolve_config(preset, config, overrides, run_dir, resume), run_dir,
                           devices, num_nodes, precision)
    saved = Path(run_dir) / "config.yaml"
    if step == "baselines" and not (preset or config or saved.is_file()):
        # the baselines are measured beside the run's own models: a config of their own
        # (the default preset, taken silently) would not be the one stage 1 later trains with
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml), so no config to "
                          "train the baselines with; give one: paser baselines --run-dir "
                          f"{run_dir} --preset NAME (or --config FILE), or train stage 1 into "
                          f"it first: paser pretrain --run-dir {run_dir} --preset NAME")
    if cfg is not None and step in ("stage1", "baselines") and is_main_process():
        for note in unread_overrides(cfg, overrides or [], pool=step == "stage1",
                                     baselines=step == "baselines"):
            typer.echo(f"warning: {note}", err=True)

    def weights() -> dict:  # the models' files (not the records beside them)
        return {k: v for k, v in checkpoint_files(run_dir).items() if k.endswith(".pt")}

    before = weights()
    if step in ("stage2", "stage3") and not saved.is_file():  # they read stage 1's models
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml); train stage 1 "
                          f"into it first: paser pretrain --run-dir {run_dir}, or paser run")
    with config_kept_on_error(run_dir):
        if cfg is not None or saved.is_file():
            from paser.train.distributed import check_devices

            # before the ledger reads (or generates) the data; stages 2 and 3 train in
            # 32-bit on the CPU, whatever the precision says
            stage_cfg = cfg or load_config(config_file=saved)
            check_devices(stage_cfg, "32-true" if step in ("stage2", "stage3") else None)
            if is_main_process():
                start_stage(run_dir, stage_cfg, step)
        out = fn(cfg, run_dir, resume=resume)
    if is_main_process():  # a resume that found the stage finished changed nothing
        record_stage(run_dir, load_config(config_file=Path(run_dir) / "config.yaml"), step,
                     changed=not (resume and before and weights() == before))
    return out


def _training_command(name: str, step: str, train: str, doc: str, **settings):
    """Register a training command: the options every stage shares, :func:`_train` with the
    library function ``train`` ("module:function", imported when the command runs), then
    the decorated function, which reports the result: ``report(result, run_dir)``."""

    def register(report):
        def command(
            run_dir: Path = RUN_DIR,
            overrides: list[str] = OVERRIDES,
            preset: str = PRESET,
            config: Path = CONFIG,
            resume: bool = RESUME,
            devices: int = DEVICES,
            num_nodes: int = NUM_NODES,
            precision: str = PRECISION,
        ) -> None:
            module, _, function = train.partition(":")
            fn = getattr(importlib.import_module(module), function)
            report(_train(step, fn, run_dir, overrides, preset, config, resume, devices,
                          num_nodes, precision), run_dir)

        command.__doc__ = doc
        app.command(name, **settings)(command)
        return report

    return register


@_training_command("pretrain", "stage1", "paser.train.pretrain:pretrain",
                   "Stage 1: train f1..fK on patches, then f0 with distillation from fK.",
                   context_settings={"allow_extra_args": False})
def _report_pretrain(summary: dict, run_dir: Path) -> None:
    typer.echo(f"stage 1 done ({summary['flop_convention']}):")
    for role, m in summary["models"].items():
        typer.echo(f"  {role} {m['name']:<12} params {m['parameters']:>11,}  "
                   f"GFLOP/image {m['gflops_per_image']:8.3f}  val mIoU {m['validation_miou']:.4f}"
                   f"  test mIoU {m['test_miou']:.4f}")
    typer.echo(f"summary: {Path(run_dir) / 'stage1.json'}")


@_training_command("train-policy", "stage2", "paser.train.policy:train_policy",
                   "Stage 2: train the routing policy on D_rl, f0 and the pool frozen (needs stage 1).")
def _report_policy(summary: dict, run_dir: Path) -> None:
    val = summary["best_val"]
    typer.echo(f"stage 2 done: lam {summary['lam']}, best validation reward {val['reward']:+.4f}, "
               f"routed mIoU {val['miou']:.4f} (f0 alone {summary['val_f0_miou']:.4f}), "
               f"patches per model {', '.join(f'{f:.1%}' for f in val['fractions'])}")


@_training_command("finetune", "stage3", "paser.train.finetune:finetune",
                   "Stage 3: joint fine-tuning of f1..fK and the policy on D_ft (needs stage 2).")
def _report_finetune(summary: dict, run_dir: Path) -> None:
    best = summary["best"]
    if summary.get("epochs") == 0:
        typer.echo("stage 3 is off in this config (stage3.epochs: 0): the policy and the pool "
                   "stay as stage 2 left them")
        return
    if best is None:
        typer.echo("stage 3 done: no epoch improved on the starting point; kept it")
        return
    from paser.cost import FLOP_CONVENTION

    typer.echo(f"stage 3 done: validation routed mIoU {best['miou']:.4f} (f0 alone "
               f"{best['f0_miou']:.4f}), {best['gflops']:.3f} GFLOP/image ({FLOP_CONVENTION}), "
               "patches per model "
               f"{', '.join(f'{f:.1%}' for f in best['fractions'])}, TVD {best['tvd']:.3f}")


@_training_command("baselines", "baselines", "paser.baselines.monolithic:train_baselines",
                   "The paper's baselines: train every monolithic model and MatPhase on D_pre.")
def _report_baselines(roles: list[str], run_dir: Path) -> None:
    typer.echo(f"baselines trained: {', '.join(roles) or 'none configured'}; checkpoints in "
               f"{Path(run_dir) / 'checkpoints'}, metrics in "
               f"{Path(run_dir) / 'metrics' / 'baselines.jsonl'}")
