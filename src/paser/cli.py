"""The ``paser`` command: thin commands over the library.

Errors a user can fix print one line on stderr and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import typer

from paser.errors import ConfigError, PaserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Parsimonious segmentation: route each patch to the cheapest good model.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the synthetic battery set, check a dataset folder.")
app.add_typer(data_app, name="data")

_state = {"debug": False}

PRESET = typer.Option(None, "--preset", help="a shipped preset: battery-quick, battery-paper")
CONFIG = typer.Option(None, "--config", help="a YAML config file", exists=False)
RUN_DIR = typer.Option(..., "--run-dir", help="the run directory (config, checkpoints, metrics)")
OVERRIDES = typer.Argument(None, help="key=value overrides, e.g. stage1.epochs=5 data.root=/data")
RESUME = typer.Option(False, "--resume", help="continue from the last completed epoch")
DEVICES = typer.Option(None, "--devices", min=1, help="processes per node for data-parallel "
                       "training (GPUs; on CPU, processes over gloo); default the config's "
                       "distributed.devices (1)")
NUM_NODES = typer.Option(None, "--num-nodes", min=1, help="machines (launch the same command "
                         "on each; see README)")
PRECISION = typer.Option(None, "--precision", help="32-true, bf16-mixed or 16-mixed (CUDA)")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks on errors")) -> None:
    _state["debug"] = debug


def _config(preset: str | None, config: Path | None, overrides: list[str] | None, run_dir: Path,
            resume: bool):
    """The config a command runs with.

    ``--preset``/``--config`` (plus overrides) when given; otherwise the run's saved
    ``config.yaml`` (plus overrides), or ``battery-quick`` for a new run directory. With
    ``--resume`` and nothing else, ``None``: the stage reopens the saved config as it is.
    """
    from paser.config import load_config

    if preset or config:
        return load_config(preset=preset, config_file=config, overrides=overrides or [])
    saved = Path(run_dir) / "config.yaml"
    if resume and not overrides:
        return None
    if resume:
        raise PaserError("--resume continues with the run's saved config; drop the overrides "
                         "(or start a new --run-dir with them)")
    if saved.is_file():
        return load_config(config_file=saved, overrides=overrides or [])
    return load_config(preset="battery-quick", overrides=overrides or [])


def _train(step: str, fn, run_dir: Path, overrides, preset, config, resume: bool,
           devices, num_nodes, precision):
    """A training command: its config (with the distributed options), ``fn(cfg, run_dir,
    resume=...)``, then the step in the run's ledger for `paser run` to skip."""
    from paser.config import load_config
    from paser.run import record_stage
    from paser.train.common import is_main_process

    cfg = _distributed(_config(preset, config, overrides, run_dir, resume), run_dir, devices,
                       num_nodes, precision)
    out = fn(cfg, run_dir, resume=resume)
    if is_main_process():
        record_stage(run_dir, load_config(config_file=Path(run_dir) / "config.yaml"), step)
    return out


def _distributed(cfg, run_dir: Path, devices: int | None, num_nodes: int | None,
                 precision: str | None):
    """``cfg`` with the command line's --devices, --num-nodes, --precision (the saved config
    when resuming): how a stage is trained, not what, so a run may resume on other devices."""
    if devices is None and num_nodes is None and precision is None:
        return cfg
    from paser.config import DistributedConfig, load_config

    if cfg is None:
        cfg = load_config(config_file=Path(run_dir) / "config.yaml")
    d = cfg.distributed.model_dump()
    d.update({k: v for k, v in (("devices", devices), ("num_nodes", num_nodes),
                                ("precision", precision)) if v is not None})
    try:
        dist = DistributedConfig(**d)
    except ValueError as err:
        raise ConfigError(f"--precision {precision}: use 32-true, bf16-mixed or 16-mixed") \
            from err
    return cfg.model_copy(update={"distributed": dist})


@data_app.command("check")
def data_check(
    root: Path = typer.Argument(..., help="dataset folder"),
    layout: str = typer.Option(None, "--layout", help="folder, cityscapes or battery (default: "
                               "detected from what is in the folder)"),
    workers: int = typer.Option(2, "--workers", min=0, help="reader processes"),
) -> None:
    """Read every image and mask of a dataset folder; print the splits, the class
    frequencies and suggested class weights (a bad file is one error naming it)."""
    from paser.data.folders import check_dataset

    r = check_dataset(root, layout, workers)
    typer.echo(f"{r['root']}: {r['layout']} layout")
    for split, s in r["splits"].items():
        typer.echo(f"  {split:<11} {s['images']:>6} images of {s['size'][0]} x {s['size'][1]}, "
                   f"{s['channels']} channel{'s' if s['channels'] > 1 else ''}")
    typer.echo("class frequencies in the training masks (share of labelled pixels):")
    for (name, f), w in zip(r["class_fractions"].items(), r["suggested_class_weights"],
                            strict=True):
        typer.echo(f"  {name:<20} {100 * f:6.2f} %   weight {w:.4f}")
    typer.echo(f"  unlabelled pixels: {100 * r['unlabelled_fraction']:.2f} %")
    typer.echo(f"suggested (median frequency balancing): stage1.class_weights="
               f"[{', '.join(f'{w:g}' for w in r['suggested_class_weights'])}] "
               f"models.num_classes={len(r['class_names'])} "
               f"models.in_channels={r['splits']['train']['channels']}")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="output folder (battery layout)"),
    n_train: int = typer.Option(240, "--n-train", min=3),
    n_val: int = typer.Option(20, "--n-val", min=1),
    n_test: int = typer.Option(40, "--n-test", min=1),
    height: int = typer.Option(224, "--height", min=32),
    width: int = typer.Option(256, "--width", min=32),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(None, "--workers", min=1, help="processes (default: all cores)"),
) -> None:
    """Generate the synthetic battery micro-structure dataset (same seed, same bytes)."""
    from paser.data.synthetic import generate_dataset

    stats = generate_dataset(out, n_train, n_val, n_test, height, width, seed=seed,
                             workers=workers)
    frac = stats["fractions"]
    typer.echo(f"wrote {n_train + n_val + n_test} images to {out} in {stats['seconds']:.1f} s; "
               f"class fractions pore {frac['pore']:.3f}, carbon {frac['carbon']:.3f}, "
               f"nickel {frac['nickel']:.3f}")


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
                   "Stage 2: train the routing policy by REINFORCE on D_rl (needs stage 1).")
def _report_policy(summary: dict, run_dir: Path) -> None:
    val = summary["best_val"]
    typer.echo(f"stage 2 done: lam {summary['lam']}, best validation reward {val['reward']:+.4f}, "
               f"routed mIoU {val['miou']:.4f} (f0 alone {summary['val_f0_miou']:.4f}), "
               f"patches per model {', '.join(f'{f:.1%}' for f in val['fractions'])}")


@_training_command("finetune", "stage3", "paser.train.finetune:finetune",
                   "Stage 3: joint fine-tuning of f1..fK and the policy on D_ft (needs stage 2).")
def _report_finetune(summary: dict, run_dir: Path) -> None:
    best = summary["best"]
    if best is None:
        typer.echo("stage 3 done: no epoch improved on the starting point; kept it")
        return
    typer.echo(f"stage 3 done: validation routed mIoU {best['miou']:.4f} (f0 alone "
               f"{best['f0_miou']:.4f}), {best['gflops']:.3f} GFLOP/image, patches per model "
               f"{', '.join(f'{f:.1%}' for f in best['fractions'])}, TVD {best['tvd']:.3f}")


@_training_command("baselines", "baselines", "paser.baselines.monolithic:train_baselines",
                   "The paper's baselines: train every monolithic model and MatPhase on D_pre.")
def _report_baselines(roles: list[str], run_dir: Path) -> None:
    typer.echo(f"baselines trained: {', '.join(roles) or 'none configured'}; checkpoints in "
               f"{Path(run_dir) / 'checkpoints'}, metrics in "
               f"{Path(run_dir) / 'metrics' / 'baselines.jsonl'}")


@app.command()
def evaluate(
    run_dir: Path = RUN_DIR,
    split: str = typer.Option("test", "--split", help="validation or test"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0, help="processes reading images from "
                                "disk while the models run (0: read in this process)"),
) -> None:
    """Evaluate the trained pipeline on a split, beside f0 alone and each pool model alone.
    Images are streamed from disk; only counts are kept, never the predictions."""
    from paser import PaSeR
    from paser.cost import FLOP_CONVENTION
    from paser.data import open_split

    model = PaSeR.load(run_dir)
    data = open_split(model.config.data, split)
    name = "PaSeR" if model.calibration is None else "PaSeR (calibrated)"
    rows = [(name, model.evaluate(data, batch_size, num_workers=workers))]
    rows += [(f"f{k} on all patches" if k else "f0 (MC) alone",
              model.evaluate(data, batch_size, force_action=k, num_workers=workers))
             for k in range(model.router.num_models)]
    typer.echo(f"{split} split, {len(data)} images; GFLOP per image ({FLOP_CONVENTION}; f0's "
               f"{model.config.mc_samples} Monte Carlo passes included; the policy only in the "
               "PaSeR row, where it chose)")
    typer.echo(f"{'method':<20} {'mIoU':>7} {'GFLOP':>8} {'IoU/GFLOP':>10}  patches per model")
    for name, r in rows:
        typer.echo(f"{name:<20} {r['miou']:7.4f} {r['gflops']:8.3f} {r['iou_per_gflop']:10.4f}  "
                   + " ".join(f"{f:6.1%}" for f in r["fractions"]))


@app.command()
def segment(
    inputs: list[Path] = typer.Argument(..., help="image files or folders (PNG, TIFF, JPEG)"),
    run_dir: Path = RUN_DIR,
    out: Path = typer.Option(..., "--out", help="the output folder"),
    budget_gflops: float = typer.Option(
        None, "--budget-gflops", help="calibrate to this mean GFLOP per image for this call, "
        "instead of the run's saved calibration (not saved)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    engine: str = typer.Option("torch", "--engine", help="torch, or onnxruntime (the run's "
                               "`paser export`; CPU)"),
    onnx: Path = typer.Option(None, "--onnx", help="the export folder for --engine "
                              "onnxruntime; default <run-dir>/onnx"),
    remote: str = typer.Option(None, "--remote", help="URL of a `paser serve` process: f0 "
                               "and the policy run here, only patches routed to f1..fK are "
                               "sent there"),
    timeout: float = typer.Option(10.0, "--timeout", min=0.01,
                                  help="seconds per remote request"),
    retries: int = typer.Option(2, "--retries", min=0, help="further attempts per remote "
                                "request before its patches keep f0's prediction"),
) -> None:
    """Segment images with a trained run: label maps, overlays, routing maps, a JSON per
    image and summary.csv. A file that fails is reported and skipped; the exit status is
    then 1. With --remote, patches the remote tier cannot segment keep f0's prediction and
    are marked degraded; the run finishes."""
    from paser import PaSeR
    from paser.cost import FLOP_CONVENTION
    from paser.segment import find_images, segment_files
    from paser.train.common import progress

    files = find_images(inputs)
    if remote is not None and not remote.startswith(("http://", "https://")):
        raise ConfigError(f"--remote {remote}: give an http:// or https:// URL of a `paser "
                          "serve` process")
    if engine == "onnxruntime":
        model = PaSeR.load_onnx(run_dir, onnx, calibrated=budget_gflops is None)
    elif engine == "torch":
        model = PaSeR.load(run_dir, device=device, calibrated=budget_gflops is None)
    else:
        raise ConfigError(f"--engine {engine}: use torch or onnxruntime")
    if budget_gflops is not None:
        model.calibrate(budget_gflops=budget_gflops, save=False)
    if remote is not None:
        _connect_remote(model, remote, timeout, retries)
    with progress(len(files) > 1) as bar:
        task = bar.add_task("segment", total=len(files), info="")
        results = segment_files(model, files, out, on_done=lambda r: bar.update(
            task, advance=1, info=r.stem if r.ok else f"{r.stem} failed"))
    done = [r for r in results if r.ok]
    for r in results:
        if not r.ok:
            typer.echo(f"failed: {r.error}", err=True)
    if done:
        typer.echo(f"segmented {len(done)} of {len(results)} images into {out}: mean "
                   f"{sum(r.gflops for r in done) / len(done):.3f} GFLOP ({FLOP_CONVENTION}), "
                   f"{sum(r.ms for r in done) / len(done):.1f} ms per image; see "
                   f"{out / 'summary.csv'}")
    if remote is not None and done:
        sent, whole = sum(r.bytes_sent for r in done), sum(r.bytes_whole for r in done)
        typer.echo(f"remote {remote}: sent {sent / len(done):,.0f} bytes per image against "
                   f"{whole / len(done):,.0f} for the whole image ({sent / whole:.1%}); "
                   f"{sum(r.degraded for r in done)} patches degraded (kept f0's prediction)")
    if len(done) < len(results):
        typer.echo(f"{len(results) - len(done)} of {len(results)} images failed; listed in "
                   f"{out / 'summary.csv'}", err=True)
        raise typer.Exit(1)


def _connect_remote(model, url: str, timeout: float, retries: int) -> None:
    """Attach the remote tier; a server that does not answer yet is a warning (its patches
    fall back to f0 until it does), one serving other models an error."""
    import httpx

    pool = model.use_remote(url, timeout=timeout, retries=retries)
    try:
        info = pool.connect()
        typer.echo(f"remote tier {url}: " + ", ".join(
            f"{m['name']} ({m['arch']})" for m in info["models"]), err=True)
    except httpx.HTTPError as err:
        from paser.serve.client import _describe

        typer.echo(f"warning: remote tier {url} does not answer ({_describe(err)}); patches "
                   "routed to f1..fK keep f0's prediction, marked degraded, until it does",
                   err=True)


@app.command()
def serve(
    run_dir: Path = RUN_DIR,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    max_request_mb: float = typer.Option(32.0, "--max-request-mb", min=0.001,
                                         help="largest request body, MiB"),
    max_patches: int = typer.Option(4096, "--max-patches", min=1,
                                    help="most patches per request"),
    max_concurrency: int = typer.Option(1, "--max-concurrency", min=1,
                                        help="inferences running at once"),
    queue_timeout: float = typer.Option(30.0, "--queue-timeout", min=0.0, help="seconds a "
                                        "request may wait for its turn before a 503"),
) -> None:
    """Serve the run's pool models f1..fK over HTTP for `paser segment --remote`:
    GET /healthz, GET /v1/models, POST /v1/segment."""
    from paser.serve import _require

    _require()
    from paser.serve.server import MiB
    from paser.serve.server import serve as run_server

    run_server(run_dir, host, port, device, max_request_bytes=int(max_request_mb * MiB),
               max_patches=max_patches, max_concurrency=max_concurrency,
               queue_timeout=queue_timeout)


@app.command()
def export(
    run_dir: Path = RUN_DIR,
    out: Path = typer.Option(None, "--out", help="the export folder; default <run-dir>/onnx"),
    height: int = typer.Option(None, "--height", min=1, help="image height; default the "
                               "validation images'"),
    width: int = typer.Option(None, "--width", min=1, help="image width; default the "
                              "validation images'"),
) -> None:
    """Export f0 (Monte Carlo and deterministic), the policy and each pool model to ONNX
    with a dynamic batch size, and check onnxruntime against PyTorch."""
    from paser import PaSeR
    from paser.export import export_run, validation_size

    model = PaSeR.load(run_dir, device="cpu", calibrated=False)
    if height is None or width is None:
        h, w = validation_size(model.config)
        height, width = height or h, width or w
    out = out if out is not None else run_dir / "onnx"
    manifest = export_run(model, out, height, width)
    typer.echo(f"exported for {height} x {width} images (batch size dynamic) into {out}: "
               + ", ".join(manifest["files"].values()))
    typer.echo("largest |onnxruntime - PyTorch| on the deterministic parts: " + ", ".join(
        f"{k} {v:.2e}" for k, v in manifest["max_abs_error_vs_torch"].items()))


@app.command()
def calibrate(
    run_dir: Path = RUN_DIR,
    budget_gflops: float = typer.Option(None, "--budget-gflops",
                                        help="mean GFLOP per validation image to spend"),
    max_frac_large: float = typer.Option(None, "--max-frac-large",
                                         help="largest share of patches on the largest model"),
    iou_within_top: float = typer.Option(
        None, "--iou-within-top", help="validation mIoU within this of the largest model's "
        "alone, at the least GFLOP"),
    best_iou: bool = typer.Option(False, "--best-iou", help="with --budget-gflops: the best "
                                  "validation mIoU within the budget, not the most generous "
                                  "routing"),
    max_tvd: float = typer.Option(None, "--max-tvd", help="the least GFLOP whose assignment "
                                  "distribution is within this total variation of the "
                                  "policy's own (the paper's budget)"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
) -> None:
    """Find the bias on the policy's logits that meets a compute budget or a quality target
    on the validation split; save it in the run for `segment` and `evaluate`."""
    from paser import PaSeR
    from paser.cost import FLOP_CONVENTION

    model = PaSeR.load(run_dir, calibrated=False)  # a stale calibration is what gets replaced
    cal = model.calibrate(budget_gflops, max_frac_large, batch_size,
                          iou_within_top=iou_within_top, best_iou=best_iou, max_tvd=max_tvd)
    typer.echo(f"validation split, {cal.images} images of {cal.height} x {cal.width}; GFLOP per "
               f"image ({FLOP_CONVENTION})")
    target = ", ".join(f"{k} = {v:g}" for k, v in cal.target.items())
    typer.echo(f"target {target}; bias on the logits {[round(b, 4) for b in cal.bias]}")
    typer.echo(f"{'':<14} {'mIoU':>7} {'GFLOP':>8}  patches per model")
    for label, r in (("uncalibrated", cal.uncalibrated), ("calibrated", asdict(cal))):
        typer.echo(f"{label:<14} {r['miou']:7.4f} {r['gflops']:8.3f}  "
                   + " ".join(f"{f:6.1%}" for f in r["fractions"]))
    typer.echo(f"saved to {run_dir / 'calibration.json'}; `paser segment` and `paser evaluate` "
               "use it")


@app.command("run")
def run_all(
    run_dir: Path = RUN_DIR,
    overrides: list[str] = OVERRIDES,
    preset: str = PRESET,
    config: Path = CONFIG,
    force: bool = typer.Option(False, "--force", help="redo every step, even those done before"),
) -> None:
    """The main job: data, stages 1-3, baselines, evaluation and the report, in one go.

    Steps already done with the same config are skipped; an interrupted step resumes.
    """
    from paser.run import run

    run(_config(preset, config, overrides, run_dir, False), run_dir, force=force,
        echo=typer.echo)
    typer.echo(f"report: {run_dir / 'report.md'}; figures in {run_dir / 'figures'}")


experiment_app = typer.Typer(help="The paper's further experiments on a finished run.",
                             no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


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
    if len(samples) != 2 or min(samples) < 1:
        raise ConfigError(f"--samples {samples}: give two numbers of passes, each at least 1 "
                          "(e.g. --samples 5 --samples 20)")
    out = run_sensitivity(run_dir, lams, tuple(samples), epochs)
    typer.echo(f"{'lam':>5} {'mIoU':>7} {'mean cost':>10} {'GFLOP':>8}")
    for r in out["lam_sweep"]:
        typer.echo(f"{r['lam']:5g} {r['iou']:7.4f} {r['mean_cost']:10.4f} {r['gflops']:8.3f}")
    typer.echo(f"entropy T={samples[0]} vs T={samples[1]}: Welch p = {out['p_value']:.4f}")
    typer.echo(f"written to {run_dir / 'results.json'} (experiments.sensitivity), "
               f"{run_dir / 'report.md'} and {run_dir / 'figures'}")


@experiment_app.command("robustness")
def experiment_robustness(
    run_dir: Path = RUN_DIR,
    amount: float = typer.Option(0.01, "--amount", help="share of pixels hit by salt-and-pepper "
                                 "noise"),
    seed: int = typer.Option(None, "--seed", help="seed of the noise; default the run's seed"),
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
) -> None:
    """Print the resolved config (preset or file, then overrides) as JSON."""
    from paser.config import load_config

    cfg = load_config(preset=preset, config_file=config, overrides=overrides or [])
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    from paser.train.common import is_main_process

    if not is_main_process():  # a worker of distributed training: rank 0 reports
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(n) comes back as n
        if isinstance(code, int) and code:
            sys.exit(code)
    except PaserError as err:
        if _state["debug"]:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run with --resume to continue from the last epoch", err=True)
        sys.exit(130)
    except Exception as err:  # click usage errors and the like
        import click

        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        raise
