"""Errors a user can fix. Each message says what is wrong, where, and what to do."""

from __future__ import annotations


class PaserError(Exception):
    """Base class: the CLI prints these as one line on stderr and exits non-zero."""


class ConfigError(PaserError):
    """A config key, value or preset is invalid."""


class DataError(PaserError):
    """A dataset file or folder is missing, unreadable or inconsistent."""

    #: each problem of an error that lists several (:meth:`of_every`), else none
    problems: list[str] = []
    #: the split whose files it names, without them, where the split opened all the same
    #: (:class:`paser.data.battery.SegmentationFiles`): ``paser data check`` reads the rest
    opened = None

    @classmethod
    def of_every(cls, problems: list[str], shown: int = 20) -> DataError:
        """One error for every problem found (one file each), so that one pass over a
        folder shows all of them: the message alone for one, else a list."""
        if len(problems) == 1:
            return cls(problems[0])
        more = len(problems) - shown
        err = cls(f"{len(problems)} problems; fix each and check again:\n"
                  + "\n".join(f"  - {p}" for p in problems[:shown])
                  + (f"\n  ... and {more} more" if more > 0 else ""))
        err.problems = list(problems)
        return err

    def each(self) -> list[str]:
        """Its problems one by one: those it lists, or itself."""
        return self.problems or [str(self)]


class CheckpointError(PaserError):
    """A checkpoint is missing, corrupt, or from a different model pool."""


class RemoteAccessError(PaserError):
    """The remote tier refused this edge (a missing or wrong token) or this edge does not
    trust its certificate: a configuration error that stops the run, not an outage that
    falls back to f0."""
