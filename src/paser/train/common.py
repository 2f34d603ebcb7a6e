"""What the three stages share: their setup, the run directory, metric logs and cached
predictions (device, seeds, progress and atomic writes are :mod:`paser.runtime`'s)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from paser.checkpoints import load_checkpoint
from paser.config import ExperimentConfig, load_config, save_config
from paser.errors import ConfigError, DataError
from paser.ranks import is_main_process
from paser.runtime import (
    atomic_save,
    atomic_write_text,
    hold_run_dir,
    keep_freed_memory,
    progress,
    resolve_device,
    seed_everything,
)

if TYPE_CHECKING:
    from paser.data import Tensors
    from paser.train.distributed import Dist


def setup(cfg: ExperimentConfig) -> torch.device:
    """Threads, seed, the CPU allocator (:func:`paser.runtime.keep_freed_memory`) and device
    for a stage."""
    keep_freed_memory()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    return resolve_device(cfg.device)


def seed_role(cfg: ExperimentConfig, role: str) -> None:
    """Seed the global generators for one model from the run's seed and the model's role
    (``f0``, ``f1``, a baseline's), before it is built: its initial weights and the
    dropout draws of its training then depend on nothing else, so that changing one model
    (its epochs, its width, where its early stop falls) leaves the others as they were."""
    digest = hashlib.sha256(f"paser {cfg.seed} {role}".encode()).digest()
    seed_everything(int.from_bytes(digest[:8], "little") >> 1)


def cache_predictions(predict: Callable[[torch.Tensor], torch.Tensor], data: Tensors,
                      batch_size: int, path: Path, dist: Dist, label: str = "",
                      show_progress: bool = False) -> np.ndarray:
    """``predict(images)`` for every image of ``data``, as a read-only float16 memory map of
    the ``.npy`` file ``path``: however large, it need not fit in memory.

    Rank 0 computes it (no gradients; the caller puts the model in eval mode) and renames
    it into place when complete; every process then opens it. ``label`` names its progress
    bar (a pass over a training split: minutes on a folder of large slices).
    """
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")  # removed at the next start if killed
        out, pos = None, 0
        with torch.inference_mode(), progress(show_progress) as bar:
            task = bar.add_task(label or f"predicting {path.stem}", total=len(data), info="")
            for x, _ in data.batches(batch_size):
                y = predict(x.to(dist.device)).float().cpu().numpy()
                if out is None:
                    out = np.lib.format.open_memmap(tmp, "w+", np.float16,
                                                    (len(data), *y.shape[1:]))
                out[pos:pos + len(y)] = y
                pos += len(y)
                bar.update(task, completed=pos)
        if out is None:
            raise DataError(f"no images to predict for {path.name}")
        out.flush()
        del out
        os.replace(tmp, path)
    dist.barrier()
    return np.load(path, mmap_mode="r")


class MetricLog:
    """Per-epoch metrics as JSON lines; on resume, lines past the resumed epoch are dropped,
    and so is a line a killed process left half-written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, model: str, epoch: int) -> None:
        """Keep only the lines of ``model`` up to ``epoch`` (and every other model's)."""
        if not self.path.is_file():
            return
        keep = [json.dumps(r) for r in self.read() if not _is_later(r, model, epoch)]
        atomic_write_text("".join(f"{line}\n" for line in keep), self.path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def end_epoch(self, record: dict, state: dict, last_path: str | Path) -> None:
        """Write an epoch's line, then its resume checkpoint (:func:`atomic_save`).

        In this order, a process killed between the two leaves a line past the checkpoint:
        :meth:`truncate_after` drops it on resume and the replayed epoch writes it again.
        The other way round, the run would resume after an epoch whose line is lost."""
        self.write(record)
        atomic_save(state, last_path)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the tail of a killed write (or a blank line)
                continue
        return records


def _is_later(record: dict, model: str, epoch: int) -> bool:
    return record.get("model") == model and record.get("epoch", -1) > epoch


def absolute_root(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``data.root`` absolute, as a run saves it: the run is read from other
    folders later (evaluate, calibrate, segment). A ``~`` is the home folder, as everywhere
    paser reads a folder: the shell leaves it as it is in ``data.root=~/mydata``."""
    if cfg.data.root is None or cfg.data.root.is_absolute():
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"root": cfg.data.root.expanduser().absolute()})})


def prepare_run_dir(
    run_dir: str | Path, cfg: ExperimentConfig | None, resume: bool
) -> tuple[Path, ExperimentConfig]:
    """Create or reopen a run directory and return it with the config to use.

    A new run saves ``config.yaml``, ``data.root`` made absolute. On resume, the saved
    config is used; a config given as well must equal it (a changed config is a new run). The temporary files of a
    process killed mid-save (:func:`atomic_save`) are removed, whatever the case.
    """
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if is_main_process() and (cfg is not None or saved.is_file()):
        hold_run_dir(run_dir)  # before its temporary files are touched
    if cfg is not None:
        cfg = absolute_root(cfg)
    if is_main_process() and run_dir.is_dir():  # not distributed training's other processes
        for stale in run_dir.rglob(".*.tmp"):
            stale.unlink(missing_ok=True)
    stored = None
    if saved.is_file():
        stored = load_config(config_file=saved)
        if cfg is None:
            return run_dir, stored
        how = {"distributed"}  # how it is trained may change on resume, not what
        if stored.model_dump(exclude=how) != cfg.model_dump(exclude=how) and resume:
            raise ConfigError(
                f"{saved}: the run was made with a different config; drop --resume to start "
                "over in this folder, or pick a new --run-dir"
            )
    elif cfg is None:
        raise ConfigError(f"{run_dir}: no config.yaml here; give --preset or --config")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process() and stored != cfg:
        save_config(cfg, saved)  # unchanged: not rewritten (a finished run may be read-only)
    return run_dir, cfg


def check_finite(module: torch.nn.Module, where: str, lr_key: str) -> None:
    """A :class:`ConfigError` once ``module``'s weights hold NaN or infinity (the training
    diverged): said after the epoch it happened, not as a crash stages later."""
    if not all(torch.isfinite(p).all() for p in module.parameters()):
        raise ConfigError(f"{where}: the weights became NaN or infinite (the training "
                          f"diverged); lower {lr_key} and train again")


#: the checkpoints built on a stage's outputs: gone stale when the stage starts over
DOWNSTREAM = {"stage1": ("policy.pt", "policy_last.pt", "stage3.pt", "stage3_last.pt"),
              "stage2": ("stage3.pt", "stage3_last.pt")}


def drop_downstream(run_dir: Path, stage: str) -> None:
    """Remove the checkpoints of the stages after ``stage`` (which starts from scratch), so
    that nothing loads a policy trained on the models it replaces: until those stages run
    again, ``paser evaluate`` and ``segment`` say which stage to run instead of mixing old
    and new models."""
    if is_main_process():
        for name in DOWNSTREAM.get(stage, ()):
            (run_dir / "checkpoints" / name).unlink(missing_ok=True)
        # the TVD sweep's variants (tvd/<threshold>/) are fine-tuned from these outputs
        # too: cut short before the sweep starts them over (PaSeR (paper) runs stages 2, 3
        # and its sweep under one resume), --resume would finish them from the last
        # checkpoints of the models or policy replaced
        for last in (run_dir / "tvd").glob("*/checkpoints/stage3_last.pt"):
            last.unlink(missing_ok=True)


def forget_progress(*paths: Path) -> None:
    """Remove the last-epoch checkpoints ``paths`` of what a call trains from scratch (in
    the main process): one an earlier config left, not yet overwritten when the call is cut
    short, would be what ``--resume`` goes on from, its last epoch taken for this one's."""
    if is_main_process():
        for path in paths:
            Path(path).unlink(missing_ok=True)


def resume_state(last_path: Path, resume: bool, device: torch.device,
                 restore: dict[str, Any]) -> dict | None:
    """The last-epoch checkpoint a stage resumes from, or ``None`` to start afresh (no
    ``resume``, or no checkpoint yet).

    Each entry of ``restore`` maps a key of the checkpoint to what its state dict goes
    into: a module or an optimizer, or a list of them for a list of states (each copies
    it onto its own device). The global random state is restored too (:func:`rng_state`),
    so the resumed epochs draw what they would have.

    The checkpoint is read onto the CPU, whatever ``device``: torch takes a random state
    from a CPU tensor only, and read onto a GPU, the CPU generator's state stopped every
    resume there ('RNG state must be a torch.ByteTensor').
    """
    if not (resume and Path(last_path).is_file()):
        return None
    state = load_checkpoint(last_path, "cpu")
    for key, target in restore.items():
        many = isinstance(target, list)
        for obj, sd in zip(target if many else [target], state[key] if many else [state[key]],
                           strict=True):
            obj.load_state_dict(sd)
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:  # none from a run on the CPU
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global random state a last-epoch checkpoint keeps for :func:`resume_state`: the
    CPU generator's (``rng``), and training on a GPU, that GPU's too (``cuda_rng``):
    dropout and the Monte Carlo passes draw there (stages 2 and 3's exploration draws on
    the CPU's generator and moves its draws to the GPU)."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state
