"""``paser run``: data -> stage 1 -> stage 2 -> stage 3 (-> TVD sweep) (-> calibration to
the operating point) (-> PaSeR (paper)) -> baselines -> evaluation -> report.

A re-run skips every step whose outputs exist for the same config: each step records a
fingerprint of the config sections it depends on in ``run_dir/steps.json`` when it
finishes. A step whose fingerprint changed (or every step, with ``force``) runs again
from scratch; a step that was interrupted resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from paser.config import ExperimentConfig, load_config
from paser.runtime import atomic_write_text
from paser.train.common import prepare_run_dir, setup

_STAGE1 = ("data", "seed", "grid", "halo", "models", "stage1")
_STAGE2 = (*_STAGE1, "mc_samples", "mc_dropout", "uncertainty", "stage2")
_STAGE3 = (*_STAGE2, "stage3")
DEPS: dict[str, tuple[str, ...]] = {
    "stage1": _STAGE1,
    "stage2": _STAGE2,
    "stage3": _STAGE3,
    "baselines": ("data", "seed", "models.in_channels", "models.num_classes", "stage1",
                  "baselines.monolithic", "baselines.matphase"),
    "tvd": (*_STAGE3,),
    "calibrate": (*_STAGE3, "operating_point"),
    "paper": (*_STAGE3, "baselines.paper"),
    "report": (*_STAGE3, "baselines", "operating_point"),
}
"""The config keys each step reads, itself and through the steps before it."""
OUTPUTS = {"stage1": "stage1.json", "stage2": "stage2.json", "stage3": "stage3.json",
           "baselines": "checkpoints", "tvd": "tvd", "calibrate": "calibration.json",
           "paper": "paper", "report": "results.json"}
#: the steps whose outputs each step reads: rebuilt inputs make a step stale
INPUTS = {"stage2": ("stage1",), "stage3": ("stage2",), "tvd": ("stage2", "stage3"),
          "calibrate": ("stage2", "stage3"), "paper": ("stage1",),
          "report": ("stage1", "stage2", "stage3", "baselines", "tvd", "calibrate", "paper")}
#: the steps that keep nothing of a run cut short: they start over, never resume
STARTS_OVER = frozenset({"calibrate", "report"})


def readers(step: str) -> set[str]:
    """Every step that reads ``step``'s outputs, directly or through others."""
    out: set[str] = set()
    for later, inputs in INPUTS.items():
        if step in inputs:
            out |= {later} | readers(later)
    return out


def outputs(cfg: ExperimentConfig, step: str) -> list[str]:
    """The files a finished ``step`` leaves, all of which must be there for a rerun to
    skip it (a checkpoint deleted by hand makes it run again)."""
    out = [OUTPUTS[step]]
    if step == "stage1":
        out += [f"checkpoints/f{k}.pt" for k in range(len(cfg.models.pool) + 1)]
    elif step == "stage2":
        out.append("checkpoints/policy.pt")
    elif step == "stage3":
        out.append("checkpoints/stage3.pt")
    elif step == "baselines":
        from paser.baselines.monolithic import role_name

        out += [f"checkpoints/{role_name(name)}.pt" for name in cfg.baselines.monolithic]
        if cfg.baselines.matphase is not None:
            out.append("checkpoints/base_matphase.pt")
    elif step == "report":
        out += ["report.md", "figures/iou_vs_gflop.png"]
    return out


def record_stage(run_dir: str | Path, cfg: ExperimentConfig, step: str,
                 changed: bool = True) -> None:
    """Record a stage trained by its own command (``paser pretrain``, ``train-policy``,
    ``finetune``) in the run's ledger, so ``paser run`` skips it; the steps that read its
    outputs are struck off, to be redone, unless it ``changed`` nothing (a ``--resume`` of a
    finished stage)."""
    from paser.data.identity import data_identity, record_identity

    steps = Steps(Path(run_dir))
    started = steps.done.get(step, {})
    # the files the stage read (:func:`start_stage` hashed them before it trained), or for
    # a resume that trained nothing, those it read when it finished before
    data = started.get("data") if changed else started.get("before")
    for later in readers(step) if changed else ():
        steps.done.pop(later, None)
    ident = data_identity(cfg.data, run_dir) if changed and data else None
    if ident is not None and ident.digest == data:
        record_identity(run_dir, ident)
    steps.mark(step, fingerprints(cfg)[step], **({} if data is None else {"data": data}))


def start_stage(run_dir: str | Path, cfg: ExperimentConfig, step: str) -> None:
    """Record a stage begun by its own command, so that ``paser run`` resumes it where an
    interruption left it instead of starting it over."""
    from paser.data.identity import data_identity
    from paser.train.common import absolute_root

    cfg = absolute_root(cfg)
    steps = Steps(Path(run_dir))
    ident = data_identity(cfg.data, run_dir)
    before = steps.done.get(step, {}).get("data")  # what it read when it finished before
    steps.start(step, fingerprints(cfg)[step],
                **({} if ident is None else {"data": ident.digest}),
                **({} if before is None else {"before": before}))


def config_changes(before: ExperimentConfig | None, cfg: ExperimentConfig,
                   limit: int = 8) -> list[str]:
    """What changed since the run in this folder was made (``key: old -> new``), and which
    of its finished steps that makes stale: they run again."""
    if before is None:
        return []

    def flat(node, prefix=""):
        if isinstance(node, list) and any(isinstance(v, dict) for v in node):
            node = dict(enumerate(node))  # models.pool.1.epochs, not the whole pool
        if isinstance(node, dict):
            return {k: v for key, value in node.items()
                    for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    old, new = (flat(c.model_dump(mode="json", exclude={"distributed"})) for c in (before, cfg))
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if not keys:
        return []
    lines = [f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"and {len(keys) - limit} more keys")
    a, b = fingerprints(before), fingerprints(cfg)
    stale = [step for step in DEPS if a[step] != b[step]]
    threads = ("; num_threads changes the order PyTorch sums in on the CPU, so a fresh run "
               "with it can differ in the last digits" if "num_threads" in keys else "")
    moved = "data.root" in keys and old.get("data.root") and new.get("data.root")
    lines.append("changed since this run was made: "
                 + (f"{', '.join(stale)} (and what reads them) run again" if stale else
                    "data.root moved: steps run again only where its files hold other data "
                    "(the [data] lines)" if moved else
                    "no step depends on it (nothing is redone)") + threads)
    return lines


#: keys of the sections in DEPS that change how a step reads its data, not what it learns
NEUTRAL = {"data": ("workers", "cache_dir", "stream", "stream_above_mb")}
#: keys added to a section after runs were made, with the value that does what those runs
#: did: at it, a key is not hashed, so a run made before it is not trained again (a run
#: made after it, before it was listed here, hashed it: every mix is accepted,
#: :func:`fingerprint_variants`)
ADDED = {"data": {"nonfinite": "error"}, "stage1": {"ema": None}}
#: every :data:`ADDED` key, as ``section.key``
ADDED_KEYS = frozenset(f"{section}.{key}" for section, keys in ADDED.items() for key in keys)


def hashed_part(raw: dict, key: str, legacy: bool = False,
                added: frozenset[str] = ADDED_KEYS, root: bool = False):
    """The part of a dumped config at ``key`` (dotted) that a fingerprint hashes: without
    its :data:`NEUTRAL` keys (``legacy``: with them, as runs before 2026-12-05 hashed), and
    without those of its :data:`ADDED` keys named in ``added`` (``section.key``) at the
    value runs before them had. ``data.root`` counts only as given or not: the run knows
    its data by what the files hold (:mod:`paser.data.identity`), so a dataset moved to
    another folder trains nothing again (``root`` or ``legacy``: its path hashed, as runs
    before 2026-12-06 did)."""
    node = raw
    for part in key.split("."):
        node = node[part]
    if key in NEUTRAL and not legacy:
        node = {k: v for k, v in node.items() if k not in NEUTRAL[key]}
    if key == "data" and not legacy and not root:
        node = {**node, "root": None if node.get("root") is None else "given"}
    if key in ADDED:
        node = {k: v for k, v in node.items()
                if f"{key}.{k}" not in added or k not in ADDED[key] or v != ADDED[key][k]}
    if key == "data" and node.get("window") is not None:  # since 2026-12-05 it scales
        node = {**node, "window_scales": "every image"}  # 8/16-bit images too: retrain
    return node


def fingerprints(cfg: ExperimentConfig, legacy: bool = False,
                 added: frozenset[str] = ADDED_KEYS, root: bool = False) -> dict[str, str]:
    """A short hash per step of the config keys it depends on (not the :data:`NEUTRAL`
    ones: reader processes, where the synthetic set is cached, streaming). PaSeR (paper)'s
    is of its own config (:func:`paser.train.paper.paper_config`): keys its method fixes,
    such as ``stage2.lam``, do not retrain it. ``legacy``: as paser 2026-12-05 hashed them
    (every key of a section), so that runs finished before are not trained again;
    ``added``, ``root``: :func:`hashed_part`'s."""
    from paser.train.paper import paper_config

    def digest(raw: dict, keys: tuple[str, ...]) -> str:
        values = [[key, hashed_part(raw, key, legacy, added, root)] for key in keys]
        return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    raw = cfg.model_dump(mode="json")
    out = {step: digest(raw, keys) for step, keys in DEPS.items()}
    paper = None if legacy else paper_config(cfg)
    if paper is not None:
        out["paper"] = digest(paper.model_dump(mode="json"), _STAGE3)
    return out


def fingerprint_variants(cfg: ExperimentConfig) -> list[dict[str, str]]:
    """Every way a version of paser hashed ``cfg``'s steps (:func:`fingerprints`; the one it
    writes first): with and without the :data:`NEUTRAL` keys and ``data.root``'s path,
    and without any subset of the :data:`ADDED` ones (each was hashed from when it came
    until it was listed). A step finished under any of them is done with this config: each
    drops a key only at the value that does what runs before it did (``data.root``: the
    data files' digest says whether they are the same)."""
    keys = sorted(ADDED_KEYS)
    subsets = [frozenset(k for i, k in enumerate(keys) if n >> i & 1)
               for n in range(2 ** len(keys) - 1, -1, -1)]  # all of them first
    return [fingerprints(cfg, legacy, added, root)
            for legacy, root in ((False, False), (False, True), (True, True))
            for added in subsets]


def build_every_model(cfg: ExperimentConfig) -> None:
    """Build every model the run will train, so that a bad name fails now, not after an
    hour of stage 1."""
    from paser.checkpoints import build_model
    from paser.errors import ConfigError

    specs = {"models.f0": cfg.models.f0}
    specs.update({f"models.pool.{i}": s for i, s in enumerate(cfg.models.pool)})
    specs.update({f"baselines.monolithic.{k}": s for k, s in cfg.baselines.monolithic.items()})
    if cfg.baselines.matphase is not None:
        specs.update({f"baselines.matphase.members.{i}": s
                      for i, s in enumerate(cfg.baselines.matphase.members)})
    for key, spec in specs.items():
        try:
            build_model(cfg, spec)
        except ConfigError as err:
            raise ConfigError(f"key '{key}': {err}") from None


def target_of(cfg: ExperimentConfig) -> dict | None:
    """The run's operating-point target as :func:`paser.calibration.calibrate` keywords,
    or ``None`` when PaSeR runs at its policy's own choices."""
    op = cfg.operating_point
    if op.iou_within_top is not None:
        return {"iou_within_top": op.iou_within_top}
    if op.budget_gflops is not None:
        return {"budget_gflops": op.budget_gflops, "best_iou": True}
    if op.max_tvd is not None:
        return {"max_tvd": op.max_tvd}
    return None


def calibrate_run(cfg: ExperimentConfig, run_dir: Path, echo=print) -> None:
    """Calibrate the trained run to its operating point on the validation split; saved as
    ``calibration.json``, which ``PaSeR.load`` (segment, evaluate, the report) applies."""
    from paser.api import PaSeR
    from paser.cost import FLOP_CONVENTION
    from paser.errors import ConfigError

    model = PaSeR.load(run_dir, calibrated=False)
    try:
        cal = model.calibrate(batch_size=cfg.baselines.timing_batch, **target_of(cfg))
    except ConfigError as err:  # said of paser calibrate's option, not of the config's key
        if cfg.operating_point.budget_gflops is None:
            raise
        raise ConfigError(str(err).replace("--budget-gflops", "operating_point.budget_gflops", 1)
                          + "; the trained stages are kept: run the same command again "
                          "with it set") from None
    # a tile's GFLOP where the images are cut into tiles (0.052 for 64 x 64 tiles of
    # 500 x 600 slices read 'per image')
    echo(f"[calibrate] {cal.target_text()}: validation mIoU {cal.miou:.4f} at "
         f"{cal.gflops:.3f} GFLOP per {cal.per}, {cal.per_megapixel(cal.gflops) or 0:.2f} GFLOP per "
         f"megapixel (uncalibrated {cal.uncalibrated['miou']:.4f} at "
         f"{cal.uncalibrated['gflops']:.3f}; {FLOP_CONVENTION})")


def other_calibration(cfg: ExperimentConfig, run_dir: Path,
                      before: ExperimentConfig | None = None) -> str | None:
    """Why the run's ``calibration.json`` is not the config's operating point (made by
    ``paser calibrate`` for another target since), or None. ``before``: the config the
    folder's last ``paser run`` had; a calibration at its operating point is that run's
    (the [config] lines say why it is made again), not one paser calibrate made."""
    from paser.calibration import FILE

    path = run_dir / FILE
    try:
        saved = json.loads(path.read_text()).get("target", {}) if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: paser segment says so where it reads it

    def holds(target: dict | None) -> bool:
        return all(saved.get(k) == v for k, v in (target or {}).items())

    made = None if before is None else target_of(before)
    if saved is None or holds(target_of(cfg)) or (made is not None and holds(made)):
        return None
    held = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in saved.items() if k in ("iou_within_top", "budget_gflops",
                                                        "budget_gflops_per_mp", "max_tvd",
                                                        "max_frac_large"))
    return (f"{FILE} holds another target ({held or 'its own'}), made by paser calibrate "
            "since: calibrated again to this config's operating_point, which paser segment "
            "then uses; set operating_point to keep the other")


def report_outdated(run_dir: Path) -> str | None:
    """Why the run's report is not of its models and calibration as they are now (a stage
    command or ``paser calibrate`` ran since it was written), or None."""
    from paser.experiments.finished import measured_now

    try:
        results = json.loads((run_dir / "results.json").read_text())
    except FileNotFoundError:  # a missing report is written as a missing output
        return None
    except (OSError, ValueError) as err:  # cut short (a full disk, a copy stopped)
        return f"its results.json cannot be read: {str(err).splitlines()[0]}"
    if not isinstance(results, dict):
        return "its results.json is not a report"
    measured = results.get("measured_on")
    if measured is None or measured_now(run_dir, measured):
        return None
    return ("the run's models or calibration changed since the report was written: a stage "
            "command or paser calibrate ran")


def drop_calibration(run_dir: Path, steps: Steps, echo=print) -> None:
    """Without an operating point in the config, PaSeR runs at its policy's own choices: a
    calibration an earlier ``paser run`` made (for a target no longer asked for), or one
    made by ``paser calibrate`` for a policy trained again since, is removed, and said."""
    from paser.api import PaSeR
    from paser.calibration import FILE
    from paser.errors import CheckpointError

    path = run_dir / FILE
    if not path.is_file():
        steps.drop("calibrate")  # one begun and stopped, or for an operating point gone
        return
    why = None
    if "calibrate" in steps.done:
        why = "made by an earlier paser run for an operating point no longer configured"
    else:
        try:
            PaSeR.load(run_dir)
        except CheckpointError as err:
            if "another policy" in str(err):
                why = "made by paser calibrate for a policy trained again since"
    if why is not None:
        path.unlink()
        steps.drop("calibrate")
        echo(f"[calibrate] {FILE} removed ({why}): PaSeR runs at its policy's own choices "
             "(operating_point, or paser calibrate, sets one)")


def stamp_unrecorded(run_dir: Path, steps: Steps, ident, seen, echo=print,
                     variants: list[dict[str, str]] | None = None) -> None:
    """Give the steps and stage-1 models that a paser before 2026-12-06 finished (no record
    of their data's files) the files they read: those the run's later steps read
    (``seen``), or where none did, the files as they are now, which is said. A run
    folder that cannot be written to keeps them as they are (and says so again).
    ``variants`` (:func:`fingerprint_variants`): only the steps of this config; one of
    another (of data built in memory, which has no files: noisy MNIST) runs again anyway,
    and is no sign of an older paser."""
    from paser.data.identity import record_identity
    from paser.train.pretrain import trained_record

    def ours(name: str, record: dict) -> bool:
        made = record.get("fingerprint", record.get("started"))
        return variants is None or any(made == v.get(name) for v in variants)

    old = [name for name, r in steps.done.items() if "data" not in r and ours(name, r)]
    models = [p for p in sorted((run_dir / "checkpoints").glob("*.trained.json"))
              if "data" not in trained_record(p)]
    if not old and not models:
        return
    stamp = ident.digest if seen is None else seen.digest
    if seen is None and any("fingerprint" in steps.done[name] for name in old):
        echo("[data] this run's steps were finished by a version of paser that did not "
             "record what its data's files were: they are taken to be the files as they are "
             "now, and a change from here on trains again (--force trains them on these "
             "files now)")
    try:
        for p in models:
            atomic_write_text(json.dumps({**trained_record(p), "data": stamp}), p)
        for name in old:
            steps.done[name]["data"] = stamp
        steps.save()
        if seen is None:
            record_identity(run_dir, ident)
    except OSError:
        for name in old:
            steps.done[name].pop("data", None)


def rehash_records(cfg: ExperimentConfig, run_dir: Path, steps: Steps,
                   variants: list[dict[str, str]]) -> None:
    """Record the steps and stage-1 models that an earlier version of paser hashed in
    another way (:func:`fingerprint_variants`) under today's fingerprint of the same
    config: a later change that only today's hashing leaves out (``data.root`` moved)
    then finds them done. A run folder that cannot be written to keeps them as they are."""
    from paser.train.pretrain import rehash_models

    now = variants[0]
    old = {name: r["fingerprint"] for name, r in steps.done.items()
           if "fingerprint" in r and name in now and r["fingerprint"] != now[name]
           and any(r["fingerprint"] == v[name] for v in variants)}
    try:
        rehash_models(cfg, run_dir)
        if old:
            for name in old:
                steps.done[name]["fingerprint"] = now[name]
            steps.save()
    except OSError:
        for name, fingerprint in old.items():
            steps.done[name]["fingerprint"] = fingerprint


class Steps:
    """The ``steps.json`` ledger of finished steps."""

    def __init__(self, run_dir: Path):
        from paser.checkpoints import read_steps

        self.path = run_dir / "steps.json"
        self.done = read_steps(run_dir)

    def finished(self, step: str, fingerprint: str) -> bool:
        return self.done.get(step, {}).get("fingerprint") == fingerprint

    def started(self, step: str, fingerprint: str) -> bool:
        return self.done.get(step, {}).get("started") == fingerprint

    def mark(self, step: str, fingerprint: str, **info) -> None:
        """Record a finished step (with ``info`` such as its seconds)."""
        self._write(step, {"fingerprint": fingerprint, **info})

    def start(self, step: str, fingerprint: str, **info) -> None:
        """Record a step as begun: if it is cut short, the next run resumes it."""
        self._write(step, {"started": fingerprint, **info})

    def undo(self, names, after: str) -> None:
        """Mark the recorded steps among ``names`` begun on nothing (``after``: what made
        them so), not finished: a run cut short before it redoes them does not skip them
        next time, nor resume them on what was built from outputs since replaced, and a
        run folder in between is not loaded as if they were done (it is written with the
        next :meth:`start`)."""
        for name in set(names) & self.done.keys():
            kept = {k: v for k, v in self.done[name].items() if k not in ("fingerprint",
                                                                           "started")}
            self.done[name] = {**kept, "started": "", "after": after}

    def drop(self, step: str) -> None:
        """Forget a step (its outputs are gone)."""
        if self.done.pop(step, None) is not None:
            self.save()

    def save(self) -> None:
        """Write the ledger as it is in memory."""
        atomic_write_text(json.dumps(self.done, indent=2), self.path)

    def _write(self, step: str, record: dict) -> None:
        self.done[step] = record
        self.save()


def in_one_process(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` trained in one process, as `paser run` trains: the default devices, nodes and
    strategy, the config's precision kept (how each process computes, not how many)."""
    from paser.config import DistributedConfig

    return cfg.model_copy(update={"distributed": DistributedConfig(
        precision=cfg.distributed.precision)})


#: pixels of a routing patch above which `paser run` warns that the images want tiles
LARGE_PATCH = 256 * 256


def large_patches(cfg: ExperimentConfig) -> str | None:
    """Why training on the images as they are would be slow, or None: a training image
    of one size trained whole (``data.tile`` null or auto), cut by the grid into patches of more than
    :data:`LARGE_PATCH` pixels (a 2048 x 2048 slice on battery-quick's 2 x 2 grid: stage 1
    took minutes an epoch, each pool model call on a 1024 x 1024 patch)."""
    from paser.data.registry import kind, open_split

    if cfg.data.tile not in (None, "auto") or kind(cfg.data).open is None:
        return None  # tiles of a given size, or data built in memory
    size = open_split(cfg.data, "train", progress=False).size
    if size is None:
        return None
    rows, cols = cfg.grid
    ph, pw = -(-size[0] // rows), -(-size[1] // cols)
    if ph * pw <= LARGE_PATCH:
        return None
    return (f"images of {size[0]} x {size[1]} trained whole (data.tile {cfg.data.tile}): the "
            f"{rows} x {cols} grid routes patches of {ph} x {pw}, and every training step and "
            f"pool model call pays for them; patch=[64,64] (data.tile=[{64 * rows},{64 * cols}]"
            ") trains and routes tiles of that size, and segment routes any size in them")


#: the steps of `paser run` that train at ``distributed.precision`` (stages 2 and 3 train
#: in 32-bit on the CPU)
PRECISION_STEPS = ("stage1", "baselines")


def precision_steps_done(cfg: ExperimentConfig, run_dir: str | Path) -> bool:
    """Whether every one of :data:`PRECISION_STEPS` finished before in ``run_dir`` with
    ``cfg``: then `paser run` trains nothing at its precision (a GPU run of 16-mixed whose
    report is written again on a CPU), and the precision needs no device of its own."""
    from paser.train.common import absolute_root

    steps, variants = Steps(Path(run_dir)), fingerprint_variants(absolute_root(cfg))
    return all(any(steps.finished(name, v[name]) for v in variants)
               for name in PRECISION_STEPS)


def run(cfg: ExperimentConfig, run_dir: str | Path, force: bool = False,
        show_progress: bool = True, echo=print) -> dict:
    """Run the whole job into ``run_dir``; return the results (also in ``results.json``)."""
    from paser.baselines.monolithic import train_baselines
    from paser.data import describe, load_stage_data
    from paser.data.identity import data_identity, read_identity, record_identity
    from paser.experiments.main import evaluate_all
    from paser.train.distributed import check_devices
    from paser.train.finetune import finetune, refuse_tvd_without_reinforce, tvd_sweep
    from paser.train.paper import paper_config, train_paper
    from paser.train.policy import train_policy
    from paser.train.pretrain import every_model_kept, pretrain

    build_every_model(cfg)
    refuse_tvd_without_reinforce(cfg, cfg.stage3)  # (stage 3 would, after stages 1 and 2)
    if cfg.distributed.devices * cfg.distributed.num_nodes > 1:
        echo("paser run trains in one process (devices, nodes and strategy ignored; the "
             "precision kept): for "
             "data-parallel training run `paser pretrain`, `train-policy`, `finetune` and "
             "`baselines` with --devices N first; paser run then skips them")
        cfg = in_one_process(cfg)
    saved = Path(run_dir) / "config.yaml"
    before = load_config(config_file=saved) if saved.is_file() else None
    if force or not precision_steps_done(cfg, run_dir):
        check_devices(cfg)  # stage 1's precision, before anything is read or removed
    run_dir, cfg = prepare_run_dir(run_dir, cfg, resume=False)
    for line in config_changes(before, cfg):
        echo(f"[config] {line}")
    variants = fingerprint_variants(cfg)
    fps = variants[0]
    steps = Steps(run_dir)
    if force:  # every step is redone: one that this run is cut short before, next time too
        steps.undo(list(steps.done), after="--force")
    device = setup(cfg)
    timings: dict[str, float] = {}

    before_fps = fingerprints(before) if before is not None else {}

    echo(f"[data] {describe(cfg.data, progress=show_progress)}")
    ident = data_identity(cfg.data, run_dir, progress=show_progress)
    seen = read_identity(run_dir)
    if ident is not None and seen is not None and seen.digest != ident.digest:
        echo(f"[data] the files the run reads changed since its steps read them: "
             f"{ident.changes(seen)}; the steps that read them run again")
    if ident is not None and not force:
        stamp_unrecorded(run_dir, steps, ident, seen, echo, variants)
    if not force:
        rehash_records(cfg, run_dir, steps, variants)

    def data_changed(name: str) -> bool:
        """Whether ``name`` finished on other files than the dataset's now."""
        record = steps.done.get(name, {}).get("data")
        return ident is not None and record is not None and record != ident.digest

    def why_again(name: str, stale: bool, missing: list[str]) -> str:
        """Why a step finished before runs again, where the [config] lines do not say."""
        record = steps.done.get(name, {}).get("fingerprint")
        if force:
            return ""
        if data_changed(name):
            return " (the data's files changed since it ran)"
        after = steps.done.get(name, {}).get("after")
        if stale and (record is not None or after is not None):
            return " (a step it reads was redone in this run)"
        if after == "--force":
            return " (paser run --force was stopped before it redid it)"
        if after is not None:  # by a run cut short before this step
            return f" (a step it reads, {after}, was redone since it ran)"
        if record is None:
            return ""
        if any(record == v[name] for v in variants):
            return f" (finished before, but {', '.join(missing)} is missing)" if missing else ""
        if before_fps.get(name) == fps[name]:  # the settings did not change: their hash did
            return (" (finished before by a version of paser that recorded its settings "
                    "differently; run again to be sure it matches this config)")
        return ""

    rebuilt: set[str] = set()  # the steps this run made new outputs of

    def step(name: str, fn, again: str | None = None, note: str | None = None) -> None:
        """Run ``name`` unless it finished before on this config and data (``again``: why
        it runs all the same; ``note``: what it does instead of its usual work). ``fn``
        returns False where it changed none of the outputs later steps read (stage 1
        keeping every model): those steps stay done."""
        # a step whose input was rebuilt in this run is stale even if its config is unchanged
        stale = any(before in rebuilt for before in INPUTS.get(name, ()))
        missing = [out for out in outputs(cfg, name) if not (run_dir / out).exists()]
        if (not force and not stale and not data_changed(name) and not missing and not again
                and any(steps.finished(name, v[name]) for v in variants)):
            echo(f"[{name}] done before with this config: skipped (--force to redo)")
            return
        resume = (not force and not data_changed(name) and name not in STARTS_OVER
                  and any(steps.started(name, v[name]) for v in variants))
        why = why_again(name, stale, missing)
        if again and not force and not stale and not data_changed(name):
            why = f" ({again})"  # only where nothing of this run's own makes it run
        echo(f"[{name}] {note or ('resuming' if resume else 'running')}{why}")
        # what reads this step's outputs is built on what it replaces: not finished until
        # redone, even where this run is cut short before it gets there
        held = {later: dict(steps.done[later]) for later in readers(name) if later in steps.done}
        steps.undo(readers(name), after=name)
        steps.start(name, fps[name], **({} if ident is None else {"data": ident.digest}))
        t0 = time.perf_counter()
        if fn(resume) is False:
            steps.done.update(held)  # written with the mark below
        else:
            rebuilt.add(name)
        timings[name] = round(time.perf_counter() - t0, 1)
        if ident is not None:
            record_identity(run_dir, ident)
        steps.mark(name, fps[name], seconds=timings[name],
                   **({} if ident is None else {"data": ident.digest}))
        echo(f"[{name}] finished in {timings[name]:.1f} s")

    # what commands of their own changed since the last paser run (said where nothing this
    # run redoes explains a step running again)
    other_cal, outdated = other_calibration(cfg, run_dir, before), report_outdated(run_dir)

    def stage1(resume: bool) -> bool:
        large = large_patches(cfg)  # said where stage 1 trains, which opens the split anyway
        if large:
            echo(f"[stage1] warning: {large}")
        files = None if ident is None else ident.digest
        # every model kept (stage1.json alone was missing): what reads them stays done
        changed = resume or force or not every_model_kept(cfg, run_dir, files)
        if not changed:
            echo("[stage1] every model trained before with these settings is kept: "
                 "stage1.json is written again, nothing after it is redone")
        # a model trained before with its own settings unchanged is kept (not with --force)
        pretrain(cfg, run_dir, resume=resume, show_progress=show_progress, reuse=not force,
                 files=files)
        return changed

    step("stage1", stage1)
    step("stage2", lambda resume: train_policy(cfg, run_dir, resume=resume,
                                               show_progress=show_progress))
    step("stage3", lambda resume: finetune(cfg, run_dir, resume=resume, show_progress=show_progress),
         note=None if cfg.stage3.epochs else "off in this config (stage3.epochs: 0): keeping "
         "stage 2's policy and the pool as the deployed router")
    if cfg.stage3.tvd_sweep:
        step("tvd", lambda resume: tvd_sweep(cfg, run_dir, resume=resume,
                                             show_progress=show_progress))
    if target_of(cfg) is not None:
        step("calibrate", lambda resume: calibrate_run(cfg, run_dir, echo), again=other_cal)
    else:
        drop_calibration(run_dir, steps, echo)
    if paper_config(cfg) is not None:
        step("paper", lambda resume: train_paper(cfg, run_dir, resume=resume,
                                                 show_progress=show_progress))
    data = None

    def baselines(resume: bool) -> None:
        nonlocal data
        data = data or load_stage_data(cfg, progress=show_progress, run_dir=run_dir)
        train_baselines(cfg, run_dir, resume, show_progress, data)

    step("baselines", baselines)
    results: dict = {}

    def report(resume: bool) -> None:
        nonlocal data, results
        data = data or load_stage_data(cfg, progress=show_progress, run_dir=run_dir)
        results, text = evaluate_all(cfg, run_dir, data, device, show_progress)
        echo(text)

    step("report", report, again=outdated)
    if not results:
        results = json.loads((run_dir / "results.json").read_text())
        echo((run_dir / "report.md").read_text())
    return results
