"""The main job and the experiments: ``run``, ``experiment``, ``presets``, ``config``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from paser.cli.common import (
    CONFIG,
    OVERRIDES,
    PRESET,
    RUN_DIR,
    app,
    config_kept_on_error,
    experiment_app,
)


@app.command("run")
def run_all(
    run_dir: Path = RUN_DIR,
    overrides: list[str] = OVERRIDES,
    preset: str = PRESET,
    config: Path = CONFIG,
    force: bool = typer.Option(False, "--force", help="redo every step, even those done before"),
    resume: bool = typer.Option(False, "--resume", hidden=True),
) -> None:
    """The main job: data, stages 1-3, baselines, evaluation and the report, in one go.

    Steps already done with the same config are skipped; an interrupted step resumes.
    """
    from paser.config import resolve_config, unread_overrides
    from paser.errors import ConfigError
    from paser.run import run

    if resume:  # the stage commands' flag: paser run needs none
        raise ConfigError("paser run resumes by itself: run the same command again (without "
                          "--resume); it skips the steps done and resumes the interrupted one")

    with config_kept_on_error(run_dir):
        cfg = resolve_config(preset, config, overrides, run_dir)
        for note in unread_overrides(cfg, overrides or []):
            typer.echo(f"warning: {note}", err=True)
        run(cfg, run_dir, force=force, echo=typer.echo)
    typer.echo(f"report: {run_dir / 'report.md'}; figures in {run_dir / 'figures'}")


@app.command("compare")
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="the folders of finished runs (each with "
                                          "the results.json its report wrote)"),
    as_json: bool = typer.Option(False, "--json", help="print the comparison as JSON instead "
                                 "of markdown"),
) -> None:
    """Finished runs side by side (seeds of one setting, or settings): each headline figure
    per run, its mean, sd and range, and what the runs' configs differ in.

    Example: for s in 0 1 2; do paser run --preset battery-quick --run-dir runs/s$s seed=$s;
    done; paser compare runs/s0 runs/s1 runs/s2
    """
    from paser.experiments.compare import compare_runs, format_comparison

    result = compare_runs(run_dirs)
    typer.echo(json.dumps(result, indent=2) if as_json else format_comparison(result),
               nl=as_json)


@experiment_app.command("sensitivity")
def experiment_sensitivity(
    run_dir: Path = RUN_DIR,
    lams: list[float] = typer.Option(None, "--lam", help="a lam of the sweep (repeat the "
                                     "option); default 0, 0.1, ..., 0.9"),
    samples: list[int] = typer.Option(None, "--samples", help="the two numbers of Monte Carlo "
                                      "samples to compare (give it twice); default 5 and 20"),
    epochs: int = typer.Option(None, "--epochs", min=1, help="policy epochs per lam; default "
                               "stage2.epochs of the run"),
) -> None:
    """Sensitivity to lam (a policy per lam) and to T (Welch t-test), paper R5."""
    from paser.errors import ConfigError
    from paser.experiments.sensitivity import DEFAULT_LAMS, run_sensitivity

    lams = lams or list(DEFAULT_LAMS)
    samples = samples or [5, 20]
    if any(not 0.0 <= lam <= 1.0 for lam in lams):
        raise ConfigError(f"--lam {lams}: every lam must lie in [0, 1]")
    if len(samples) != 2 or min(samples) < 1 or samples[0] == samples[1]:
        raise ConfigError(f"--samples {samples}: give two different numbers of passes, each "
                          "at least 1 (e.g. --samples 5 --samples 20)")
    out = run_sensitivity(run_dir, lams, tuple(samples), epochs)
    from paser.cost import FLOP_CONVENTION
    from paser.experiments.report import p_text

    typer.echo(f"a policy per lam, greedy on the test split; GFLOP per image ({FLOP_CONVENTION}; "
               "f0's passes and the policy included); mean cost: the reward's c(a) per patch "
               f"({out['cost']})")
    typer.echo(f"{'lam':>5} {'mIoU':>7} {'mean cost':>10} {'GFLOP':>8}")
    for r in out["lam_sweep"]:
        typer.echo(f"{r['lam']:5g} {r['iou']:7.4f} {r['mean_cost']:10.4f} {r['gflops']:8.3f}")
    typer.echo(f"entropy T={samples[0]} vs T={samples[1]} (dropout {out['dropout']}; the run "
               f"routes with {out['run_dropout']}): Welch p = {p_text(out['p_value'])}")
    typer.echo(f"written to {run_dir / 'results.json'} (experiments.sensitivity), "
               f"{run_dir / 'report.md'} and {run_dir / 'figures'}")


@experiment_app.command("robustness")
def experiment_robustness(
    run_dir: Path = RUN_DIR,
    amount: float = typer.Option(0.01, "--amount", help="share of pixels hit by salt-and-pepper "
                                 "noise"),
    seed: int = typer.Option(None, "--seed", min=0, max=2**32 - 1,
                             help="seed of the noise; default the run's seed"),
    epochs: int = typer.Option(None, "--epochs", min=0, help="epochs of each noisy pool model; "
                               "default its stage-1 epochs"),
) -> None:
    """Robustness to salt-and-pepper noise: a noisy pool swapped into PaSeR, paper R3."""
    from paser.errors import ConfigError
    from paser.experiments.robustness import run_robustness

    if not 0.0 < amount <= 1.0:
        raise ConfigError(f"--amount {amount}: give the share of noisy pixels in (0, 1], "
                          "e.g. 0.01 for 1 %")
    out = run_robustness(run_dir, amount, seed, epochs)
    typer.echo(f"{'method':<14} {'IoU clean':>9} {'IoU noisy':>9} {'degr. %':>8} "
               f"{'above f0 clean -> noisy':>24}")
    for name, r in out["table"].items():
        up = (f"{100 * r['share_above_f0_clean']:.1f} % -> {100 * r['share_above_f0_noisy']:.1f} %"
              if "share_above_f0_clean" in r else "")
        typer.echo(f"{name:<14} {r['iou_clean']:9.4f} {r['iou_noisy']:9.4f} "
                   f"{r['degradation_pct']:8.2f} {up:>24}")
    typer.echo(f"written to {run_dir / 'results.json'} (experiments.robustness), "
               f"{run_dir / 'report.md'} and {run_dir / 'figures'}")


@app.command("presets")
def presets() -> None:
    """List the shipped presets."""
    from paser.config import list_presets

    typer.echo("\n".join(list_presets()))


@app.command("config")
def show_config(
    overrides: list[str] = OVERRIDES,
    preset: str = PRESET,
    config: Path = CONFIG,
    doc: bool = typer.Option(False, "--doc", help="print the reference of every key (type, "
                             "default, meaning) as markdown instead: docs/configuration.md"),
) -> None:
    """Print the resolved config (preset or file, then overrides) as JSON."""
    from paser.config import load_config, reference

    if doc:
        if preset or config or overrides:
            from paser.errors import ConfigError

            raise ConfigError("--doc prints the reference of every key, whatever the config: "
                              "drop --preset, --config and the overrides (or --doc)")
        typer.echo(reference(), nl=False)
        return
    cfg = load_config(preset=preset, config_file=config, overrides=overrides or [])
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
