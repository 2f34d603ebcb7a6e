"""Errors a user can fix. Each message says what is wrong, where, and what to do."""


class PaserError(Exception):
    """Base class: the CLI prints these as one line on stderr and exits non-zero."""


class ConfigError(PaserError):
    """A config key, value or preset is invalid."""


class DataError(PaserError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class CheckpointError(PaserError):
    """A checkpoint is missing, corrupt, or from a different model pool."""


class RemoteAccessError(PaserError):
    """The remote tier refused this edge (a missing or wrong token) or this edge does not
    trust its certificate: a configuration error that stops the run, not an outage that
    falls back to f0."""
