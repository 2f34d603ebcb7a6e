"""The ``paser`` command: thin commands over the library, one module per task
(:mod:`~paser.cli.data`, :mod:`~paser.cli.train`, :mod:`~paser.cli.deploy`,
:mod:`~paser.cli.experiments`).

Errors a user can fix print one line on stderr and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

import typer

from paser.cli.common import app, state
from paser.errors import PaserError

__all__ = ["app", "entry", "main"]

# Each module registers its commands; in this order, `paser --help` lists them by task.
for _module in ("train", "deploy", "experiments", "data"):
    importlib.import_module(f"paser.cli.{_module}")


def _reflow(group: typer.Typer) -> None:
    """Each paragraph of a command's help as one line, for the terminal to wrap: typer keeps
    a docstring's line breaks, which cut `paser --help` into ragged lines at 80 columns. A
    command's first paragraph is its summary in the list of commands, whole: click would cut
    it at the first sentence's end or the line's ("Segment images and volumes with a trained
    run;...")."""
    for info in group.registered_commands:
        text = info.help or (info.callback.__doc__ if info.callback else None)
        if text:
            info.help = "\n\n".join(" ".join(p.split())
                                     for p in inspect.cleandoc(text).split("\n\n"))
            info.short_help = info.short_help or info.help.split("\n\n")[0]
    for sub in group.registered_groups:
        sub.short_help = sub.short_help or sub.typer_instance.info.help
        _reflow(sub.typer_instance)


_reflow(app)


#: the commands that continue an interrupted stage with --resume
RESUMED_WITH_FLAG = ("pretrain", "train-policy", "finetune", "baselines")


def _command(args: list[str]) -> str:
    """The command of a command line (``run``, ``segment``), options before it skipped."""
    return next((a for a in args if not a.startswith("-")), "")


#: commands that write nothing to continue from: stopped, they are simply run again
STARTED_OVER = ("evaluate", "calibrate", "config", "presets", "compare")


def interrupted(args: list[str]) -> str:
    """What Ctrl-C leaves, and how the interrupted command goes on."""
    command = _command(args)
    after = args[args.index(command) + 1:] if command else []
    sub = _command(after) if command == "data" else ""
    if command == "serve":
        return "paser serve stopped"
    if command in STARTED_OVER or sub == "check":
        return "interrupted"
    if command == "export":
        return "interrupted; the export folder is incomplete: run the same command again"
    if sub == "synth":  # it writes into an empty folder only
        return "interrupted; --out holds part of the set: empty it, or give another --out"
    if command in RESUMED_WITH_FLAG:
        return "interrupted; re-run with --resume to continue from the last epoch"
    if "--force" in args or "--overwrite" in args:  # run again as it was, it starts over
        flag = "--force" if "--force" in args else "--overwrite"
        return (f"interrupted; what finished is kept: run the same command again without "
                f"{flag} to continue where it stopped")
    return ("interrupted; what finished is kept: run the same command again to continue "
            "where it stopped")


#: whether SIGTERM stopped the command (systemd, Docker, a batch scheduler stopping the
#: job): handled as Ctrl-C is, what finished kept, and said so; the exit status is 143
_TERMINATED: list[bool] = []


def _terminate(signum, frame) -> None:
    _TERMINATED.append(True)
    raise KeyboardInterrupt


def _stopped() -> int:
    """Say how a stopped command goes on; its exit status (130 for Ctrl-C, 143 for SIGTERM:
    the ``paser`` command then ends by the signal itself, :func:`entry`)."""
    workers = sys.modules.get("paser.train.distributed")
    if workers is not None:  # the processes of a distributed stage stop with this one
        workers.stop_workers()
    how = interrupted(sys.argv[1:])
    overwriting = state.pop("overwriting", None)  # paser segment --overwrite: (out, claim)
    if overwriting is not None:
        from paser.segment import claim_of

        if claim_of(overwriting[0]) == overwriting[1]:  # not started over yet: "without
            # --overwrite" would take the folder's old outputs as done
            how = ("interrupted before --overwrite started the folder over: run the same "
                   "command again")
    kept = state.pop("kept", None)  # what of the volume under way is kept (paser segment)
    if kept is not None:
        how = how.replace("what finished is kept", f"what finished is kept ({kept})", 1)
    if not _TERMINATED:
        typer.echo(how, err=True)
        return 130
    typer.echo(how.replace("interrupted", "terminated (SIGTERM)", 1), err=True)
    return 143


def _written(filename) -> str:
    """The file an error names, as the user knows it: the temporary file paser writes a
    file through (``.name.tmp``, ``.name.XXXX.tmp``: whole or not at all) is that file."""
    import re
    from pathlib import Path

    path = Path(str(filename))
    match = re.fullmatch(r"\.(.+?)(\.[a-z0-9_]{8})?\.tmp", path.name)
    return str(path.with_name(match[1])) if match else str(filename)


#: commands that only run trained models: their threads share the cores with paser's own
#: reader and writer processes, and with whatever else the machine runs
INFERENCE = ("segment", "serve", "evaluate", "calibrate", "export")


def passive_threads(args: list[str], environ=os.environ) -> None:
    """An inference command's OpenMP threads sleep when they wait (``OMP_WAIT_POLICY=PASSIVE``,
    unless the environment says otherwise): spinning, a thread holds a core that another
    process needs. On 2 cores, f1 on a 1024 x 1024 image took 0.94 s with two other busy
    processes against 0.53 s passive, and as long (0.29 s) on an idle machine. Training
    keeps the spin: its many small steps ran 4 to 12 % slower passive. It has to be set
    before torch loads the OpenMP runtime, which reads it once."""
    if _command(args) in INFERENCE and "torch" not in sys.modules:
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def entry() -> None:
    """The ``paser`` command (and ``python -m paser``): :func:`main`; a command stopped by
    SIGTERM ends by that signal once it has said what finished, as a service manager
    expects of a process it stopped (an exit status of 143 reads as a failure to systemd).
    A caller of :func:`main` in its own process gets the status, and its ``finally`` runs."""
    import signal

    passive_threads(sys.argv[1:])
    try:
        main()
    except SystemExit as err:
        if _TERMINATED and err.code == 143:
            sys.stderr.flush()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        raise


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    import signal

    from paser.ranks import is_main_process  # (no torch: --help, presets, errors)

    if not is_main_process():  # a worker of distributed training: rank 0 reports
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    elif _command(sys.argv[1:]) != "serve":  # uvicorn stops the server on SIGTERM itself
        signal.signal(signal.SIGTERM, _terminate)
    state.pop("overwriting", None)  # an earlier command's, in this process (a notebook)
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(n) comes back as n
        if code == 130:  # typer's Exit(130) for Ctrl-C (no command exits so itself)
            code = _stopped() if is_main_process() else 130
        if isinstance(code, int) and code:
            sys.exit(code)
    except PaserError as err:
        if state["debug"]:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches every process: rank 0 says how to go on
        sys.exit(_stopped() if is_main_process() else 130)
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say
        sys.stderr.close()
        sys.exit(0)
    except OSError as err:  # the file system refused: which path, and why
        if state["debug"]:
            raise
        where = f"{_written(err.filename)}: " if err.filename else ""
        typer.echo(f"error: {where}{err.strerror or err}; check the path and its permissions "
                   "(and free space)", err=True)
        sys.exit(2)
    except MemoryError:  # numpy or torch could not allocate: say so, not a bare traceback
        if state["debug"]:
            raise
        typer.echo("error: out of memory: the command asked for more memory than this machine "
                   "could give; use smaller images, batches or sizes, fewer workers, or read "
                   "the data from disk as it goes (data.stream=always)", err=True)
        sys.exit(2)
    except (typer.Exit, typer.Abort) as err:
        sys.exit(getattr(err, "exit_code", 1))
    except Exception as err:  # a usage error: typer's own copy of click's, or click's
        show, code = getattr(err, "show", None), getattr(err, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        if _peer_stopped(err) and not state["debug"]:
            typer.echo("error: another process of this distributed training stopped, so this "
                       "one stops too; its error is above (the connection to it: "
                       f"{str(err).splitlines()[0][:200]}; --debug shows this process's "
                       "traceback)", err=True)
            sys.exit(1)
        raise


def _peer_stopped(err: Exception) -> bool:
    """Whether ``err`` is this process's collective failing because another process of its
    distributed training ended (its own error, one line, is what the user needs): gloo's
    "Connection closed by peer", or a backend error (NCCL), in an initialised process group
    of several processes."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    if dist.get_world_size() < 2:
        return False
    backend = getattr(dist, "DistBackendError", ())
    text = str(err)
    return isinstance(err, backend) or (isinstance(err, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer")))
