"""What a run's data are: the content of every file its splits read (the images, their
labels and the class map; a training volume and its label volume), so that ``paser run``
trains again when they change and says what changed. A file is known by its bytes, not
by when it was written: data copied, moved, touched or regenerated alike train nothing
again; slices labelled since, a mask corrected in place (at any size) or images added
to the folder do.

Hashing reads every file once; the run keeps each file's digest beside its size and
modification time (``data.json``), so that a rerun reads again only the files that
changed since.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from paser.config import DataConfig
from paser.runtime import atomic_write_text, file_sha256
from paser.runtime import progress as progress_bar

#: in the run folder: the data its steps last read, and each file's digest by its stat
FILE = "data.json"


@dataclass(frozen=True)
class Identity:
    """The data's files by split (``{split: {name: sha256}}``; names relative to
    ``data.root`` where they lie under it) and their digest."""

    files: dict[str, dict[str, str]]

    @property
    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.files, sort_keys=True).encode()).hexdigest()[:12]

    def changes(self, before: Identity, limit: int = 3) -> str:
        """What changed since ``before``, in a line: files added, removed, rewritten and
        moved to another split, a few named."""
        def where(ident: Identity) -> dict[str, tuple[str, str]]:
            return {name: (split, sha) for split, files in ident.files.items()
                    for name, sha in files.items()}

        old, new = where(before), where(self)
        kinds = {
            "added": sorted(new.keys() - old.keys()),
            "removed": sorted(old.keys() - new.keys()),
            "rewritten": sorted(n for n in new.keys() & old.keys() if new[n][1] != old[n][1]),
            "moved to another split": sorted(n for n in new.keys() & old.keys()
                                             if new[n] != old[n] and new[n][1] == old[n][1]),
        }
        parts = []
        for what, names in kinds.items():
            if names:
                shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
                parts.append(f"{len(names)} {'file' if len(names) == 1 else 'files'} "
                             f"{what} ({shown})")
        return "; ".join(parts) or "the same files"


#: the hidden files of a zarr store that are part of its array (other hidden files, such
#: as .DS_Store, are not read)
ZARR_METADATA = {".zarray", ".zattrs", ".zgroup", ".zmetadata"}


def split_files(split) -> list[Path]:
    """The files one opened split reads: its images and labels, or its volumes' files (a
    zarr store's chunks and metadata, its linked folders entered)."""
    volumes = [getattr(split, name) for name in ("volume", "labels")
               if hasattr(getattr(split, name, None), "source")]
    if not volumes:
        return [Path(p) for p in (*split.images, *split.labels)]
    out: list[Path] = []
    for volume in volumes:
        if volume.files:  # a folder of slices
            out += [Path(f) for f in volume.files]
        elif Path(volume.path).is_dir():  # zarr
            out += sorted(Path(folder) / name
                          for folder, _, names in os.walk(volume.path, followlinks=True)
                          for name in names
                          if not name.startswith(".") or name in ZARR_METADATA)
        else:
            out.append(Path(volume.path))
    return out


def _name(path: Path, root: Path) -> str:
    """``path`` as the loader reached it, relative to ``data.root`` where it lies under it
    (links not followed: a file and a link to it are two images, and a folder reached
    through a link keeps its name when the link moves)."""
    for a, b in ((path, root), (path.absolute(), root.absolute())):
        try:
            return a.relative_to(b).as_posix()
        except ValueError:
            pass
    return str(path.absolute())


def _saved(path: Path) -> dict:
    """``data.json``'s content; one that cannot be read (cut short) is as none: its files
    are hashed again, and a run whose record of them is lost says so."""
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _write(path: Path, saved: dict) -> None:
    """Write ``data.json``; a run folder that cannot be written to (read-only, as a finished
    run may be) keeps what it had: its digests are found again next time."""
    try:
        atomic_write_text(json.dumps(saved), path)
    except OSError:
        pass


def data_identity(cfg: DataConfig, run_dir: str | Path, progress: bool = False,
                  keep: bool = True) -> Identity | None:
    """The identity of the dataset ``cfg`` reads (None for data built in memory, noisy
    MNIST); each file hashed once, unless ``run_dir``'s :data:`FILE` knows it at its size
    and modification time (the digests found are kept there, unless not ``keep``)."""
    from paser.data.registry import SPLITS, ensure_dataset, kind, open_unscaled
    from paser.errors import DataError

    if kind(cfg).open is None:
        return None
    root = ensure_dataset(cfg, progress=False)
    path = Path(run_dir) / FILE
    saved = _saved(path)
    known: dict[str, list] = saved.get("stat", {})
    lists = {split: split_files(open_unscaled(cfg, split, False)) for split in SPLITS}  # no window
    classes = root / "classes.yaml"
    if cfg.dataset in ("folder", "volume") and classes.is_file():  # the layouts that read it
        lists["class map"] = [classes]
    stat: dict[str, list] = {}
    files: dict[str, dict[str, str]] = {}
    total = sum(len(v) for v in lists.values())
    with progress_bar(progress and total > 200) as bar:
        task = bar.add_task("data: what the files are", total=total, info="")
        for split, paths in lists.items():
            files[split] = {}
            for p in paths:
                key = str(p.resolve())
                if key not in stat:  # a file of several splits (a volume's) is read once
                    try:
                        st = os.stat(key)
                        was = known.get(key)
                        sha = (was[2] if was is not None
                               and was[:2] == [st.st_size, st.st_mtime_ns] else file_sha256(key))
                    except OSError as err:
                        raise DataError(f"{p}: {err.strerror} while paser read the data's "
                                        "files (did it change meanwhile?); run again") from None
                    stat[key] = [st.st_size, st.st_mtime_ns, sha]
                files[split][_name(p, root)] = stat[key][2]
                bar.advance(task)
    if keep and stat != known:
        _write(path, {**saved, "stat": stat})
    return Identity(files)


def read_identity(run_dir: str | Path) -> Identity | None:
    """The data the run's steps last read (:func:`record_identity`), or None."""
    read = _saved(Path(run_dir) / FILE).get("read")
    return None if read is None else Identity(read)


def record_identity(run_dir: str | Path, ident: Identity) -> None:
    """Record ``ident`` as the data the run's steps read."""
    path = Path(run_dir) / FILE
    saved = _saved(path)
    if saved.get("read") != ident.files:
        _write(path, {**saved, "read": ident.files})


def since_trained(cfg: DataConfig, run_dir: str | Path, split: str) -> str | None:
    """What changed in the data since the run's steps read them, as a note for a command
    that measures the run on ``split`` now (``paser evaluate``), or None: the same files,
    or a run that recorded none. Files of ``split`` that were training files then are
    counted: the split's figures overstate what the models do on unseen images."""
    seen = read_identity(run_dir)
    if seen is None:
        return None
    now = data_identity(cfg, run_dir, keep=False)
    if now is None or now.digest == seen.digest:
        return None
    trained, then = seen.files.get("train", {}), seen.files.get(split, {})
    disjoint = split != "train" and not trained.keys() & then.keys()  # not one volume's
    leaked = disjoint and sum(trained.get(name) == sha
                              for name, sha in now.files.get(split, {}).items())
    return ("the data's files changed since this run trained on them: "
            f"{now.changes(seen)}"
            + (f"; {leaked} of the {split} split's {len(now.files.get(split, {}))} files "
               "(images and masks) were training files then, so its figures overstate "
               "how the models do on images they did not see" if leaked else ""))
