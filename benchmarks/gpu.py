"""`make bench-gpu`: PaSeR on one CUDA GPU, measured in one bounded run (at most 8 minutes).

GPU time is lent rarely and briefly, so this is one prepared script that always leaves a
result: it writes its JSON after every part (and on an error, a timeout or SIGTERM), and
every part has a time budget under one global deadline. Parts, in order of priority:

1. ``inference``: ms/image at batch 1, 8 and 32, fp32 and bf16 (``torch.autocast``), at
   the battery-paper shapes (224 x 256, 4 x 4 grid, T = 5, the reference UNets untrained),
   timed with CUDA events after warm-up in interleaved rounds (as ``bench.py``'s
   ``timed``): PaSeR (the routing path, ``paser.routing.Router``, with ``bench.py``'s
   fixed 50 / 35 / 15 % mix), f1 and f2 on whole images, and the IDK cascade with the same
   final assignment; PaSeR's parts alone (f0's T passes, the policy, the dispatch as it
   is, and a dispatch candidate with one host synchronisation instead of one per model);
   the host synchronisations one routed batch makes, by source line; peak memory of each.
2. ``stage1``: one battery-paper stage-1 epoch per model (``paser pretrain --precision
   bf16-mixed``) on a synthetic set of the paper's size: seconds and images/s.
3. ``run``: ``paser run --preset battery-paper`` on a tiny synthetic set, one epoch per
   stage: every step's seconds and whether it finished.

Parts 2 and 3 run the CLI in a process of their own, killed at their budget. Peak memory
(``peak_memory_mib``) is ``torch.cuda.max_memory_allocated`` in MiB, reset between parts
(parts 2 and 3: their process's); ``null`` on CPU.

``--smoke`` runs the same code on CPU at tiny shapes (64 x 64, 2 x 2 grid, T = 2, batch 1
and 2, small models) in 20 s (a minute on busy cores), so that it cannot rot
(``tests/test_gpu_script.py``). Output: ``benchmarks/results/cuda.json``; with ``--smoke``
a temporary file unless ``--out`` says where.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

START = time.monotonic()  # the deadline counts from here, imports included

import bench  # noqa: E402  (benchmarks/bench.py: the router, the mix and the cascade)
import torch  # noqa: E402

from paser.baselines.routed import cascade_gflops  # noqa: E402
from paser.cost import gflops_per_sample  # noqa: E402
from paser.metrics import predicted_classes  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PARTS = ("inference", "stage1", "run")
TINY = "{name: unet_tiny, kwargs: {c0: 2, widths: [2, 2]}}"


@dataclass
class Setting:
    """What one mode measures; :data:`GPU` is the battery paper's, :data:`SMOKE` tiny."""

    height: int
    """image height (px)"""
    width: int
    """image width (px)"""
    grid: tuple[int, int]
    """patch grid rows, cols"""
    mc_samples: int
    """T, f0's Monte Carlo passes"""
    batches: tuple[int, ...]
    """inference batch sizes"""
    precisions: tuple[str, ...]
    """inference precisions: fp32, bf16 (autocast)"""
    warmup: int
    """untimed calls of each function before timing"""
    repeats: int
    """timed rounds; each function once per round, medians reported"""
    stage1_images: tuple[int, int, int]
    """train / validation / test images of the stage-1 part's synthetic set"""
    run_images: tuple[int, int, int]
    """train / validation / test images of the end-to-end run's synthetic set"""
    overrides: list[str] = field(default_factory=list)
    """config overrides of both training parts, after the preset's"""
    budgets: dict[str, float] = field(default_factory=dict)
    """seconds each part may take at most"""
    deadline: float = 470.0
    """seconds after the start by which every part has ended"""
    models: tuple[str, str, str] = bench.REFERENCE
    """f0, f1 and f2 of the inference part (untrained)"""


GPU = Setting(224, 256, (4, 4), 5, (1, 8, 32), ("fp32", "bf16"), 3, 10,
              stage1_images=(1270, 20, 40),  # the paper's size: D_pre is 432 images
              run_images=(96, 8, 16),  # 32 images per stage: one batch of 32
              budgets={"inference": 150, "stage1": 120, "run": 180})
SMOKE = Setting(64, 64, (2, 2), 2, (1, 2), ("fp32", "bf16"), 1, 1,
                stage1_images=(12, 2, 2), run_images=(12, 2, 2),
                # the reference f2 (unet_large) took 8 s an image in bf16 on a CPU without
                # native bf16 (emulated), and the smoke run 2 minutes of the tests
                models=("unet_tiny", "unet_tiny", "unet_small"),
                overrides=[f"models.f0={TINY}", f"models.pool=[{TINY}, {TINY}]",
                           "baselines.monolithic={}", f"baselines.matphase.members=[{TINY}]",
                           "stage1.batch_size=4", "stage2.batch_size=4",
                           "stage3.batch_size=4"],
                # generous: a CPU shared with other work may run it several times slower
                budgets={"inference": 120, "stage1": 120, "run": 180}, deadline=450.0)
MIN_SECONDS = {"inference": 10, "stage1": 20, "run": 30}
"""A part that would get less than this is skipped, not started."""
GRACE = {"inference": 0.0, "stage1": 20.0, "run": 20.0}
"""Seconds a training part's child may take to stop once its budget is spent (kept free
before the deadline)."""


class PartTimeout(Exception):
    """An in-process part reached its budget."""


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Raise :class:`PartTimeout` in the main thread after ``seconds`` (SIGALRM): the
    backstop of an in-process part, which also checks its budget between measurements."""
    def expire(signum, frame):
        raise PartTimeout(f"budget of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def left(deadline: float) -> float:
    """Seconds until ``deadline`` (seconds after :data:`START`)."""
    return deadline - (time.monotonic() - START)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last :func:`reset_peak` (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


# --- 1. inference ---------------------------------------------------------------------


def fixed_mix_router(device: torch.device, s: Setting):
    """``bench.fixed_mix_router`` at the setting's grid, T and models (bench.py reads the
    grid and T from module constants, so they are set for the call)."""
    saved = bench.GRID, bench.T
    bench.GRID, bench.T = s.grid, s.mc_samples
    try:
        return bench.fixed_mix_router(device, s.models)
    finally:
        bench.GRID, bench.T = saved


def dispatch_one_sync(router, x: torch.Tensor, base_probs: torch.Tensor,
                      actions: torch.Tensor) -> torch.Tensor:
    """A candidate for ``Router.dispatch`` (local pool, nothing degraded): the patches
    sorted by action and cut by their counts, read once to the host, instead of one
    ``nonzero`` (a host synchronisation) per model. Measured beside the real one; the
    routing path changes only if this is faster on CUDA. ``[B, Kc, Hp, Wp]``."""
    grid = router.grid
    patches = grid.context(x)  # [B*P, C, h, w]
    out = grid.split(base_probs).clone()  # [B*P, Kc, h, w]
    flat = actions.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=router.num_models).tolist()  # the one sync
    start = counts[0]
    for k in range(1, router.num_models):
        idx = order[start:start + counts[k]]
        start += counts[k]
        if counts[k]:
            out.index_copy_(0, idx, router.run_local(k, patches.index_select(0, idx)).to(out))
    return grid.merge(out)


def mark(device: torch.device):
    """A point in time: a CUDA event recorded on the stream (the device's clock, so a gap
    while the host launches counts), or ``perf_counter`` on CPU."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def elapsed(start, end) -> float:
    """Seconds between two :func:`mark` s."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def timed(fns: dict, device: torch.device, s: Setting, bf16: bool
          ) -> tuple[dict[str, float], dict[str, float | None]]:
    """Median seconds of each ``fn()`` and its peak memory (MiB), under inference mode, in
    bf16 autocast or fp32.

    Each function is warmed up alone (``s.warmup`` calls, its peak memory read then);
    then they take turns in ``s.repeats`` rounds, as in ``bench.timed``, so a slow spell
    hits all alike. Every call starts on an idle device (synchronised before it)."""
    def call(fn):
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            fn()

    peaks = {}
    for name, fn in fns.items():
        reset_peak(device)
        for _ in range(s.warmup):
            call(fn)
        bench.sync(device)
        peaks[name] = peak_mib(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(s.repeats):
        for name, fn in fns.items():
            bench.sync(device)
            start = mark(device)
            call(fn)
            times[name].append(elapsed(start, mark(device)))
    return {name: statistics.median(t) for name, t in times.items()}, peaks


def host_syncs(fn, device: torch.device) -> dict | None:
    """The host synchronisations one call of ``fn`` makes, counted by CUDA's sync debug
    mode and grouped by the Python line that made them; None on CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message).lower())
    return {"count": sum(where.values()), "where": dict(where.most_common())}


def at_batch(router, s: Setting, batch: int, device: torch.device
             ) -> tuple[dict, dict[str, float], dict[str, bool]]:
    """What part 1 times at one batch size: the functions, their GFLOP per image, and
    checks that they do what they claim (the mix routed, the candidate dispatch equal)."""
    f1, f2 = router.pool[0], router.pool[-1]
    costs = router.costs(s.height, s.width)
    actions = bench.mixed_actions(batch, router.grid.num_patches)  # [B, P]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, s.height, s.width, generator=gen).to(device)
    acts = actions.to(device)
    with torch.inference_mode():
        xp = router.grid.pad(x)
        mc = router.observe(xp, 0)
        state = router.state(xp, mc)
        patches = router.grid.context(xp)  # [B*P, C, h, w]
        routed = [patches[acts.reshape(-1) == k] for k in (1, 2)]
        checks = {"fixed_mix_routed": torch.equal(router(x, mc_seed=0).actions.cpu(), actions),
                  "one_sync_dispatch_equals_dispatch": torch.allclose(
                      router.dispatch(xp, mc.probs, acts)[0],
                      dispatch_one_sync(router, xp, mc.probs, acts))}
    gflops = {"PaSeR": float(costs.gflops(actions).mean()),
              "f1 (whole image)": gflops_per_sample(f1, 1, s.height, s.width),
              "f2 (whole image)": gflops_per_sample(f2, 1, s.height, s.width),
              "IDK-Cascade (same assignment)": float(cascade_gflops(actions, costs).mean()),
              "f0, T passes": costs.f0_mc, "policy": costs.policy,
              **{f"f{k} on its patches": len(routed[k - 1]) * costs.patch[k] / batch
                 for k in (1, 2)}}
    fns = {"PaSeR": lambda: router(x, mc_seed=0),
           "f1 (whole image)": lambda: predicted_classes(f1(x)),
           "f2 (whole image)": lambda: predicted_classes(f2(x)),
           "IDK-Cascade (same assignment)":
               lambda: bench.cascade_same_assignment(router, x, actions),
           "f0, T passes": lambda: router.observe(xp, 0),
           "policy": lambda: router.policy(state),
           "f1 on its patches": lambda: f1(routed[0]),
           "f2 on its patches": lambda: f2(routed[1]),
           "dispatch (as is)": lambda: router.dispatch(xp, mc.probs, acts),
           "dispatch (one host sync)": lambda: dispatch_one_sync(router, xp, mc.probs, acts)}
    return fns, gflops, checks


def bench_inference(device: torch.device, s: Setting, part: dict, budget: float,
                    save) -> None:
    """Part 1 into ``part`` (rows appended and saved after every batch and precision)."""
    t0 = time.monotonic()
    router = fixed_mix_router(device, s)
    part.update(rows=[], skipped=[], mix=list(bench.MIX), host_syncs={}, checks={})
    last = None  # (batch, seconds) of the last group measured: to forecast the next
    for batch in s.batches:
        fns, gflops, part["checks"][str(batch)] = at_batch(router, s, batch, device)
        try:  # a diagnostic: its failure costs nothing else
            part["host_syncs"][str(batch)] = host_syncs(fns["PaSeR"], device)
        except Exception as err:
            part["host_syncs"][str(batch)] = {"error": f"{type(err).__name__}: {err}"}
        for precision in s.precisions:
            spent = time.monotonic() - t0
            forecast = 0.0 if last is None else last[1] * max(1.0, batch / last[0])
            if spent + forecast > budget:
                part["skipped"].append({"batch": batch, "precision": precision, "why": (
                    f"{spent:.0f} s spent of {budget:.0f} s; this batch and precision "
                    f"would take about {forecast:.0f} s more")})
                continue
            g0 = time.monotonic()
            seconds, peaks = timed(fns, device, s, bf16=precision == "bf16")
            last = (batch, time.monotonic() - g0)
            part["rows"] += _rows(batch, precision, seconds, peaks, gflops)
            save()


def _rows(batch: int, precision: str, seconds: dict, peaks: dict, gflops: dict) -> list[dict]:
    """One row per function, with the ratios to f2 on the whole image (``bench.py``'s
    wall-clock to GFLOP ratio) and, for the dispatch, what it spends beyond its models."""
    top = "f2 (whole image)"
    rows = []
    for name, sec in seconds.items():
        row = {"batch": batch, "precision": precision, "method": name,
               "ms_per_image": 1e3 * sec / batch, "peak_memory_mib": peaks[name]}
        if name in gflops:
            wall, flops = sec / seconds[top], gflops[name] / gflops[top]
            row.update(gflops=gflops[name], gflop_per_s=gflops[name] * batch / sec,
                       wall_ratio_to_f2=wall, gflop_ratio_to_f2=flops,
                       wall_over_gflop_ratio=wall / flops)
        if name.startswith("dispatch"):
            models = seconds["f1 on its patches"] + seconds["f2 on its patches"]
            row["ms_per_image_beyond_its_models"] = 1e3 * (sec - models) / batch
        rows.append(row)
    return rows


# --- 2 and 3: training, the CLI in a process of its own --------------------------------


def run_cli(argv: list[str], work: Path, timeout: float) -> dict:
    """``paser ARGV`` in a fresh process (``--child``: its peak GPU memory is its own),
    killed with its process group at ``timeout`` seconds."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "child.json").write_text(json.dumps({"argv": argv}))
    log, result = work / "child.log", work / "child_result.json"
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(work)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _stop(proc)
    child = json.loads(result.read_text()) if result.is_file() else {}
    text = log.read_text(errors="replace")
    return {"command": "paser " + " ".join(argv), "returncode": code,
            "timed_out": code is None, "timeout_s": timeout,
            "seconds": time.perf_counter() - t0,
            "peak_memory_mib": child.get("peak_memory_mib"),
            "output_tail": text[-3000:]}


def _stop(proc: subprocess.Popen) -> None:
    """End a child and whatever it started (data readers): TERM, then KILL after 10 s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def child_main(work: Path) -> None:
    """In the child: the CLI with the saved argv, then its exit status and peak memory."""
    from paser.cli import main

    argv = json.loads((work / "child.json").read_text())["argv"]
    sys.argv = ["paser", *argv]
    code = 0
    try:
        main()
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        peak = (torch.cuda.max_memory_allocated() / 2**20
                if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
        (work / "child_result.json").write_text(json.dumps({"returncode": code,
                                                            "peak_memory_mib": peak}))
    sys.exit(code)


def _data_override(images: tuple[int, int, int], s: Setting) -> str:
    n_train, n_val, n_test = images
    return (f"data.synthetic={{n_train: {n_train}, n_val: {n_val}, n_test: {n_test}, "
            f"height: {s.height}, width: {s.width}, seed: 0}}")


def _shape_overrides(device: torch.device, s: Setting) -> list[str]:
    return [f"device={device}", f"grid=[{s.grid[0]}, {s.grid[1]}]", f"mc_samples={s.mc_samples}",
            *s.overrides]


def bench_stage1(device: torch.device, s: Setting, part: dict, budget: float,
                 work: Path) -> None:
    """Part 2: one epoch per model of ``paser pretrain --precision bf16-mixed``."""
    from paser.config import load_config
    from paser.data.battery import split_three
    from paser.data.synthetic import generate_dataset
    from paser.train.common import MetricLog

    t0 = time.monotonic()
    root = work / "data"
    generate_dataset(root, *s.stage1_images, height=s.height, width=s.width, seed=0,
                     progress=False)
    part["data_seconds"] = time.monotonic() - t0
    run_dir = work / "run"
    overrides = [f"data.root={root}", "stage1.epochs=1", *_shape_overrides(device, s)]
    cfg = load_config(preset="battery-paper", overrides=overrides)
    pre = len(split_three(s.stage1_images[0], cfg.data.split, cfg.data.split_seed)[0])
    part.update(precision="bf16-mixed", images={"pre": pre, "validation": s.stage1_images[1],
                                                "test": s.stage1_images[2]})
    cli = run_cli(["pretrain", "--preset", "battery-paper", "--precision", "bf16-mixed",
                   "--run-dir", str(run_dir), *overrides], work, budget - part["data_seconds"])
    part.update(cli)
    # each model's epoch line: training on D_pre then its validation pass (written as it ends)
    epochs = {r["model"]: r["seconds"] for r in MetricLog(run_dir / "metrics" /
                                                          "stage1.jsonl").read()}
    part["models"] = {m: {"epoch_seconds": sec, "images_per_s": pre / sec}
                      for m, sec in epochs.items()}
    if len(epochs) == 1 + len(cfg.models.pool):
        part["epoch_seconds"] = sum(epochs.values())
        part["images_per_s"] = pre / part["epoch_seconds"]  # each image once per model
    _fail_unless(cli, "paser pretrain")


def bench_run(device: torch.device, s: Setting, part: dict, budget: float,
              work: Path) -> None:
    """Part 3: ``paser run --preset battery-paper``, one epoch per stage; each step's
    seconds and whether it finished (the run's ``steps.json``)."""
    from paser.config import load_config
    from paser.run import target_of
    from paser.train.paper import paper_config

    overrides = [f"data.cache_dir={work / 'data'}", _data_override(s.run_images, s),
                 "stage1.epochs=1", "stage2.epochs=1", "stage3.epochs=1",
                 *_shape_overrides(device, s)]
    cfg = load_config(preset="battery-paper", overrides=overrides)
    expected = ["stage1", "stage2", "stage3", *(["tvd"] if cfg.stage3.tvd_sweep else []),
                *(["calibrate"] if target_of(cfg) is not None else []),
                *(["paper"] if paper_config(cfg) is not None else []), "baselines", "report"]
    run_dir = work / "run"
    cli = run_cli(["run", "--preset", "battery-paper", "--run-dir", str(run_dir), *overrides],
                  work, budget)
    part.update(cli, images=dict(zip(("train", "validation", "test"), s.run_images,
                                     strict=True)))
    ledger = run_dir / "steps.json"
    done = json.loads(ledger.read_text()) if ledger.is_file() else {}
    part["steps"] = {step: {"finished": "fingerprint" in done.get(step, {}),
                            "seconds": done.get(step, {}).get("seconds")} for step in expected}
    part["every_step_finished"] = all(v["finished"] for v in part["steps"].values())
    _fail_unless(cli, "paser run")
    if not part["every_step_finished"]:
        raise RuntimeError("paser run exited 0 but did not finish every step")


def _fail_unless(cli: dict, what: str) -> None:
    if cli["timed_out"]:
        raise PartTimeout(f"{what} stopped at its budget of {cli['timeout_s']:.0f} s")
    if cli["returncode"] != 0:
        raise RuntimeError(f"{what} exited {cli['returncode']} (see output_tail)")


# --- the run --------------------------------------------------------------------------


def tree(folder: Path) -> dict:
    """The commit checked out in ``folder`` and whether the tracked files there differ from
    it (``tree_modified``; the results under ``benchmarks/results`` apart): a lent machine
    gets a copy of the tree, perhaps without .git or git (both None), or with a .git that
    is not its files' (HEAD alone would then name a commit that is not what ran)."""
    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=folder)
        except OSError:
            return None
        return done.stdout if done.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or None
    status = None if commit is None else git(
        "status", "--porcelain", "--untracked-files=no", "--", ".",
        ":(top,exclude)benchmarks/results")
    return {"commit": commit, "tree_modified": None if status is None else bool(status.strip())}


def environment(device: torch.device, s: Setting, smoke: bool) -> dict:
    env = {"smoke": smoke, "machine": platform.platform(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           **tree(Path(__file__).resolve().parents[1]), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "setting": asdict(s)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device),
                   gpu_memory_mib=torch.cuda.get_device_properties(device).total_memory / 2**20,
                   cudnn=torch.backends.cudnn.version(),
                   cudnn_benchmark=torch.backends.cudnn.benchmark,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return env


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: does it still run")
    ap.add_argument("--out", type=Path, help="the JSON to write; default "
                    "benchmarks/results/cuda.json, with --smoke a temporary file")
    ap.add_argument("--device", help="default cuda, with --smoke cpu")
    ap.add_argument("--only", choices=PARTS, action="append",
                    help="run this part (repeatable); the others' results in --out are kept")
    ap.add_argument("--deadline", type=float, help="seconds from the start by which every "
                    "part has ended (default 470, with --smoke 450)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    s = SMOKE if args.smoke else GPU
    if args.deadline is not None:
        s = replace(s, deadline=args.deadline)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --smoke on CPU, or where a GPU is")
    out = args.out or (Path(tempfile.gettempdir()) / "paser-gpu-smoke.json" if args.smoke
                       else RESULTS / "cuda.json")
    parts = args.only or list(PARTS)
    result = {"environment": environment(device, s, args.smoke), "parts": {}}
    if args.only and out.is_file():  # one part re-measured: keep the others' last results
        try:
            last = json.loads(out.read_text())
        except json.JSONDecodeError as err:
            last = err
        if not isinstance(last, dict) or not isinstance(last.get("parts", {}), dict):
            sys.exit(f"{out} is not a results file of this script"
                     + (f" ({last})" if isinstance(last, Exception) else "")
                     + ": restore it (git checkout) or move it away, or --out another file")
        result["parts"] = last.get("parts", {})
    result["parts"].update({p: {"status": "pending"} for p in parts})

    def save() -> None:
        result["seconds"] = time.monotonic() - START
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.tmp")  # a reader never sees half a file
        partial.write_text(json.dumps(result, indent=2))
        os.replace(partial, out)

    # a `timeout` around the script sends SIGTERM: end as after an error, JSON written
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    save()
    runners = {"inference": lambda part, budget, work: bench_inference(device, s, part, budget,
                                                                        save),
               "stage1": lambda part, budget, work: bench_stage1(device, s, part, budget, work),
               "run": lambda part, budget, work: bench_run(device, s, part, budget, work)}
    with tempfile.TemporaryDirectory(prefix="paser-gpu-") as tmp:
        try:
            for name in parts:
                part = result["parts"][name] = {"status": "running"}
                budget = min(s.budgets[name], left(s.deadline) - GRACE[name])
                part["budget_s"] = budget
                if budget < MIN_SECONDS[name]:
                    part.update(status="skipped", why=(
                        f"{left(s.deadline):.0f} s left before the deadline of "
                        f"{s.deadline:.0f} s; the part needs at least {MIN_SECONDS[name]} s"))
                    save()
                    continue
                print(f"[{name}] up to {budget:.0f} s", flush=True)
                t0 = time.monotonic()
                reset_peak(device)
                try:
                    with hard_limit(budget + GRACE[name]):  # children stop before this
                        runners[name](part, budget, Path(tmp) / name)
                    part["status"] = "ok"
                except PartTimeout as err:
                    part.update(status="timed_out", error=str(err))
                except Exception as err:  # recorded; the next part still runs
                    part.update(status="failed", error=f"{type(err).__name__}: {err}",
                                traceback=traceback.format_exc()[-3000:])
                part["part_seconds"] = time.monotonic() - t0
                part.setdefault("peak_memory_mib", peak_mib(device))  # a child's is its own
                if device.type == "cuda":  # the children start with the GPU to themselves
                    torch.cuda.empty_cache()
                print(f"[{name}] {part['status']} in {part['part_seconds']:.0f} s", flush=True)
                save()
        finally:
            for part in result["parts"].values():
                if part.get("status") in ("pending", "running"):
                    part.update(status="interrupted", why="the script was stopped")
            save()
    try:  # a convenience: the JSON, already written, holds the results
        print_tables(result)
    except Exception as err:
        print(f"(no tables: {type(err).__name__}: {err})")
    print(f"\n{result['seconds']:.0f} s; written to {out}")


def print_tables(result: dict) -> None:
    """The closing note's tables: inference ms/image, the stage-1 epoch, the run's steps."""
    parts = result["parts"]
    inf = parts.get("inference", {})
    rows = inf.get("rows", [])
    if rows:
        cells = list(dict.fromkeys((r["batch"], r["precision"]) for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        ms = {(r["method"], r["batch"], r["precision"]): r["ms_per_image"] for r in rows}
        print("\nms per image (" + result["environment"].get("gpu", result["environment"][
            "device"]) + ")")
        print(f"{'':<32}" + "".join(f"{f'b{b} {p}':>12}" for b, p in cells))
        for m in methods:
            print(f"{m:<32}" + "".join(f"{ms[(m, b, p)]:12.3f}" if (m, b, p) in ms
                                         else f"{'-':>12}" for b, p in cells))
    for name in PARTS:
        p = parts.get(name, {})
        print(f"{name}: {p.get('status')}" + (f" ({p['error']})" if p.get("error") else ""))
    s1 = parts.get("stage1", {})
    for role, m in s1.get("models", {}).items():
        print(f"  stage 1 {role}: {m['epoch_seconds']:.1f} s, {m['images_per_s']:.1f} images/s")
    for step, v in parts.get("run", {}).get("steps", {}).items():
        print(f"  run {step}: {'finished' if v['finished'] else 'NOT finished'}"
              + (f" in {v['seconds']} s" if v["seconds"] is not None else ""))


if __name__ == "__main__":
    main()
