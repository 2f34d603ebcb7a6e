"""``paser data``: generate the synthetic battery set, check a dataset folder."""

from __future__ import annotations

from pathlib import Path

import typer

from paser.cli.common import data_app


@data_app.command("check")
def data_check(
    root: Path = typer.Argument(..., help="dataset folder"),
    overrides: list[str] = typer.Argument(
        None, help="data.* keys as paser run takes them; a volume dataset: data.volume=... "
        "data.labels=... data.slices={train: [0, 400], validation: [400, 450], test: "
        "[460, 500]} (docs/volumes.md)"),
    layout: str = typer.Option(None, "--layout", help="folder, cityscapes, battery or volume "
                               "(default: volume with data.volume, else detected from what is "
                               "in the folder)"),
    workers: int = typer.Option(2, "--workers", min=0, help="reader processes"),
) -> None:
    """Read every image and mask of a dataset folder (or the labelled slices of a volume);
    print the splits, the class frequencies and suggested class weights (or every bad file,
    each named with what is wrong)."""
    import shlex

    from paser.data.images import skipped_note
    from paser.data.registry import check_dataset

    r = check_dataset(root, layout, workers, overrides=overrides or ())
    typer.echo(f"{r['root']}: {r['layout']} layout")
    # a volume's images are its labelled slices
    unit = "slice" if r["layout"] == "volume" else "image"
    for split, s in r["splits"].items():
        typer.echo(f"  {split:<11} {s['images']:>6} "
                   f"{'labelled ' if 'slices' in s else ''}{unit}{'s' if s['images'] != 1 else ''}"
                   f" of {s['sizes']}, "
                   f"{s['channels']} channel{'s' if s['channels'] > 1 else ''}"
                   + (f": {_listed(s['slices'])}" if "slices" in s else "")
                   + (f" ({s['gray_colour']} colour files whose red, green and blue are "
                      "equal: gray saved as RGB, read as gray)" if s.get("gray_colour")
                      else ""))
    typer.echo("image files, and how they become [0, 1]:")
    kinds: dict[str, int] = {}
    for files in r["files"].values():
        for k, n in files.items():
            kinds[k] = kinds.get(k, 0) + n
    for k, n in sorted(kinds.items()):
        dtype = k.split()[0]
        how = ("by the type's range" if dtype in r["intensity"]["by_type_range"] else
               "by the intensity window below" if r["intensity"]["mode"] == "window" else
               "min-max per image")
        if k.endswith(" stack"):
            how += "; its first page only (a stack of pages is one image here)"
        typer.echo(f"  {n:>6} {k:<16} {how}")
    source = ("data.window as given" if r["intensity"].get("given")
              else f"0.5 / 99.5 percentiles of the training {unit}s")
    typer.echo(f"intensity: {r['intensity']['says']}"
               + (f" ({source}; kept in the run as intensity.json, applied unchanged by "
                  "segment and evaluate)" if r["intensity"]["window"] is not None else ""))
    low, high = r["intensity"]["floor"], r["intensity"]["peak"]
    if r["intensity"]["low_contrast"]:
        stored = r["intensity"]["stored_range"]
        window = (f"data.window=[{stored[0]},{stored[1]}] (the darkest and brightest "
                  "training pixels as stored; in the suggested line below)" if stored else
                  "data.window=[LOW,HIGH] with the stored values of black and white")
        typer.echo(f"the training pixels span {low:.4f} to {high:.4f} of their type's range "
                   f"({100 * (high - low):.1f} % of it: 12-bit camera data in 16-bit files, "
                   "or a reconstruction saved with a loose range, say): the models see "
                   f"little contrast; {window} scales them to [0, 1]")
    two = r["two_scalings"]
    if two:  # slices of one scan saved as float32 and as uint16, say
        fitted = r["intensity"]["window"]
        other = (f"by the window [{fitted[0]:.6g}, {fitted[1]:.6g}]" if fitted is not None
                 and r["intensity"]["mode"] == "window" else "per image")
        ranged, rest = (" and ".join(f"{n} {d}" for d, n in two[way].items())
                        for way in ("by_type_range", "otherwise"))
        typer.echo(f"warning: the image files are scaled two ways: {ranged} by their type's "
                   f"range, {rest} {other}; where they hold one kind of scan, the models see "
                   "it at two contrasts: save every image in one type and units")
    typer.echo("class frequencies in the training masks (share of labelled pixels):")
    # classes.yaml names the classes of folder and volume data; the others' are fixed
    absent = ("   (in no mask of any split: check classes.yaml and the masks, or remove it)"
              if r["layout"] in ("folder", "volume") else "   (in no mask of any split)")
    for (name, f), w in zip(r["class_fractions"].items(), r["suggested_class_weights"],
                            strict=True):
        typer.echo(f"  {name:<20} {100 * f:6.2f} %   weight {w:.4f}"
                   + (absent if name in r["absent_classes"] else
                      "   (no training pixel: the models cannot learn it, and its test IoU "
                      "will be 0)" if f == 0 else ""))
    typer.echo(f"  unlabelled pixels: {100 * r['unlabelled_fraction']:.2f} %")
    if r["absent_classes"] and r["layout"] == "cityscapes":
        typer.echo(f"Cityscapes' {len(r['class_fractions'])} classes are fixed: a few of its "
                   "cities can lack some, and a label that holds no label ids (a "
                   "_gtFine_labelTrainIds.png saved as _gtFine_labelIds.png) reads as other "
                   "classes and unlabelled pixels")
    if r["absent_classes"] and r["layout"] == "battery":
        from paser.data.battery import CODEC

        typer.echo(f"the battery layout reads its labels by one codec ({CODEC}); labels "
                   "that hold class indices (0, 1, 2) need a folder with a classes.yaml "
                   "(docs/data.md)")
    for split, missing in r["missing_in"].items():
        if missing:
            typer.echo(f"{split} holds no pixel of {', '.join(missing)}: "
                       + ("the early stop and calibration cannot see how the models do on "
                          "it" if split == "validation" else "the report's test IoU says "
                          "nothing about it") + "; give the split images that show it")
    for split, n in r["few_images"].items():
        typer.echo(f"warning: {split} holds {n} {unit}{'s' if n > 1 else ''}: "
                   + ("the early stop, the kept checkpoints and PaSeR's calibration read it, "
                      "and on so few they follow one draw of the data" if split == "validation"
                      else "the report's figures rest on it, and its bootstrap intervals will "
                      "be wide" if n > 1 else "the report's figures rest on it alone, and "
                      "its bootstrap has nothing to resample")
                   + {"folder": "; give it more images (one folder of images: a larger "
                                 "share in data.holdout)",
                      "volume": "; give it more labelled slices (data.slices)"}.get(
                       r["layout"], "; give it more images"))
    uniform = r["uniform_slices"]
    if uniform:
        between = (f", {uniform['between']} of them between slices that hold several classes"
                   if uniform["between"] else "")
        typer.echo(f"warning: {len(uniform['slices'])} of the {uniform['labelled']} labelled "
                   f"slices are all {uniform['class']} (value {uniform['value']}){between}: "
                   f"{_listed(uniform['slices'])}. If they are unlabelled slices, store them as "
                   "the ignore value (classes.yaml's 'ignore'): as they are, they train and "
                   f"score as {uniform['class']} everywhere")
    blank = r["blank_images"]
    if blank:
        many = len(blank) > 1
        typer.echo(f"warning: {len(blank)} {unit}{'s' if many else ''} "
                   f"{'reach' if many else 'reaches'} the models as one value in every pixel, "
                   f"yet {'their masks hold' if many else 'its mask holds'} several classes (a dark "
                   "or saturated frame, a slice outside the sample, or values wholly outside "
                   "the intensity window): " + _first_files(blank) + "; the models would "
                   "learn that a blank image holds those classes: remove "
                   + ("them, or set their masks" if many else "it, or set its mask")
                   + " to the ignore value")
    lost = r["unpaired_masks"]
    if lost:
        typer.echo(f"{len(lost)} mask{'s have' if len(lost) > 1 else ' has'} no image of "
                   f"the same name and {'are' if len(lost) > 1 else 'is'} not used: "
                   + _first_files(lost) + " (an image missing, or named otherwise: "
                   "images/NAME.* pairs with masks/NAME.*)")
    nested = r["nested_images"]
    if nested:
        typer.echo(f"{len(nested)} image{'s' if len(nested) > 1 else ''} in sub-folders of "
                   f"images/ {'are' if len(nested) > 1 else 'is'} not read: "
                   + _first_files(nested) + " (a folder dataset reads the files of images/ "
                   "itself, each with the mask of its name in masks/: move them there to "
                   "train on them)")
    for unused, read in r["unused_folders"]:
        typer.echo(f"{unused} is not read: " + (
            f"the validation split is {read}; keep one of them (move the other away)"
            if Path(unused).name == "val" else
            f"with {read}, the splits are train/, validation/ and test/ (a holdout cuts "
            "images/ where there are none); move its images into them, or the split folders "
            "away"))
    skipped = skipped_note([Path(f) for f in r["unread_images"]])
    if skipped:
        typer.echo(f"{skipped}; training goes on without them")
    if r["tile_advice"]:
        typer.echo(r["tile_advice"])
    # quoted as a shell needs: zsh (macOS's) globs an unquoted [...] and stops at "no
    # matches found"; a plain word stays as it is
    typer.echo("suggested (median frequency balancing): " + " ".join(
        map(shlex.quote, r["suggested_overrides"])))


def _first_files(paths: list[str]) -> str:
    """Files for a line of text: the first three, and how many more."""
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _listed(slices: list[int]) -> str:
    """Slice indices for a line of text: all of a few, else the first and last few."""
    if len(slices) <= 12:
        return ", ".join(map(str, slices))
    return (", ".join(map(str, slices[:5])) + ", ..., " + ", ".join(map(str, slices[-3:]))
            + f" ({len(slices)})")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="output folder (battery layout)"),
    n_train: int = typer.Option(240, "--n-train", min=3),
    n_val: int = typer.Option(20, "--n-val", min=1),
    n_test: int = typer.Option(40, "--n-test", min=1),
    height: int = typer.Option(224, "--height", min=32),
    width: int = typer.Option(256, "--width", min=32),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1),
    workers: int = typer.Option(None, "--workers", min=1, help="processes (default: all cores)"),
) -> None:
    """Generate the synthetic battery micro-structure dataset (same seed, same bytes)."""
    from paser.data.synthetic import generate_dataset

    stats = generate_dataset(out, n_train, n_val, n_test, height, width, seed=seed,
                             workers=workers)
    frac = stats["fractions"]
    typer.echo(f"wrote {n_train + n_val + n_test} images to {out} in {stats['seconds']:.1f} s; "
               f"class fractions pore {frac['pore']:.3f}, carbon {frac['carbon']:.3f}, "
               f"nickel {frac['nickel']:.3f}")
