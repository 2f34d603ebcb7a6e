"""Using a trained run: ``evaluate``, ``segment``, ``serve``, ``export``, ``calibrate``."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import typer

from paser.cli.common import RUN_DIR, app, state, working
from paser.errors import ConfigError, DataError


def data_note(model, run_dir: Path, split: str) -> None:
    """Say (on stderr) when the data's files changed since the run trained on them, and
    how many of ``split``'s it trained on (:func:`paser.data.identity.since_trained`)."""
    from paser.data.identity import since_trained

    note = since_trained(model.config.data, run_dir, split)
    if note:
        typer.echo(f"note: {note}", err=True)


@app.command()
def evaluate(
    run_dir: Path = RUN_DIR,
    split: str = typer.Option("test", "--split", help="test, validation or train"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    workers: int = typer.Option(None, "--workers", min=0, help="processes reading images "
                                "from disk while the models run (0: read in this process); "
                                "default 0 on 2 cores or fewer, else 2"),
    cap_per_mp: float = typer.Option(
        None, "--max-gflops-per-mp", help="hold every image to this cap, as `paser segment "
        "--max-gflops-per-mp` does: what it costs in mIoU"),
) -> None:
    """Evaluate the trained pipeline on a split, beside f0 alone and each pool model alone.

    Images are streamed from disk; only counts are kept, never the predictions."""
    from paser import PaSeR
    from paser.cost import FLOP_CONVENTION
    from paser.data import open_split
    from paser.data.registry import kind
    from paser.data.stages import as_tiles
    from paser.data.tiles import Tiles, counted
    from paser.runtime import default_workers, progress

    workers = default_workers() if workers is None else workers
    model = PaSeR.load(run_dir)
    if cap_per_mp is not None:
        _capped(model, cap_per_mp)
    if kind(model.config.data).build is not None:  # noisy MNIST: built in memory, no files
        data = built_split(model.config.data, split)
        size = tuple(data.images.shape[-2:])
    else:
        files = open_split(model.config.data, split, channels=model.config.models.in_channels)
        data_note(model, run_dir, split)
        files.intensity = model.intensity  # as the run reads its inputs, whatever the data now
        data = as_tiles(model.config.data, files, model.config.grid)
        if model.routed_size(*data.size) != data.size:  # data.tile auto, images of another
            # size than stage 1's: in its tiles, as PaSeR.evaluate and paser segment cut them
            data = Tiles(files, model.tile)
        size = data.size
    name = "PaSeR" if model.calibration is None else "PaSeR (calibrated)"
    if cap_per_mp is not None:
        name += f", capped at {cap_per_mp:g} GFLOP/MP"
    cfg = model.config
    once = cfg.mc_dropout == "none"  # f0 runs one deterministic pass
    methods = [(name, None), *((f"f{k} on all patches" if k else
                                "f0 alone" if once else "f0 (MC) alone", k)
                               for k in range(model.router.num_models))]
    rows = []
    with progress() as bar:
        for label, k in methods:
            task = bar.add_task(label, total=len(data), info="")
            rows.append((label, model.evaluate(
                data, batch_size, model=k, num_workers=workers,
                on_batch=lambda n, task=task: bar.advance(task, n))))
    passes = ("one deterministic pass" if once else f"{cfg.mc_samples} Monte Carlo pass"
              + ("es" if cfg.mc_samples > 1 else ""))
    held, unit = counted(data.ids, size)
    typer.echo(f"{split} split, {held}; GFLOP per {unit} "
               f"({FLOP_CONVENTION}; f0's "
               f"{passes} in the PaSeR and f0 rows, the "
               "policy in the PaSeR row; a pool model alone on every patch otherwise, as in "
               "the report)")
    if model.calibration is not None:
        typer.echo(f"PaSeR calibrated on validation to {model.calibration.target_text()} "
                   "(calibration.json)")
    wide = max(20, *(len(label) for label, _ in rows))
    typer.echo(f"{'method':<{wide}} {'mIoU':>7} {'GFLOP':>8} {'IoU/GFLOP':>10}  patches per model")
    for name, r in rows:
        typer.echo(f"{name:<{wide}} {r['miou']:7.4f} {r['gflops']:8.3f} {r['iou_per_gflop']:10.4f}  "
                   + " ".join(f"{f:6.1%}" for f in r["fractions"]))
    if cap_per_mp is not None:
        most = rows[0][1]["gflops_max"]
        typer.echo(f"the dearest {unit} under PaSeR spent {most:.3f} GFLOP" + (
            f" ({most / (size[0] * size[1] / 1e6):.2f} GFLOP/MP; the cap "
            f"{cap_per_mp:g})" if size else f" (the cap {cap_per_mp:g} GFLOP/MP)"))
    typer.echo("\nIoU of each class (n/a: neither labelled nor predicted in the split)")
    heads = [name.split(" ")[0] for name, _ in rows]
    typer.echo(f"{'class':<20} " + " ".join(f"{h:>8}" for h in heads))
    from paser.experiments.main import class_names

    names = class_names(model) or [f"class {c}" for c in range(len(rows[0][1]["per_class"]))]
    for c, cls in enumerate(names):
        typer.echo(f"{cls[:20]:<20} " + " ".join(
            "     n/a" if r["per_class"][c] is None else f"{r['per_class'][c]:8.4f}"
            for _, r in rows))


def built_split(cfg, split: str):
    """``split`` of a dataset built in memory (noisy MNIST), as the run trained and
    measured it: its test or validation split, or for train D_pre, D_rl and D_ft together
    (:class:`paser.data.Tensors`)."""
    import torch

    from paser.data import Tensors
    from paser.data.registry import SPLITS, kind
    from paser.errors import DataError

    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    built = kind(cfg).build(cfg)
    if split != "train":
        return getattr(built, split)
    parts = (built.pre, built.rl, built.ft)
    groups = [p.groups for p in parts]
    return Tensors(torch.cat([p.images for p in parts]), torch.cat([p.masks for p in parts]),
                   [i for p in parts for i in p.ids],
                   None if any(g is None for g in groups) else torch.cat(groups),
                   parts[0].group_names)


#: tiles of one image from which `paser segment` shows their progress too (a 512 x 512
#: image under the demo's 128 x 128 tiles)
TILE_BAR = 16


@app.command()
def segment(
    ctx: typer.Context,
    inputs: list[Path] = typer.Argument(..., help="image files or folders (PNG, TIFF, JPEG, BMP), volumes"),
    run_dir: Path = RUN_DIR,
    out: Path = typer.Option(..., "--out", help="the output folder"),
    budget_gflops: float = typer.Option(
        None, "--budget-gflops", help="calibrate to this mean GFLOP per validation image for "
        "this call, instead of the run's saved calibration (not saved)"),
    budget_per_mp: float = typer.Option(
        None, "--budget-gflops-per-mp", help="the same budget per megapixel, for images of "
        "any size (they pay for the run's tiles they are cut into: a size that is not a "
        "multiple of the tile pays for its padding too)"),
    cap_per_mp: float = typer.Option(
        None, "--max-gflops-per-mp", help="a cap no image passes, in GFLOP per megapixel "
        "(each tile of a large image held to it; a size that is not a multiple of the tile "
        "pays for its padding too): the patches the policy values least per GFLOP leave the "
        "dearer models first; a budget is a mean, some images spend more"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    engine: str = typer.Option("torch", "--engine", help="torch, or onnxruntime (the run's "
                               "`paser export`; CPU)"),
    onnx: Path = typer.Option(None, "--onnx", help="the export folder for --engine "
                              "onnxruntime; default <run-dir>/onnx"),
    remote: str = typer.Option(None, "--remote", help="URL of a `paser serve` process: f0 "
                               "and the policy run here, only patches routed to f1..fK are "
                               "sent there"),
    timeout: float = typer.Option(10.0, "--timeout", min=0.01, max=3600.0,
                                  help="seconds per remote request"),
    retries: int = typer.Option(2, "--retries", min=0, max=10, help="further attempts per "
                                "remote request before its patches keep f0's prediction "
                                "(0.25 s, then twice as long each time, at most 8 s)"),
    only: str = typer.Option(None, "--model", help="run one model alone on every image "
                             "instead of routing (f0, f1, ...), to compare on your images"),
    workers: int = typer.Option(None, "--workers", min=0, help="processes reading and "
                                "writing images while the models run (0: all in this "
                                "process); default 0 on 2 cores or fewer, else 2"),
    token_file: Path = typer.Option(None, "--token-file", help="with --remote: the file "
                                    "holding the server's token (default: $PASER_TOKEN)"),
    ca_file: Path = typer.Option(None, "--ca-file", help="with an https:// --remote: the "
                                 "private CA's certificate (PEM) that signed the server's "
                                 "certificate"),
    overwrite: bool = typer.Option(False, "--overwrite", help="segment every input again; "
                                   "without it, a call on the same --out (same run and "
                                   "settings) skips what an earlier one finished"),
    stack: bool = typer.Option(False, "--stack", help="each folder given is one volume of "
                               "slices (natural sort), not a set of images"),
    previews: bool = typer.Option(True, "--previews/--no-previews", help="an image's overlay "
                                  "and routing map beside its labels (on 2 CPU cores a "
                                  "sixth of a 4,096 x 4,096 image's time)"),
    chunk: int = typer.Option(16, "--chunk", min=1, help="slices of a volume read, "
                              "segmented and written together: the zarr output's chunk "
                              "along the slices, and one task with --scheduler"),
    threads: int = typer.Option(None, "--threads", min=1, help="threads of each model call, "
                                "here and on every --scheduler worker (default: all cores "
                                "here, a worker's own threads there); runs with equal threads "
                                "give byte-identical labels"),
    scheduler: str = typer.Option(None, "--scheduler", help="run on a Dask cluster: "
                                  "tcp://host:8786 (a running scheduler) or local:N (N "
                                  "worker processes here); needs the dask extra: pip "
                                  "install 'paser[dask]'"),
) -> None:
    """Segment images and volumes with a trained run; interrupted, the same command resumes.

    Per image: a label map, an overlay, a routing map, a JSON and a line of summary.csv; per
    volume (multi-page TIFF, .zarr, file.h5:/key, --stack folder) a label volume and a JSON,
    slice by slice. A file that fails is reported and skipped; the exit status is then 1.
    With --remote, patches the remote tier cannot segment keep f0's prediction and are
    marked degraded; the run finishes. --overwrite starts over. With --scheduler, chunks of
    slices and batches of images run on the Dask cluster's workers (each loads the run once;
    they need the same paths), with the same outputs."""
    from paser import PaSeR
    from paser.cost import FLOP_CONVENTION
    from paser.data.images import skipped_note, unread_files
    from paser.runtime import OUT_LOCK, default_workers, hold_folder, progress
    from paser.segment import claim_for, claim_of, segment_files
    from paser.volumes import split_inputs

    if overwrite:  # stopped before it started the folder over, it has nothing to go on with
        state["overwriting"] = (out, claim_of(out))

    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: a file, not a folder; give a folder for the outputs")
    if (out / "config.yaml").is_file() and (out / "checkpoints").is_dir():
        # an input named results.png or calibration.tif would write over the run's own files
        raise DataError(f"--out {out}: a run directory (config.yaml, checkpoints/); the "
                        "outputs, named by the inputs (<stem>.json, <stem>_labels.png), would "
                        "lie among its files and could replace them (results.json, "
                        f"calibration.json): give them a folder of their own, e.g. "
                        f"{out / 'segmented'}")
    files, volumes = split_inputs([str(i) for i in inputs], stack, exclude=out,
                                  keep_failed=True)
    skipped = skipped_note([f for i in inputs if Path(i).is_dir()
                            for f in unread_files(Path(i), recursive=not stack)])
    if skipped:
        typer.echo(skipped)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if scheduler is not None and remote is not None:
        raise ConfigError("--remote splits each image between this machine and a server; "
                          "--scheduler spreads whole chunks over a cluster: use one of them")
    if only is not None and remote is not None:
        raise ConfigError(f"--model {only} runs one model here; drop --remote (or --model)")
    if budget_gflops is not None and budget_per_mp is not None:
        raise ConfigError("give one budget: --budget-gflops (per validation image) or "
                          "--budget-gflops-per-mp")
    budgeted = budget_gflops is not None or budget_per_mp is not None
    if only is not None and (budgeted or cap_per_mp is not None):
        option = ("--max-gflops-per-mp" if not budgeted else "--budget-gflops"
                  if budget_per_mp is None else "--budget-gflops-per-mp")
        raise ConfigError(f"--model {only} runs one model alone, at its own cost: "
                          f"drop {option} (which sets the router's), or --model")
    if engine == "onnxruntime" and device not in ("auto", "cpu"):
        raise ConfigError(f"--device {device}: --engine onnxruntime runs on the CPU "
                          "(onnxruntime's CPU provider); drop --device, or use --engine torch")
    if onnx is not None and engine != "onnxruntime":
        raise ConfigError(f"--onnx {onnx} is the export --engine onnxruntime reads; add "
                          "--engine onnxruntime, or drop --onnx")
    if remote is not None and not remote.startswith(("http://", "https://")):
        raise ConfigError(f"--remote {remote}: give an http:// or https:// URL of a `paser "
                          "serve` process")
    if remote is None and (token_file is not None or ca_file is not None):
        raise ConfigError("--token-file and --ca-file go with --remote URL")
    # they have defaults, so only the command line tells them given: without --remote (left
    # out, or on a line of its own) the call ran every model here and said nothing of it
    given = [f"--{name}" for name in ("timeout", "retries")
             if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]
    if remote is None and given:
        verb = "set" if len(given) > 1 else "sets"
        raise ConfigError(f"{' and '.join(given)} {verb} the requests to a --remote server, and "
                          "none is given: add --remote URL (f1..fK then run there), or drop "
                          f"{' and '.join(given)} to run every model here")
    if ca_file is not None and not remote.startswith("https://"):
        raise ConfigError(f"--ca-file is for an https:// --remote; {remote} is plain HTTP")
    token = None
    if remote is not None:
        from paser.serve import read_token, require_serve_extra

        require_serve_extra()  # before the run loads
        token = read_token(token_file)
    if engine == "onnxruntime":
        model = PaSeR.load_onnx(run_dir, onnx, calibrated=not budgeted)
    elif engine == "torch":  # with a cluster, the workers segment: this one only reads
        model = PaSeR.load(run_dir, device="cpu" if scheduler else device,
                           calibrated=not budgeted)
    else:
        raise ConfigError(f"--engine {engine}: use torch or onnxruntime")
    if budgeted:
        data_note(model, run_dir, "validation")
        cal, (held, unit) = _calibrated(
            model, "calibrating to the budget on the validation split",
            budget_gflops=budget_gflops, save=False, budget_gflops_per_mp=budget_per_mp)
        typer.echo(f"calibrated for this call on the validation split's {held}: "
                   f"{cal.gflops:.3f} GFLOP per {unit} "
                   f"({cal.per_megapixel(cal.gflops):.2f} GFLOP/MP), validation mIoU "
                   f"{cal.miou:.4f}; {sizes_pay(model)}")
        _above_dearest(cal)
    if cap_per_mp is not None:
        _capped(model, cap_per_mp)
    if remote is not None:
        _connect_remote(model, remote, timeout, retries, token, ca_file)
    k = None if only is None else _model_index(only, model.router.num_models)
    results, vol_results = [], []
    start = time.perf_counter()
    # this call's folder from its volumes to its images (a second call started between them
    # would take it)
    hold_folder(out, OUT_LOCK, "--out")
    if scheduler is not None:
        from paser.cluster import RunSpec

        # calibrated and capped here (above), once: the workers route with this model's
        # calibration and cap (segment_on_cluster puts them in the spec)
        spec = RunSpec(str(Path(run_dir).resolve()), device, engine,
                       None if onnx is None else str(Path(onnx).resolve()), threads=threads)
        results, vol_results, image_seconds = _on_cluster(
            scheduler, spec, model, files, volumes, out, k, overwrite, chunk, previews)
        files = []  # done there
    else:
        # claimed before any bar opens: a refusal is its error alone (claim_for reads the
        # run's classes.yaml first); the calls that segment then find it claimed
        claim_for(out, model, k, overwrite, files, volumes)
        if volumes:
            vol_results = _segment_volumes(model, volumes, out, k, chunk)
    with progress(bool(files)) as bar:
        task = bar.add_task("segment", total=len(files), info="")
        tiles: dict = {}  # a large image's own bar, over its tiles
        fresh = [0]  # images this call segmented: those of an earlier call cost no time
        if scheduler is None:
            start = time.perf_counter()

        def done(r):
            if r.stem in tiles:  # an image that failed part of the way through its tiles
                bar.remove_task(tiles.pop(r.stem))
            fresh[0] += not r.resumed
            rate = (_rate(fresh[0], time.perf_counter() - start) + "  ") if fresh[0] else ""
            bar.update(task, advance=1, info=f"{rate}{r.stem if r.ok else r.stem + ' failed'}")

        def on_tiles(stem: str, finished: int, total: int) -> None:
            if total < TILE_BAR:
                return
            if stem not in tiles:
                tiles[stem] = bar.add_task(f"  {stem}: tiles", total=total, info="")
            bar.update(tiles[stem], completed=finished)
            if finished == total:
                bar.remove_task(tiles.pop(stem))

        if files:  # the folder was claimed (and started over) above
            results = segment_files(model, files, out, on_done=done, only=k,
                                    workers=default_workers() if workers is None else workers,
                                    previews=previews, on_tiles=on_tiles)
    # the images' own time: on a cluster, not its start nor the volumes sent after them
    seconds = time.perf_counter() - start if scheduler is None else image_seconds
    done = [r for r in results if r.ok]
    resumed = sum(r.resumed for r in results)
    new = len(results) - resumed
    if resumed:
        typer.echo(f"{resumed} of {len(results)} images were segmented before into {out} "
                   "(same run and settings): skipped; --overwrite does them again")
    for r in results:
        if not r.ok:
            typer.echo(f"failed: {r.error}", err=True)
    if done:
        gflops = sum(r.gflops for r in done)
        megapixels = sum(r.height * r.width for r in done) / 1e6
        now = len(done) - resumed
        typer.echo(f"{len(done)} of {len(results)} images segmented in {out} ("
                   + (f"{now} now, {resumed} before" if resumed else "all now") + "): mean "
                   f"{gflops / len(done):.3f} GFLOP per image"
                   + (f", {gflops / megapixels:.2f} GFLOP/MP" if megapixels > 0 else "")
                   + (f", capped at {cap_per_mp:g}" if cap_per_mp is not None else "")
                   + f" ({FLOP_CONVENTION}), {sum(r.ms for r in done) / len(done):.1f} ms per "
                   "image" + ("" if k is None else f", {model_names(model)[k]} alone")
                   + (f"; {_rate(new, seconds)} with reading and writing" if new else "")
                   + f"; see {out / 'summary.csv'}")
        _dim_line([r.notes for r in done], "images", lambda: "summary.csv's notes")
        if budget_per_mp is not None and megapixels > 0:
            _padding_note(model, done, gflops / megapixels, budget_per_mp)
        if cap_per_mp is not None:
            _cap_note(model, done, cap_per_mp)
    # (an image an earlier call segmented without --remote sent nothing, and says so)
    sent_by = [r for r in done if r.bytes_sent is not None]
    if remote is not None and sent_by:
        sent, whole = sum(r.bytes_sent for r in sent_by), sum(r.bytes_whole for r in sent_by)
        typer.echo(f"remote {remote}: sent {sent / len(sent_by):,.0f} bytes per image against "
                   f"{whole / len(sent_by):,.0f} for the whole image ({sent / whole:.1%}); "
                   f"{sum(r.degraded for r in done)} patches degraded (kept f0's prediction)"
                   + (f" ({len(done) - len(sent_by)} segmented before without --remote)"
                      if len(sent_by) < len(done) else ""))
        errors = [e for r in done for e in r.remote_errors]
        if errors:
            typer.echo(f"  why: {_remote_why(errors)}; the same command again redoes those "
                       "images", err=True)
    failed_volumes = [r for r in vol_results if r.record is None]
    if len(done) < len(results):
        typer.echo(f"{len(results) - len(done)} of {len(results)} images failed; listed in "
                   f"{out / 'summary.csv'}", err=True)
    if failed_volumes:
        typer.echo(f"{len(failed_volumes)} of {len(vol_results)} volumes failed; listed in "
                   f"{out / 'volumes.csv'}", err=True)
    if len(done) < len(results) or failed_volumes:
        raise typer.Exit(1)


@contextmanager
def _slices_bar(total: int, name: str):
    """One progress bar over ``total`` slices (an image is one): slices/s and megavoxels/s
    of this call's work; yields ``advance(slices, voxels, what)``, ``voxels`` 0 for slices
    an earlier call did (they move the bar, not the rates)."""
    from paser.runtime import progress

    with progress() as bar:
        task = bar.add_task(name, total=total, info="")
        start, voxels, slices = time.perf_counter(), [0], [0]

        def advance(n: int, v: int, what: str = "") -> None:
            voxels[0] += v
            slices[0] += n if v else 0
            dt = max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=n, info=f"{slices[0] / dt:.1f} slices/s  "
                       f"{voxels[0] / 1e6 / dt:.2f} megavoxels/s  {what}")

        yield advance


def _on_cluster(scheduler: str, spec, model, files, volumes, out: Path, k: int | None,
                overwrite: bool, chunk: int, previews: bool) -> tuple[list, list, float]:
    """The images and volumes on a Dask cluster (:mod:`paser.cluster`), one progress bar
    over all slices and images; a line per volume, and the workers that took part. Returns
    the images' and the volumes' outcomes and the images' seconds."""
    import torch

    from paser.cluster import connect, segment_on_cluster
    from paser.segment import claim_for

    total = sum(v.depth for v in volumes) + len(files)
    with connect(scheduler) as client:
        info = client.scheduler_info()["workers"].values()
        typer.echo(f"Dask cluster {scheduler}: {_count(len(info), 'worker')}; "
                   f"{_count(len(volumes), 'volume')}, {_count(len(files), 'image')}")
        if not info:  # (dask-jobqueue's workers, say, still queued): not hung, waiting
            typer.echo(f"the scheduler has no workers yet: the tasks wait for them (`dask "
                       f"worker {scheduler}`, or scale the cluster); Ctrl-C stops, and the "
                       "same command goes on from there")
        used = {spec.threads} if spec.threads else {w["nthreads"] for w in info}
        if used and used != {torch.get_num_threads()}:
            typer.echo(f"model calls run on {'/'.join(map(str, sorted(used)))} thread(s) there, "
                       f"{torch.get_num_threads()} in a local run here: labels can differ in "
                       f"a few voxels per slice (PyTorch adds in another order); --threads "
                       f"{torch.get_num_threads()} makes them byte-identical")
        # claimed once the scheduler answered (one that does not leaves the folder free),
        # before the bar opens
        claim_for(out, model, k, overwrite, files, volumes)
        with _saying_kept(), _slices_bar(total, "cluster") as advance:
            res = segment_on_cluster(client, spec, model, files, volumes, out, only=k,
                                     chunk=chunk, on_progress=advance, previews=previews)
    _volume_lines(res.volumes, out, model.tile)
    if res.workers:
        typer.echo(f"segmented by {_count(len(res.workers), 'worker')}: "
                   f"{', '.join(res.workers)} (each record names its worker)")
    else:  # every image and chunk was done by an earlier call into this folder
        typer.echo("no worker had anything to do: every image and slice was segmented "
                   f"before, into {out} (--overwrite starts over)")
    return res.images, res.volumes, res.image_seconds


def _segment_volumes(model, volumes, out: Path, k: int | None, chunk: int) -> list:
    """The volumes, one progress bar over all their slices (slices/s, megavoxels/s), and
    a line each."""
    from paser.volumes import segment_volumes

    with _saying_kept(), _slices_bar(sum(v.depth for v in volumes), "volumes") as advance:
        results = segment_volumes(model, volumes, out, only=k, chunk=chunk,
                                  on_slices=advance)
    _volume_lines(results, out, model.tile)
    return results


@contextmanager
def _saying_kept():
    """A volume stopped part-way (:class:`paser.volumes.VolumeInterrupted`, here or on a
    cluster): the line Ctrl-C prints says how many of its slices are kept. Typer makes the
    interruption exit status 130, which drops the exception: its message goes by ``state``."""
    from paser.volumes import VolumeInterrupted

    try:
        yield
    except VolumeInterrupted as err:
        state["kept"] = str(err)
        raise


def _count(n: int, thing: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _volume_lines(results, out: Path, tile: tuple[int, int] | None = None) -> None:
    """A line per volume, and notes under it; ``tile``: the run's (``model.tile``), which
    explains a capped volume whose slices spent past the cap per their own voxels."""
    from paser.cost import FLOP_CONVENTION
    from paser.runtime import figure

    for r in results:
        if r.record is None:
            typer.echo(f"failed: {r.error}", err=True)
            continue
        rec = r.record
        typer.echo(f"{r.source}: {' x '.join(map(str, rec['shape']))} "
                   f"({figure(rec['megavoxels'])} megavoxels)"
                   + (", segmented before (skipped)" if r.resumed else "")
                   + f": {rec['gflops_per_slice']:.3f} GFLOP per slice ("
                   + (f"{rec['gflops'] / rec['megavoxels']:.2f} GFLOP/MP"
                      + (f", capped at {rec['cap_gflops_per_mp']:g}"
                         if rec.get("cap_gflops_per_mp") is not None else "")
                      + "; " if rec["megavoxels"] > 0 else "")
                   + f"{FLOP_CONVENTION}), "
                   f"{rec['ms_per_slice']:.1f} ms per slice; labels in {out / rec['output']}")
        cap = rec.get("cap_gflops_per_mp")
        spent = rec["gflops"] / rec["megavoxels"] if rec["megavoxels"] > 0 else 0.0
        if cap is not None and tile is not None and spent > cap * (1 + 1e-9):
            (th, tw), (h, w) = tile, rec["shape"][1:3]
            typer.echo(f"  note: past the cap of {cap:g} GFLOP/MP per its own voxels: the cap "
                       f"holds each {th} x {tw} tile its slices of {h} x {w} are cut into, "
                       "and their last tiles are padded past the slice (f0 and the policy "
                       f"run on whole tiles); slices whose sides are multiples of {th} x "
                       f"{tw} stay within it")
        if "remote" in rec:  # (as the images' line says it)
            sent, whole = rec["remote"]["bytes_sent"], rec["remote"]["bytes_whole_volume"]
            url = rec["remote"]["url"]  # none where a call without --remote finished it
            typer.echo(f"  remote{f' {url}' if url else ''}: sent {sent:,} bytes against "
                       f"{whole:,} for every slice whole ({sent / max(whole, 1):.1%})")
        if rec.get("degraded_patches"):
            why = _remote_why(rec.get("remote", {}).get("errors") or ["the remote tier did not "
                                                                      "answer"])
            typer.echo(f"  {rec['degraded_patches']} patches degraded (f0's prediction kept: "
                       f"{why}); the same command again redoes them")
        devices = rec.get("device", "").split(", ")
        # the thread counts of the slices run on the CPU: a GPU's sums do not follow them
        threads = sorted({s["threads"] for s in rec.get("slices", [])
                          if s.get("device") == "cpu" and "threads" in s})
        if len(devices) > 1 or len(threads) > 1:  # resumed otherwise, or uneven workers
            on = " and ".join(([" / ".join(devices)] if len(devices) > 1 else [])
                              + ([f"{' / '.join(map(str, threads))} threads"]
                                 if len(threads) > 1 else []))
            typer.echo(f"  note: its slices were segmented on {on} (calls with other --device "
                       "or --threads, or workers of other threads): labels can differ from one "
                       "uninterrupted call's in a few voxels (PyTorch adds in another order); "
                       "the same --device and --threads throughout give the same bytes")
        if "voxel_size" in rec:
            v = rec["voxel_size"]
            typer.echo(f"  voxel {v['x']:.6g} x {v['y']:.6g}"
                       + (f" x {v['z']:.6g}" if v["z"] is not None else "")
                       + f" µm (x, y{', z' if v['z'] is not None else ''}; {v['from']}), "
                       "carried by the labels")
        if "field_of_view" in rec:
            fov = rec["field_of_view"]
            fill = fov["fill"] if isinstance(fov["fill"], str) else f"{fov['fill']:g}"  # "nan"
            typer.echo(f"  {fov['share_outside']:.1%} of the voxels lie outside the field of "
                       f"view (at the fill {fill} on every slice, joined to the border), "
                       "left out of the class fractions: " + ", ".join(
                           f"{k} {v:.3f}" for k, v in rec["class_fractions"].items()))
        if "run_window" in rec.get("intensity", {}):
            typer.echo(f"  note: {rec['intensity']['says']}")
        _dim_line([s.get("notes", []) for s in rec.get("slices", [])], "slices",
                  lambda r=r: f"the notes of its slices in {out / (r.stem + '.json')}",
                  indent="  ")
        if "fitted_on" in rec.get("intensity", {}):
            lo, hi = rec["intensity"]["window"]
            typer.echo(f"  {rec['dtype']} voxels scaled by the window [{lo:.6g}, {hi:.6g}] "
                       f"fitted on {rec['intensity']['fitted_on']}")


def _dim_line(notes: list[list[str]], what: str, where: Callable[[], str],
              indent: str = "") -> None:
    """A line where some images or slices (``notes``: each one's) are 8/16-bit pixels that
    fill only the lowest eighth of their type's range (:data:`paser.data.images.DIM_NOTE`):
    each one's note says it in the files, this says it once on the terminal. ``where()``
    names the files."""
    from paser.data.images import DIM_NOTE

    dim = sum(any(n.startswith(DIM_NOTE) for n in each) for each in notes)
    if dim:
        typer.echo(f"{indent}note: the pixels of {dim} of {len(notes)} {what} fill only the "
                   "lowest eighth of their type's range (12-bit camera data in 16-bit files, "
                   "say), so they reach the models nearly black: right only where the run "
                   f"trained on such files; see {where()}")


def _remote_why(errors: list[str]) -> str:
    """Why the remote tier segmented no patch of some images: the first of ``errors`` (each
    record's own), and how many others there were."""
    others = len(dict.fromkeys(errors)) - 1
    return errors[0] + (f" (and {others} other error{'s' * (others > 1)}: each JSON lists "
                        "its own)" if others else "")


def model_names(model) -> list[str]:
    """``f0``, ``f1``, ... of a run."""
    return [f"f{i}" for i in range(model.router.num_models)]


def _model_index(name: str, num_models: int) -> int:
    """``f0``, ``f1``, ... (or ``0``, ``1``, ...) as a model index of the run."""
    k = name[1:] if name[:1] in "fF" else name
    if not k.isdigit() or int(k) >= num_models:
        raise ConfigError(f"--model {name}: this run has "
                          + ", ".join(f"f{i}" for i in range(num_models)))
    return int(k)


def _connect_remote(model, url: str, timeout: float, retries: int, token: str | None,
                    ca_file: Path | None) -> None:
    """Attach the remote tier; a server that does not answer yet is a warning (its patches
    fall back to f0 until it does), one serving other models, refusing the token or with an
    untrusted certificate an error."""
    # before httpx is imported: without the serve extra, it says what to install
    pool = model.use_remote(url, timeout=timeout, retries=retries, token=token,
                            ca_file=ca_file)
    import httpx

    try:
        info = pool.connect()
        typer.echo(f"remote tier {url}: " + ", ".join(
            f"{m['name']} ({m['arch']})" for m in info["models"]), err=True)
    except httpx.HTTPError as err:
        from paser.serve.client import describe_error

        typer.echo(f"warning: remote tier {url} does not answer ({describe_error(err)}); patches "
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
    token_file: Path = typer.Option(None, "--token-file", help="require 'Authorization: "
                                    "Bearer <token>' with the token in this file on every "
                                    "request but /healthz (default: $PASER_TOKEN)"),
    ssl_certfile: Path = typer.Option(None, "--ssl-certfile", help="serve HTTPS with this "
                                      "certificate (PEM, chain included)"),
    ssl_keyfile: Path = typer.Option(None, "--ssl-keyfile", help="its private key (PEM), "
                                     "when not in --ssl-certfile"),
) -> None:
    """Serve the run's pool models f1..fK over HTTP for `paser segment --remote`:
    GET /healthz, GET /v1/models, POST /v1/segment."""
    from paser.serve import read_token, require_serve_extra

    require_serve_extra()
    from paser.serve.server import MiB
    from paser.serve.server import serve as run_server

    run_server(run_dir, host, port, device, token=read_token(token_file),
               ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
               max_request_bytes=int(max_request_mb * MiB), max_patches=max_patches,
               max_concurrency=max_concurrency, queue_timeout=queue_timeout)


@app.command()
def export(
    run_dir: Path = RUN_DIR,
    out: Path = typer.Option(None, "--out", help="the export folder; default <run-dir>/onnx"),
    height: int = typer.Option(None, "--height", min=1, help="image height; default the "
                               "run's tile (data.tile), else the validation images'"),
    width: int = typer.Option(None, "--width", min=1, help="image width; default the "
                              "run's tile (data.tile), else the validation images'"),
) -> None:
    """Export f0 (Monte Carlo and deterministic), the policy and each pool model to ONNX
    with a dynamic batch size, and check onnxruntime against PyTorch."""
    from paser import PaSeR
    from paser.export import export_run, validation_size

    model = PaSeR.load(run_dir, device="cpu", calibrated=False)
    tile = model.tile
    if tile is not None:  # every image is routed in tiles of this size: the export's
        if (height or tile[0], width or tile[1]) != tile:
            given = " ".join(f"--{name} {value}" for name, value in
                             (("height", height), ("width", width)) if value is not None)
            raise ConfigError(f"{given}: this run routes every image in tiles of {tile[0]} x "
                              f"{tile[1]} (data.tile), so its export runs at that size; leave "
                              "--height and --width out")
        height, width = tile
    if height is None or width is None:
        h, w = validation_size(model.config)
        height, width = height or h, width or w
    out = out if out is not None else run_dir / "onnx"
    manifest = export_run(model, out, height, width)
    typer.echo(f"exported for {height} x {width} images (batch size dynamic) into {out}: "
               + ", ".join(manifest["files"].values()))
    scaled = manifest["max_scaled_error_vs_torch"]
    typer.echo("largest |onnxruntime - PyTorch| on the deterministic parts (random inputs; "
               "relative to each output's size where that is above 1): " + ", ".join(
                   f"{k} {v:.2e}" + (f" ({scaled[k]:.1e})" if scaled[k] != v else "")
                   for k, v in manifest["max_abs_error_vs_torch"].items()))
    # float32 rounding stays near 1e-6; not below the bound also catches NaN
    off = [k for k, v in scaled.items() if not v <= 1e-3]
    if off:
        typer.echo(f"warning: {' and '.join(off)} on onnxruntime "
                   f"{'differs' if len(off) == 1 else 'differ'} from PyTorch by more than float32 "
                   f"rounding explains (onnxruntime {manifest.get('onnxruntime')}, torch "
                   f"{manifest.get('torch')}); compare `paser segment --engine onnxruntime` "
                   "with the default engine on a few of your images before relying on it",
                   err=True)


@app.command()
def calibrate(
    run_dir: Path = RUN_DIR,
    budget_gflops: float = typer.Option(None, "--budget-gflops",
                                        help="mean GFLOP per validation image (per tile where "
                                        "the run cuts them into tiles) to spend"),
    budget_per_mp: float = typer.Option(None, "--budget-gflops-per-mp", help="the same per "
                                        "megapixel (carries to images of any size)"),
    max_frac_large: float = typer.Option(None, "--max-frac-large",
                                         help="largest share of patches on the largest model"),
    iou_within_top: float = typer.Option(
        None, "--iou-within-top", help="validation mIoU within this of the best single "
        "model's alone (whichever of f0..fK scores best), at the least GFLOP"),
    best_iou: bool = typer.Option(False, "--best-iou", help="with --budget-gflops: the best "
                                  "validation mIoU within the budget, not the most generous "
                                  "routing"),
    max_tvd: float = typer.Option(None, "--max-tvd", help="the least GFLOP whose assignment "
                                  "distribution is within this total variation of the "
                                  "policy's own (the paper's budget)"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
) -> None:
    """Calibrate the policy to a compute budget or a quality target on validation.

    Finds the bias on the policy's logits that meets it on the validation split and saves it
    in the run for `segment` and `evaluate`."""
    from paser import PaSeR
    from paser.cost import FLOP_CONVENTION

    model = PaSeR.load(run_dir, calibrated=False)  # a stale calibration is what gets replaced
    data_note(model, run_dir, "validation")
    before = _reported_calibration(run_dir, model)
    cal, (held, unit) = _calibrated(
        model, "calibrating on the validation split", budget_gflops=budget_gflops,
        max_frac_large=max_frac_large, batch_size=batch_size, iou_within_top=iou_within_top,
        best_iou=best_iou, max_tvd=max_tvd, budget_gflops_per_mp=budget_per_mp)
    from paser.checkpoints import unfinished_steps
    from paser.run import Steps

    if unfinished_steps(run_dir, ("calibrate",)):  # paser run's, stopped: this one replaces it
        Steps(run_dir).drop("calibrate")
    typer.echo(f"validation split, {held}; GFLOP per {unit} "
               f"({FLOP_CONVENTION})")
    typer.echo(f"target: {cal.target_text()}; bias on the logits "
               f"{[round(b, 4) for b in cal.bias]}")
    typer.echo(f"{'':<14} {'mIoU':>7} {'GFLOP':>8} {'GFLOP/MP':>9}  patches per model")
    for label, r in (("uncalibrated", cal.uncalibrated), ("calibrated", asdict(cal))):
        per_mp = cal.per_megapixel(r["gflops"])
        typer.echo(f"{label:<14} {r['miou']:7.4f} {r['gflops']:8.3f} "
                   f"{'-' if per_mp is None else f'{per_mp:.2f}':>9}  "
                   + " ".join(f"{f:6.1%}" for f in r["fractions"]))
    _above_dearest(cal)
    cfg = model.config  # the policy's lam: stage 3's where it fine-tuned it
    lam = cfg.stage3.lam if cfg.stage3.epochs and cfg.stage3.lam is not None else cfg.stage2.lam
    if max_tvd is not None and lam:
        typer.echo(f"note: --max-tvd keeps the assignment within {max_tvd:g} of this "
                   "policy's own: the paper's budget, for a policy trained at lam 0; this one "
                   f"was trained at lam {lam:g} and already trades mIoU for GFLOP, so "
                   "--budget-gflops or --iou-within-top say more directly what you get")
    typer.echo(f"saved to {run_dir / 'calibration.json'}; `paser segment` and `paser evaluate` "
               "use it")
    if before is not None and (before.target != cal.target or before.bias != cal.bias):
        typer.echo(replaced_note(before, cfg, run_dir))


def _reported_calibration(run_dir: Path, model):
    """The run's calibration where its report measured PaSeR at it (the report is of the
    run's models and calibration as they are), else None: what ``paser calibrate`` is about
    to replace under the report."""
    from paser.calibration import Calibration
    from paser.errors import CheckpointError
    from paser.run import report_outdated

    if not (run_dir / "results.json").is_file() or report_outdated(run_dir) is not None:
        return None
    try:
        return Calibration.load(run_dir, model.router.policy_digest)
    except CheckpointError:  # of another policy: replaced, and the report is of neither
        return None


def replaced_note(before, cfg, run_dir: Path) -> str:
    """What a new calibration leaves behind: the report's PaSeR rows are of ``before``, and
    what the next ``paser run`` does with either."""
    from paser.run import other_calibration, target_of

    again = ("the next `paser run` calibrates to the config's operating_point again and "
             "writes the report at it (set operating_point to keep this target)"
             if target_of(cfg) is not None and other_calibration(cfg, run_dir) else
             "the next `paser run` writes the report again at this one")
    return (f"note: this replaces the calibration at which report.md and results.json measured "
            f"PaSeR ({before.target_text()}: validation mIoU {before.miou:.4f} at "
            f"{before.gflops:.3f} GFLOP per {before.per}): their PaSeR rows are not what `paser "
            f"segment` and `paser evaluate` now route at; {again}")


def _calibrated(model, what: str, **target):
    """``model.calibrate(**target)`` on the run's validation split, saying ``what`` it does
    meanwhile, and what the split holds (:func:`paser.data.tiles.counted`); the split is
    loaded first, so the bar of a synthetic set generated now does not fight the spinner."""
    from paser.data import validation_split
    from paser.data.tiles import counted

    data = validation_split(model.config.data, channels=model.config.models.in_channels)
    with working(what):
        cal = model.calibrate(data=data, **target)
    return cal, counted(data.ids, (cal.height, cal.width))


def _above_dearest(cal) -> None:
    """Say so where a budget is more than every patch on the largest model costs."""
    dearest = cal.target.get("above_dearest")
    if dearest is not None:
        per_mp = "budget_gflops_per_mp" in cal.target
        what = "tile" if cal.tiles else "image"
        typer.echo(f"note: the budget ({cal.target['budget_gflops']:.4g} GFLOP per "
                   f"{cal.height} x {cal.width} validation {what}) is more than every patch on "
                   f"the largest model costs ({dearest:.4g}): it bounds nothing, and routing "
                   "runs at its most generous"
                   + ("" if per_mp else f". --budget-gflops is per validation {what}; for "
                      "images of another size give --budget-gflops-per-mp"))


def sizes_pay(model) -> str:
    """How images of another size than the validation split's are paid for."""
    if model.tile is None:
        return "images of other sizes pay for their pixels, padded to the patch grid"
    th, tw = model.tile
    return (f"images of other sizes pay for the {th} x {tw} tiles they are cut into (a size "
            "that is not a multiple of it pays for its padding too)")


def _padding_note(model, done, spent: float, budget: float) -> None:
    """Say so where images cut into tiles spent past a per-megapixel budget by paying for
    the padding of their last tiles."""
    if model.tile is None or spent <= budget * 1.05:
        return
    th, tw = model.tile
    pixels = sum(r.height * r.width for r in done)
    padded = sum(-(-r.height // th) * th * -(-r.width // tw) * tw for r in done)
    if padded > 1.05 * pixels:
        typer.echo(f"note: {spent:.2f} GFLOP/MP spent against the budget of {budget:g}: these "
                   f"images are cut into {th} x {tw} tiles, and their tiles hold "
                   f"{padded / pixels:.2f} x their pixels (the last tiles padded past the "
                   "image; f0 and the policy run on whole tiles), which explains up to "
                   f"{budget * padded / pixels:.2f} GFLOP/MP. Images whose sides are "
                   f"multiples of {th} x {tw} pay per megapixel as the budget says")


def _capped(model, cap: float) -> None:
    """``model.cap(cap)``, and a note where it bounds nothing."""
    dearest = model.cap(cap, option="--max-gflops-per-mp")
    if dearest is not None and cap >= dearest:
        typer.echo(f"note: the cap of {cap:g} GFLOP/MP bounds nothing: every patch on the "
                   f"dearest model costs {dearest:.2f} GFLOP/MP at the run's image size")


def _cap_note(model, done, cap: float) -> None:
    """Say so where images spent past the cap per their own pixels: the cap holds each tile
    an image is cut into, and a last tile padded past the image pays for its padding."""
    over = [r.gflops / (r.height * r.width / 1e6) for r in done
            if r.gflops > cap * r.height * r.width / 1e6 * (1 + 1e-9)]
    if over and model.tile is not None:
        th, tw = model.tile
        typer.echo(f"note: {len(over)} image{'s' * (len(over) != 1)} spent past the cap of "
                   f"{cap:g} GFLOP/MP per their own pixels (up to {max(over):.2f}): the cap "
                   f"holds each {th} x {tw} tile they are cut into, and their last tiles are "
                   "padded past the image (f0 and the policy run on whole tiles); images "
                   f"whose sides are multiples of {th} x {tw} stay within it")


def _rate(images: int, seconds: float) -> str:
    """``n images/s``, or ``s per image`` where an image takes longer than a second."""
    rate = images / seconds if seconds > 0 else float("inf")
    return f"{rate:.1f} images/s" if rate >= 1 else f"{1 / rate:.1f} s per image"
