"""What the three stages share: device and seeding, atomic checkpoints, metric logs, progress."""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from paser.config import ExperimentConfig, load_config, save_config
from paser.errors import CheckpointError, ConfigError, DataError
from paser.runtime import keep_freed_memory

if TYPE_CHECKING:
    from paser.data import Tensors
    from paser.train.distributed import Dist


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"key 'device': unknown device '{name}'; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"key 'device': '{name}' asked for but CUDA is not available; use auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(cfg: ExperimentConfig) -> torch.device:
    """Threads, seed, the CPU allocator (:func:`paser.runtime.keep_freed_memory`) and device
    for a stage."""
    keep_freed_memory()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    return resolve_device(cfg.device)


def is_main_process() -> bool:
    """False in the worker processes launched for distributed training (before Fabric is
    set up, only the launcher's environment tells)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never half a file
    (the temporary file of a process killed mid-save is removed when a stage next starts:
    :func:`prepare_run_dir`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run the stage that writes it first")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a truncated or foreign file: torch raises many kinds
        first = str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: cannot load the checkpoint ({first}); delete it and "
                              "re-run the stage that writes it") from None


def cache_predictions(predict: Callable[[torch.Tensor], torch.Tensor], data: Tensors,
                      batch_size: int, path: Path, dist: Dist) -> np.ndarray:
    """``predict(images)`` for every image of ``data``, as a read-only float16 memory map of
    the ``.npy`` file ``path``: however large, it need not fit in memory.

    Rank 0 computes it (no gradients; the caller puts the model in eval mode) and renames
    it into place when complete; every process then opens it.
    """
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")  # removed at the next start if killed
        out, pos = None, 0
        with torch.inference_mode():
            for x, _ in data.batches(batch_size):
                y = predict(x.to(dist.device)).float().cpu().numpy()
                if out is None:
                    out = np.lib.format.open_memmap(tmp, "w+", np.float16,
                                                    (len(data), *y.shape[1:]))
                out[pos:pos + len(y)] = y
                pos += len(y)
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


def progress(enabled: bool = True) -> Progress:
    """A rich progress bar group; disabled bars cost nothing."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
    )


def prepare_run_dir(
    run_dir: str | Path, cfg: ExperimentConfig | None, resume: bool
) -> tuple[Path, ExperimentConfig]:
    """Create or reopen a run directory and return it with the config to use.

    A new run saves ``config.yaml``. On resume, the saved config is used; a config
    given as well must equal it (a changed config is a new run). The temporary files of a
    process killed mid-save (:func:`atomic_save`) are removed, whatever the case.
    """
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if is_main_process() and run_dir.is_dir():  # not distributed training's other processes
        for stale in run_dir.rglob(".*.tmp"):
            stale.unlink(missing_ok=True)
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
    if is_main_process():
        save_config(cfg, saved)
    return run_dir, cfg


@contextmanager
def timer() -> Any:
    start = time.perf_counter()
    box = {"s": 0.0}
    yield box
    box["s"] = time.perf_counter() - start
