"""Finished runs side by side: each headline figure of their reports, run by run, with its
mean, standard deviation and range, and what the runs' configurations differ in.

One run is one draw (of the models' initial weights, the order of their batches, the
dropout masks): a figure holds only if it holds on fresh runs of other seeds. ``seed``
leaves the data alone (the split has ``data.split_seed``, the synthetic set
``data.synthetic.seed``), so the spread of seeds is the training's; the report's noise line
gives the test split's. ``paser compare runs/s0 runs/s1 runs/s2``
reads the runs' ``results.json`` and ``config.yaml`` and trains nothing. Where the runs
differ in more than their seed, the spread mixes the settings with the draw, and it says so.

Figures (test split, FLOPs as the runs' reports count them):

- ``f0`` .. ``fK``: each pool model's mIoU alone;
- ``PaSeR IoU``, ``PaSeR GFLOP``: the shipped router at its calibrated operating point;
- ``saved vs single models``: its share of GFLOP saved against the single-model frontier
  at equal IoU (negative: the frontier is cheaper there; a point above every single model
  is compared with the best one's GFLOP, as :func:`paser.frontier.curve_saving` does);
- ``PaSeR area - frontier``: the curve areas' difference (the mean IoU over the report's
  64 log-spaced budgets; the report's routers table, "above the frontier", not its table of
  PaSeR's points, whose "IoU - frontier" is one point's margin); ``captured``: its share of
  the oracle's headroom,
  ``of reachable``: of the part a mirror of the image keeps (the other-views oracle);
- ``cascade captured``: the entropy cascade's share; ``PaSeR area - cascade``: the areas'
  difference, as the report reads it and with each method's setting chosen on validation;
- ``Table 2``: PaSeR's GFLOP saved against the cascade matched to its IoU;
- ``PaSeR (paper) area - frontier``: the paper's method, as the report trains it;
- ``ms ratio to the frontier``: PaSeR's measured ms per image over the single models' at
  equal IoU (the report's wall clock; under 1: routing is faster in time too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from paser import frontier as FR
from paser.errors import CheckpointError

#: (name, format, reading of one run's results.json); a reading returns None where the
#: run's report does not have the figure (an older report, a pool of another size)
Figure = tuple[str, str, Callable[[dict], float | None]]


def _method(name: str, key: str) -> Callable[[dict], float | None]:
    return lambda r: r["methods"].get(name, {}).get(key)


def _area(name: str, minus: str = "Frontier", key: str = "curve_areas"
          ) -> Callable[[dict], float | None]:
    def read(r: dict) -> float | None:
        a = r.get(key) or {}
        return a[name] - a[minus] if name in a and minus in a else None
    return read


def _share(key: str, name: str) -> Callable[[dict], float | None]:
    def read(r: dict) -> float | None:
        value = (r.get(key) or {}).get(name)
        return None if value is None else 100 * value
    return read


def saved_vs_singles(r: dict) -> float | None:
    """PaSeR's share of GFLOP (%) saved at its operating point against the single-model
    frontier at equal IoU (:func:`paser.frontier.curve_saving`'s convention)."""
    front, p = r.get("curves", {}).get("Frontier"), r["methods"].get("PaSeR")
    if front is None or p is None:
        return None
    vertices = list(zip(front["gflops"], front["iou"], strict=True))
    need = FR.frontier_cost(vertices, p["iou"])
    need = vertices[-1][0] if need is None else need
    return 100 * (1 - p["gflops"] / need)


def shares_caveat(r: dict) -> str | None:
    """Why a run's shares of the oracle's headroom (``captured``, ``of reachable``,
    ``cascade captured``) are not to be read, as its report says it
    (:func:`paser.frontier.headroom_caveat`), or None."""
    areas = r.get("curve_areas") or {}
    if "Oracle" not in areas or "Frontier" not in areas:
        return None
    return FR.headroom_caveat(areas["Oracle"] - areas["Frontier"], r.get("headroom_floor"),
                              list((r.get("headroom_captured") or {}).values()))


def figures(models: Sequence[str]) -> list[Figure]:
    """The figures compared, for a pool of ``models`` (``f0`` .. ``fK``)."""
    return [
        *((m, ".4f", _method(m, "iou")) for m in models),
        ("PaSeR IoU", ".4f", _method("PaSeR", "iou")),
        ("PaSeR GFLOP", ".3f", _method("PaSeR", "gflops")),
        ("saved vs single models %", ".1f", saved_vs_singles),
        ("PaSeR area - frontier", "+.4f", _area("PaSeR")),
        ("captured %", ".0f", _share("headroom_captured", "PaSeR")),
        ("of reachable %", ".0f", _share("reachable_captured", "PaSeR")),
        ("cascade captured %", ".0f", _share("headroom_captured", "IDK-Cascade")),
        ("PaSeR area - cascade", "+.4f", _area("PaSeR", "IDK-Cascade")),
        ("PaSeR area - cascade, chosen on validation", "+.4f",
         _area("PaSeR", "IDK-Cascade", "curve_areas_chosen_on_validation")),
        ("Table 2 %", ".1f", lambda r: (r.get("table2") or {}).get("flops_saved_pct")),
        ("PaSeR (paper) area - frontier", "+.4f", _area("PaSeR (paper)")),
        ("ms ratio to the frontier", ".2f", lambda r: (r.get("wall_clock") or {}).get("ratio")),
    ]


def _read(run_dir: Path) -> tuple[dict, dict]:
    """A finished run's results.json and config.yaml, or what to do where it is not one."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no results.json; finish `paser run` into this folder "
                              "first (its report writes it), or give a finished run's folder")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise CheckpointError(f"{run_dir}: cannot read its report or config ({err}); run "
                              "`paser run` into it again to rewrite them") from err
    if not isinstance(results, dict) or "methods" not in results:
        raise CheckpointError(f"{path}: not a report of `paser run` (no 'methods'); give a "
                              "finished run's folder")
    why = _report_stale(run_dir, results)
    if why:
        raise CheckpointError(f"{path}: {why}, so its figures are not of the run as its "
                              "config.yaml and checkpoints now stand; write the report again "
                              f"first: paser run --run-dir {run_dir}")
    return results, config


def _report_stale(run_dir: Path, results: dict) -> str | None:
    """Why a run's report is not of its config and models as they are now, or None: the
    figures compared would be of other models, or of another config than the one whose
    keys the comparison says the runs differ in (a stage command, ``paser calibrate``, or a
    ``paser run`` of another config stopped before its report). Runs from before these
    records (no ``measured_on``, no ``steps.json``) are taken as they are."""
    from paser.checkpoints import read_steps
    from paser.experiments.finished import measured_now

    measured = results.get("measured_on")
    if measured is not None and not measured_now(run_dir, measured):
        return ("it was made on other models or another calibration than the run has now "
                "(a stage command or paser calibrate ran since)")
    done = read_steps(run_dir)
    if not done:
        return None
    from paser.config import load_config
    from paser.errors import ConfigError
    from paser.run import fingerprint_variants

    try:
        cfg = load_config(config_file=run_dir / "config.yaml")
    except ConfigError:  # a config of an older paser: its report is read as it is
        return None
    record = done.get("report", {}).get("fingerprint")
    if record is None or not any(record == v["report"] for v in fingerprint_variants(cfg)):
        return ("it was not written for the config in its config.yaml (steps.json has no "
                "finished report step of it: a stage command or a paser run of another "
                "config began since)")
    return None


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    """A config as ``{dotted key: value}``, lists of sections by index (``models.pool.1.epochs``,
    as overrides name them); lists of values stay values."""
    if isinstance(node, list) and any(isinstance(v, dict) for v in node):
        node = dict(enumerate(node))
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: node}


def _stats(values: list[float]) -> dict[str, float | int | None]:
    n = len(values)
    if not n:
        return {"runs": 0, "mean": None, "sd": None, "min": None, "max": None}
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"runs": n, "mean": mean, "sd": sd, "min": min(values), "max": max(values)}


def compare_runs(run_dirs: Sequence[str | Path]) -> dict:
    """Read finished runs and put their figures side by side (see the module doc).

    Returns ``{"runs": [{"run", "seed", "preset", "figures": {name: value}}],
    "figures": {name: {"runs", "mean", "sd", "min", "max"}}, "formats": {name: fmt},
    "differ": {config key: [value per run]}, "differ_neutral": the same for the keys that
    change no figure (how the data is read), "data_differ": bool, "shares_not_meaningful":
    {run: why its report says its shares of the headroom are not to be read},
    "holds": {claim: count}}``:
    ``sd`` is the sample standard deviation (``None`` for one run); a figure a run's report
    lacks is ``None`` there and left out of its statistics.
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise CheckpointError("give the folders of finished runs to compare, e.g. "
                              "paser compare runs/s0 runs/s1 runs/s2")
    seen = {}
    for d in dirs:
        key = d.resolve()
        if key in seen:
            same = "is given twice" if str(seen[key]) == str(d) else f"is {seen[key]}"
            raise CheckpointError(f"{d} {same}: give each run once (each counts once in a "
                                  "spread)")
        seen[key] = d
    read = [_read(d) for d in dirs]
    models = max((r.get("models") or [] for r, _ in read), key=len)
    table = figures(models)
    runs = [{"run": str(d), "seed": r.get("seed"), "preset": r.get("preset"),
             "figures": {name: get(r) for name, _, get in table}}
            for d, (r, _) in zip(dirs, read, strict=True)]
    flat = [_flat(c) for _, c in read]
    keys = sorted(set().union(*flat))
    every = {k: [f.get(k) for f in flat] for k in keys
             if any(f.get(k) != flat[0].get(k) for f in flat)}
    # how the data is read (reader processes, where the synthetic set is cached, streaming)
    # changes no figure: paser run retrains nothing for them, nor is a spread of them one
    # of settings
    from paser.run import NEUTRAL

    neutral = {f"{section}.{key}" for section, names in NEUTRAL.items() for key in names}
    differ = {k: v for k, v in every.items() if k not in neutral}
    data = {json.dumps([r.get("data_files"), r.get("data_seeds")]) for r, _ in read}
    trained = [r.get("stage1_machine") for r, _ in read]  # runs from before: not recorded
    # where a run's report says its shares of the oracle's headroom are not to be read
    unread = {str(d): why for d, (r, _) in zip(dirs, read, strict=True)
              if (why := shares_caveat(r)) is not None}
    counted = [r.get("flop_convention") for r, _ in read]  # how each report counts FLOPs

    def count(name: str, ok: Callable[[float], bool]) -> list[int]:
        values = [run["figures"][name] for run in runs if run["figures"][name] is not None]
        return [sum(ok(v) for v in values), len(values)]

    return {
        "runs": runs,
        "figures": {name: _stats([run["figures"][name] for run in runs
                                  if run["figures"][name] is not None])
                    for name, _, _ in table},
        "formats": {name: fmt for name, fmt, _ in table},
        "differ": differ,
        "differ_neutral": {k: v for k, v in every.items() if k not in differ},
        "data_differ": len(data) > 1,
        "machines": trained,
        "flop_conventions": counted,
        "shares_not_meaningful": unread,
        "holds": {"PaSeR's curve area above the frontier's": count(
                      "PaSeR area - frontier", lambda v: v > 0),
                  "PaSeR's curve area above the cascade's": count(
                      "PaSeR area - cascade", lambda v: v > 0),
                  "fewer GFLOP than the IoU-matched cascade (Table 2)": count(
                      "Table 2 %", lambda v: v > 0)},
    }


def flops_said(conventions: Sequence[str | None]) -> tuple[str, bool]:
    """What the runs' GFLOP are (``conventions``: each report's ``flop_convention``, None
    where it has none), and whether they are counted alike (else they do not compare)."""
    kinds = list(dict.fromkeys(c or "not recorded" for c in conventions))
    if len(kinds) == 1:
        return f"GFLOP: per image at inference ({kinds[0]}).", True
    return ("Their FLOPs are counted otherwise (" + " / ".join(kinds) + "): their GFLOP "
            "figures do not compare."), False


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value + 0.0, fmt)  # + 0.0: no "-0.0"


def format_comparison(result: dict) -> str:
    """:func:`compare_runs`'s result as markdown: what the runs differ in, then one table
    per group of figures (a row per run, then mean, sd, min and max), then what holds on
    how many runs."""
    runs, stats, fmts = result["runs"], result["figures"], result["formats"]
    differ = result["differ"]
    out = [f"# {len(runs)} run{'s' if len(runs) != 1 else ''} compared", ""]
    neutral = result.get("differ_neutral") or {}
    if not differ:
        out.append("Their configurations are identical (the seed too"
                   + ("; how their data is read aside" if neutral else "") + ")" + (
                       "." if result["data_differ"] else
                       ": the spread is the machine's and the code's, not a draw of the seed."))
    elif set(differ) == {"seed"}:
        out.append("They differ only in their seed: the spread is the training's draw"
                   + ("." if result["data_differ"] else
                      " on the same data (each report's noise line gives its test split's)."))
    else:
        out.append("They differ in " + ", ".join(
            f"`{k}` ({' / '.join(str(v) for v in vals)})" for k, vals in differ.items())
            + ": the spread mixes these settings with the draw.")
    if neutral:
        out.append("How they read their data differs (" + ", ".join(
            f"`{k}` ({' / '.join(str(v) for v in vals)})" for k, vals in neutral.items())
            + "): that changes no figure.")
    if result["data_differ"]:
        out.append("Their data differ (the reports' data files or data seeds): figures of "
                   "different data are compared.")
    from paser.train.distributed import machine_kind, machine_text

    kinds = {json.dumps(machine_kind(m), sort_keys=True): m
             for m in result.get("machines", []) if m}
    if len(kinds) > 1:
        out.append("Their pools trained on different kinds of machine (" + " / ".join(
            machine_text(m) for m in kinds.values()) + "): one seed trains other pools on "
            "each (their bf16 and threaded kernels add in other orders), so the spread "
            "mixes the machines with the draw.")
    flops, alike = (flops_said(result["flop_conventions"]) if result.get("flop_conventions")
                    else (None, True))  # a result of before the record: nothing said
    if not alike:
        out.append(flops)
    for run, why in (result.get("shares_not_meaningful") or {}).items():
        out.append(f"The shares of the oracle's headroom of {run} (captured %, of reachable %, "
                   f"cascade captured %) are not meaningful, as its report says: {why}.")
    if len(runs) == 1:
        out.append("One run is one draw: compare runs of other seeds for a spread.")
    names = list(fmts)
    split = names.index("PaSeR area - frontier")
    for title, group in (("Pool and operating point (test)", names[:split]),
                         ("Curves against the frontier and the cascade (test)",
                          names[split:])):
        out += ["", f"## {title}", "",
                "| run | seed | " + " | ".join(group) + " |",
                "|---|---|" + "---|" * len(group)]
        for run in runs:
            out.append(f"| {run['run']} | {run['seed']} | " + " | ".join(
                _cell(run["figures"][n], fmts[n]) for n in group) + " |")
        for stat in ("mean", "sd", "min", "max"):
            out.append(f"| {stat} | | " + " | ".join(
                _cell(stats[n][stat], fmts[n].lstrip("+") if stat == "sd" else fmts[n])
                for n in group) + " |")
    out += ["", "Holds on:"]
    out += [f"- {claim}: {n} of {of} runs" for claim, (n, of) in result["holds"].items()]
    out += ["", "Areas: the mean IoU over the reports' 64 log-spaced budgets; captured: the "
            "share of the oracle's headroom over the single-model frontier; sd: the sample "
            "standard deviation; -: not in that run's report."]
    if flops is not None and alike:
        out.append(flops)
    return "\n".join(out) + "\n"
