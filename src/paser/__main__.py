"""``python -m paser`` and the ``paser`` command: :func:`paser.cli.entry`, loaded first."""

import sys


def main() -> None:
    """The CLI, once its commands are loaded (about a third of a second): Ctrl-C before
    that, when nothing has begun, exits with status 130 and says so, as it does later;
    uncaught, it printed a KeyboardInterrupt traceback and ended the process by SIGINT."""
    try:
        from paser.cli import entry
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    entry()


if __name__ == "__main__":
    main()
