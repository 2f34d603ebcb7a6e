"""A trained run's models, read back: checkpoints, the pool's models, the policy and the
:class:`paser.routing.Router` they make.

Everything that loads a run for inference (the API, ``paser segment``, the server,
export) comes here, never to :mod:`paser.train`; the stages use the same functions to
build what they train.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from paser import data
from paser.config import ExperimentConfig, ModelSpec, load_config
from paser.data.folders import ClassMap
from paser.data.registry import found_from
from paser.errors import CheckpointError, DataError
from paser.models import PooledPolicy, RoutingPolicy, create_model
from paser.models.registry import Resized, load_weights, timm_encoder
from paser.patches import PatchGrid
from paser.routing import Router
from paser.runtime import atomic_write_text, place
from paser.uncertainty import state_channels


def run_config(run_dir: str | Path, loader: str = "PaSeR.load") -> ExperimentConfig:
    """The config a run was trained with; a clear error when ``run_dir`` is not a run
    (``loader``: the call its example names, the one that was given ``run_dir``)."""
    if not isinstance(run_dir, (str, os.PathLike)):  # Path(None) says only "got NoneType"
        raise CheckpointError(f"run_dir={run_dir!r}: a run directory is needed; give the "
                              "folder a run was trained into (the one that holds its "
                              f"config.yaml), e.g. {loader}('runs/demo')")
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise CheckpointError(f"{run_dir}: a file, not a run directory; give the folder a "
                              "run was trained into (the one that holds its config.yaml)")
    if not (run_dir / "config.yaml").is_file() and (run_dir / "manifest.json").is_file():
        run = run_dir.parent if is_run(run_dir.parent) else None  # the default, <run>/onnx
        raise CheckpointError(  # paser.export's MANIFEST (not imported: it needs onnx)
            f"{run_dir}: an ONNX export (paser export's manifest.json), not a run directory; "
            f"give the run it was exported from, and the export as its own argument: "
            f"PaSeR.load_onnx({'run_dir' if run is None else repr(str(run))}, "
            f"export_dir={str(run_dir)!r}), or paser segment --run-dir "
            f"{'<run>' if run is None else run} --engine onnxruntime --onnx {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        near = sorted(str(p) for p in run_dir.parent.glob("*/") if is_run(p))[:3]
        raise CheckpointError(
            f"{run_dir}: " + ("not a run directory (no config.yaml)" if run_dir.is_dir() else
                              "no such folder") + "; train one into it first "
            f"(`paser run --run-dir {run_dir}`, or `paser pretrain` and `paser train-policy`)"
            + (f", or give a run: {', '.join(near)}" if near else ""))
    cfg = load_config(config_file=run_dir / "config.yaml")
    return cfg.model_copy(update={"data": found_from(cfg.data, run_dir)})


def checkpoint_files(run_dir: str | Path) -> dict[str, tuple[int, int]]:
    """The run's checkpoint files (paths under ``checkpoints/``), each by size and
    modification time: what tells whether a command trained anything."""
    folder = Path(run_dir) / "checkpoints"
    return ({str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns)
             for f in folder.rglob("*") if f.is_file()} if folder.is_dir() else {})


#: the command that writes a checkpoint, by the start of its name
WRITERS = {"policy": "paser train-policy", "stage3": "paser finetune",
           "base_": "paser baselines", "f": "paser pretrain"}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's dict; a missing or unreadable file is a :class:`CheckpointError`
    that says which stage writes it."""
    path = Path(path)
    if not path.is_file():
        writer = next((c for start, c in WRITERS.items() if path.name.startswith(start)), None)
        run = path.parent.parent
        raise CheckpointError(
            f"{path}: checkpoint not found; run the stage that writes it first: paser run "
            f"--run-dir {run} (it skips what is done)"
            + (f", or {writer} --run-dir {run}" if writer else ""))
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a truncated or foreign file: torch raises many kinds
        first = str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: cannot load the checkpoint ({first}); delete it and "
                              "re-run the stage that writes it") from None


def build_model(cfg: ExperimentConfig, spec: ModelSpec, initial: bool = True) -> nn.Module:
    """The model of a spec (wrapped to run at ``spec.input_size`` if set), with the spec's
    initial ``weights`` and ``encoder_weights`` when ``initial`` (training starts from
    them; trained weights come from the run's checkpoints)."""
    # an encoder timm builds takes its file through timm's own loader; smp's, through ours
    by_timm = bool(initial and spec.encoder_weights and timm_encoder(spec.name))
    model = create_model(spec.name, cfg.models.in_channels, cfg.models.num_classes,
                         encoder_file=spec.encoder_weights if by_timm else None, **spec.kwargs)
    if initial and spec.encoder_weights and not by_timm:
        load_weights(model, spec.encoder_weights, "encoder")
    if initial and spec.weights:
        load_weights(model, spec.weights)
    return Resized(model, spec.input_size) if spec.input_size else model


def _identity(spec: ModelSpec | dict) -> tuple:
    """What must match between a checkpoint and the config: name, kwargs, input size."""
    d = spec if isinstance(spec, dict) else spec.model_dump(mode="json")
    size = d.get("input_size")
    return d.get("name"), d.get("kwargs"), list(size) if size else None


def model_roles(cfg: ExperimentConfig) -> list[tuple[str, ModelSpec]]:
    """``[("f0", spec), ("f1", spec), ...]``: f0 first, then the pool."""
    return [("f0", cfg.models.f0)] + [(f"f{k}", s) for k, s in enumerate(cfg.models.pool, 1)]


def load_trained(run_dir: str | Path, cfg: ExperimentConfig, role: str, device="cpu",
                 spec: ModelSpec | None = None, channels_last: bool = True) -> nn.Module:
    """The best checkpoint of a role (``f0``, ``f1``, ..., or a baseline's) in eval mode,
    placed by :func:`paser.runtime.place` (``channels_last=False``: in the default layout,
    for models that run on patches).

    ``spec`` defaults to the role's entry in the config's pool."""
    spec = spec or dict(model_roles(cfg))[role]
    ckpt = load_checkpoint(Path(run_dir) / "checkpoints" / f"{role}.pt", device)
    stored = ckpt.get("spec") or {}
    if _identity(stored) != _identity(spec):
        raise CheckpointError(
            f"{run_dir}/checkpoints/{role}.pt holds model {' '.join(map(str, _identity(stored)))}"
            f", but the config asks for {' '.join(map(str, _identity(spec)))}; use the run's own "
            "config or re-run stage 1"
        )
    model = place(build_model(cfg, spec, initial=False), device, channels_last)
    _load_weights(model, ckpt["model"], f"{run_dir}/checkpoints/{role}.pt", cfg)
    return model.eval()


def _load_weights(model: nn.Module, state: dict, where: str, cfg: ExperimentConfig) -> None:
    """``state`` into ``model``; weights of another shape (the config's class or channel
    count changed since they were trained) are a :class:`CheckpointError` that says so."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(
            f"{where}: its weights do not fit the config's model (models.num_classes "
            f"{cfg.models.num_classes}, models.in_channels {cfg.models.in_channels}: one of "
            "them, or the architecture, changed since it was trained); use the run's own "
            "config or re-run stage 1") from None


def make_policy(cfg: ExperimentConfig, num_models: int) -> RoutingPolicy | PooledPolicy:
    """A fresh policy as the config describes it (architecture, state, head, stride)."""
    rows, cols = cfg.grid
    s2 = cfg.stage2
    channels = state_channels(s2.state, cfg.models.in_channels, cfg.models.num_classes)
    if s2.policy == "pooled":  # (members > 1 with reinforce: refused by the config)
        return PooledPolicy(cfg.grid, num_models, channels, s2.hidden,
                            gain_head=s2.objective == "gain", members=s2.members)
    return RoutingPolicy(rows * cols, num_models, in_channels=channels, head=s2.head,
                         grid=cfg.grid, stride=s2.stride, gain_head=s2.objective == "gain")


def build_router(cfg: ExperimentConfig, run_dir: str | Path, device: torch.device,
                 policy_state: dict | None = None, pool_states: list[dict] | None = None
                 ) -> Router:
    """The stage-1 models (optionally with fine-tuned pool weights) and a policy."""
    grid = PatchGrid(*cfg.grid, halo=cfg.halo)
    roles = [role for role, _ in model_roles(cfg)]
    k = len(roles) - 1
    policy = make_policy(cfg, len(roles)).to(device)
    if pool_states is not None and len(pool_states) != k:
        raise CheckpointError(f"{run_dir}: the fine-tuned checkpoint holds a pool of K = "
                              f"{len(pool_states)} models, the config asks for K = {k}; use "
                              "the run's own config.yaml or re-run stages 1 to 3")
    if policy_state is not None:
        try:
            policy.load_state_dict(policy_state)
        except RuntimeError:
            raise CheckpointError(f"{run_dir}: the policy checkpoint does not fit the config's "
                                  f"{grid} grid and pool of K = {k} models (its head, or the "
                                  "grid, differs); use the run's own config.yaml or re-run "
                                  "stages 2 and 3") from None
    # f0 runs on whole images, channels-last on CPU; the pool on patches, where channels-last
    # was slower (unet_small 1.29 x, unet_large 1.13 x on 56 x 64 patches; docs/benchmarks.md)
    f0 = load_trained(run_dir, cfg, "f0", device)
    pool = [load_trained(run_dir, cfg, role, device, channels_last=False) for role in roles[1:]]
    if pool_states is not None:
        for role, model, state in zip(roles[1:], pool, pool_states, strict=True):
            _load_weights(model, state, f"{run_dir}: the fine-tuned {role}", cfg)
    router = Router(f0, policy, pool, grid, cfg.mc_samples, cfg.models.in_channels,
                    cfg.mc_dropout, cfg.uncertainty, cfg.stage2.state,
                    cfg.models.num_classes).to(device)
    # stage 2, calibration and the report score the same frozen pool on the same splits
    router.outcome_cache = outcome_cache(run_dir)
    router.cost_cache = router.outcome_cache.parent / "costs.json"
    return router


#: the folder of a run in which ``paser run`` trains PaSeR (paper) (:mod:`paser.train.paper`)
PAPER_DIR = "paper"


def outcome_cache(run_dir: str | Path) -> Path:
    """Where a run keeps its pool's outcomes on each split (:mod:`paser.outcomes`):
    ``cache/outcomes`` in the run; in a run's ``paper/`` folder (PaSeR (paper), trained on
    the run's own stage-1 pool) the run's, so that the pool is not run again on the splits
    the run scored it on. The entries are named by the pool's weights, the grid and the
    images, so sharing them cannot mix two pools."""
    run_dir = Path(run_dir)
    if run_dir.name == PAPER_DIR and is_run(run_dir.parent):
        return run_dir.parent / "cache" / "outcomes"
    return run_dir / "cache" / "outcomes"


def is_run(path: Path) -> bool:
    """Whether ``path`` holds a run: its config and its checkpoints' folder."""
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


#: Where a run keeps its label codec: the class map of its training data, as written.
CODEC_FILE = "classes.yaml"


#: the steps whose checkpoints (or calibration) a loaded run uses
LOADED_STEPS = ("stage1", "stage2", "stage3")


def read_record(path: Path, what: str, fix: str) -> dict:
    """``path``'s JSON object: one cut short, not JSON, not an object or not readable is a
    :class:`CheckpointError` that names the file, says why (``what`` the file should be,
    where it is JSON but not one) and what to do (``fix``)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # truncated, not JSON, or not readable
        record = err
    if not isinstance(record, dict):
        why = record if isinstance(record, Exception) else f"not {what}"
        raise CheckpointError(f"{path}: cannot read it ({why}); {fix}")
    return record


def read_steps(run_dir: str | Path) -> dict:
    """The run's ledger ``steps.json`` (each step's record by its name; empty when there is
    none). An unreadable one is refused, as a truncated checkpoint or results.json is: read
    as empty, every finished step would train again, and a stage stopped mid-way would
    load as if it had finished."""
    path = Path(run_dir) / "steps.json"
    if not path.is_file():
        return {}
    fix = ("it records which steps of the run finished. Put back a copy of it, or delete it "
           f"and `paser run --run-dir {run_dir}` runs every step again")
    done = read_record(path, "a record of steps", fix)
    if not all(isinstance(r, dict) for r in done.values()):
        raise CheckpointError(f"{path}: cannot read it (not a record of steps); {fix}")
    return done


def unfinished_steps(run_dir: str | Path, steps: tuple[str, ...] = LOADED_STEPS) -> list[str]:
    """Those of ``steps`` that ``steps.json`` shows begun and not finished: a ``paser run``
    or stage command training them (again) now, or stopped while it did."""
    done = read_steps(run_dir)
    return [s for s in steps if "started" in done.get(s, {})
            and "fingerprint" not in done.get(s, {})]


def save_label_codec(run_dir: str | Path, cfg: ExperimentConfig) -> None:
    """Keep the training data's label codec in the run (``classes.yaml``), so that label
    PNGs are written in it wherever the run is used, the data there or not."""
    atomic_write_text(data.label_codec(cfg.data).to_yaml(), Path(run_dir) / CODEC_FILE)


def label_codec(run_dir: str | Path | None, cfg: ExperimentConfig) -> ClassMap:
    """The codec a run's label PNGs are written in: its ``classes.yaml`` (stage 1 writes
    it), else, for a run older than that, the configured dataset's."""
    saved = None if run_dir is None else Path(run_dir) / CODEC_FILE
    if saved is not None and saved.is_file():
        return ClassMap.read(saved)
    try:
        return data.label_codec(cfg.data)
    except DataError as err:
        raise DataError(f"{err}; or copy the dataset's classes.yaml into the run folder "
                        f"{run_dir}") from None
