"""Seeded synthetic battery-electrode micro-tomography for 3-class segmentation.

Each sample is a label map (0 = pore, 1 = carbon-binder, 2 = nickel active material)
and an 8-bit grayscale image that imitates a low-resolution tomography slice of it.

Geometry and imaging (particle radii, binder film and clumps, blur, texture, noise) are in
pixels, as a detector's resolution is: a larger image is a larger field of view, not a
finer one. Two smooth fields scale with ``min(H, W)`` instead: the easy and hard regions
(``difficulty_scale``) and the domains of the binder streaks' direction, so a 128 x 128
tile of a 1,024 x 1,024 slice is more often all easy or all hard than a 128 x 128 sample.

- Labels: overlapping ellipses of log-normal radius (nickel, about 76 % of pixels);
  binder (about 12 %): a quarter of it is a film on particle surfaces that thickens into
  the necks between close particles, three quarters are clumps, blobs of a smooth random
  field anywhere in the pore space; the rest is pore (about 12 %). Every fraction is set
  per image by quantiles, so it holds for every image, not only on average.
- Image: per-phase attenuation (nickel bright, binder only a little brighter than pore),
  band-pass textures of equal power in pore (isotropic) and binder (oriented streaks,
  sub-resolution nano-porosity), a Gaussian point-spread function and noise.
- Difficulty: a smooth random field ``D`` in [0, 1] blends easy regions (binder clearly
  brighter than pore) with hard ones (binder and pore of equal mean grey, a little more
  noise), where only the texture's orientation structure tells them apart.

Why clumps, and why partial volume is off (``pv_factor`` 1), both measured with
``battery-quick``'s models at 16 stage-1 epochs each:
- With the film alone, where binder lies follows from where nickel is: the tiny f0 reads
  the geometry and comes within 0.008 mIoU of the large f2 (0.830 against 0.838), so
  capacity barely matters. Clumps decouple binder from geometry in the pore space.
- In the hard regions the texture must be readable, or no model can learn them: with
  all binder in clumps but the earlier imaging there (blur 1 px, partial volume 1.5,
  noise 0.07, a 6 px texture), f0, f1 and f2 all stopped at 0.655-0.663. Partial-volume
  resampling by even 1.25 erases the 4 px texture (the f1 - f0 gap, without
  distillation, fell from 0.049 to 0.015), so it stays available but off.

``generate_dataset`` writes the on-disk layout of the real dataset (see its docstring).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image

from paser.errors import ConfigError

PORE, CARBON, NICKEL = 0, 1, 2
LABEL_CODEC = {PORE: 0, CARBON: 255, NICKEL: 128}
"""Class index -> grey value of the label PNGs (the real dataset's codec)."""
SPLITS = ("train", "validation", "test")

PARAMS: dict[str, float] = {
    # geometry, in px (a smaller image is a smaller field of view, same resolution)
    "radius_mean": 14.0,  # mean particle radius
    "radius_sigma": 0.35,  # log-normal spread of radii
    "aspect_max": 1.35,  # ellipses: longest / shortest axis at most this
    "coverage": 1.6,  # expected disc area / image area (before the quantile fit)
    "nickel_frac": 0.76,
    "carbon_frac": 0.12,
    "frac_jitter": 0.02,  # per-image uniform jitter of both target fractions
    "neck_weight": 0.5,  # binder score d1 + w * d2: favours necks over open surfaces
    "binder_rough": 0.6,  # px, smooth noise on the binder score: ragged film edges
    "binder_rough_scale": 1.5,  # px, its correlation length
    "clump_share": 0.75,  # share of the binder in clumps placed at random in the pore space
    "clump_scale": 4.0,  # px, correlation length of the clump field
    # imaging, in [0, 1] grey units and pixels
    "grey_pore": 0.22,
    "grey_nickel": 0.78,
    "carbon_delta_easy": 0.16,  # binder minus pore grey in easy regions
    "carbon_delta_hard": 0.0,  # ... and in hard ones
    "texture_amp": 0.15,  # std of the band-pass textures of pore and binder
    "pore_texture": 1.0,
    "texture_post": 0,
    "texture_mode": "band",
    "motif_count": 8,
    "motif_size": 5,
    "motif_seed": 1234,
    "motif_density": 0.3,
    "pore_texture_period": 4.0,
    "shading": 0.0,
    "contrast_hard": 1.0,
    "offset_hard": 0.0,
    "shading_scale": 8.0,
    "texture_period": 4.0,  # px, centre of the texture band
    "texture_bandwidth": 0.03,  # 1/px, radial std of the band
    "texture_arc": 0.25,  # rad, angular std of the binder's oriented arcs
    "psf_easy": 0.5,  # px, Gaussian PSF sigma
    "psf_hard": 0.5,
    "pv_factor": 1.0,  # partial-volume down/up-sampling factor, hard regions (1: off, see above)
    "noise_easy": 0.025,
    "noise_hard": 0.03,
    "difficulty_scale": 0.18,  # smoothing of the difficulty field, relative to min(H, W)
    "domain_scale": 0.08,  # smoothing of the binder streaks' direction domains, the same way
    "difficulty_gain": 3.0,  # sigmoid gain: larger gives cleaner easy/hard regions
    "gain_jitter": 0.05,  # per-image multiplicative brightness jitter
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered (periodic, via FFT) white noise of unit std, float32 ``shape``.

    ``sigma`` in px. The FFT costs the same for any ``sigma``; a direct filter grows with it.
    """
    h, w = shape
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    gain = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx * fx + fy * fy))
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32)) * gain, s=shape)
    return (field / (field.std() + 1e-8)).astype(np.float32)


def _particle_distances(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances (px, float32 ``[H, W]``) to the nearest and second-nearest particle surface.

    Negative inside a particle. Each ellipse only updates a bounding box of radius
    ``r + reach`` around it (a handful of array ops per particle, not per pixel);
    farther pixels keep ``reach``, which is enough for the film and neck thresholds.
    """
    p = PARAMS
    r_mean = p["radius_mean"]
    reach = 1.5 * r_mean
    pad = r_mean  # centres also fall just outside the frame, so edges are not empty
    area = (h + 2 * pad) * (w + 2 * pad)
    e_r2 = r_mean**2 * np.exp(p["radius_sigma"] ** 2)
    n = rng.poisson(p["coverage"] * area / (np.pi * e_r2))
    radii = r_mean * rng.lognormal(-0.5 * p["radius_sigma"] ** 2, p["radius_sigma"], n)
    radii = np.clip(radii, 0.3 * r_mean, 3.0 * r_mean)
    cy = rng.uniform(-pad, h + pad, n)
    cx = rng.uniform(-pad, w + pad, n)
    aspect = rng.uniform(1.0, p["aspect_max"], n)
    theta = rng.uniform(0.0, np.pi, n)
    d1 = np.full((h, w), reach, np.float32)
    d2 = np.full((h, w), reach, np.float32)
    for r, y, x, a, t in zip(radii, cy, cx, aspect, theta, strict=True):
        ext = r * np.sqrt(a) + reach
        y0, y1 = max(0, int(y - ext)), min(h, int(y + ext) + 1)
        x0, x1 = max(0, int(x - ext)), min(w, int(x + ext) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = (np.arange(y0, y1, dtype=np.float32) - y)[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) - x)[None, :]
        u = (np.cos(t) * dx + np.sin(t) * dy) / np.sqrt(a)  # same area as the disc of radius r
        v = (np.cos(t) * dy - np.sin(t) * dx) * np.sqrt(a)
        d = np.sqrt(u * u + v * v) - r  # approximate signed distance, exact for a = 1
        b1, b2 = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]
        np.minimum(b2, np.maximum(b1, d), out=b2)
        np.minimum(b1, d, out=b1)
    return d1, d2


def _label_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Class indices uint8 ``[H, W]``: particles, then binder (film/necks, then clumps in
    the pore space), the rest pore."""
    p = PARAMS
    d1, d2 = _particle_distances(rng, h, w)
    jit = rng.uniform(-p["frac_jitter"], p["frac_jitter"], 2)
    nickel_frac, carbon_frac = p["nickel_frac"] + jit[0], p["carbon_frac"] + jit[1]
    # Grow/shrink every particle by the same offset to hit the nickel fraction exactly.
    offset = np.quantile(d1, nickel_frac)
    nickel = d1 <= offset
    # Binder score: small near a surface, smaller still between two close surfaces (necks).
    score = (d1 - offset) + p["neck_weight"] * (d2 - offset)
    score += p["binder_rough"] * _smooth_noise(rng, (h, w), p["binder_rough_scale"])
    n_carbon = int(round(carbon_frac * h * w))
    n_film = int(round((1.0 - p["clump_share"]) * n_carbon))
    label = np.full((h, w), PORE, np.uint8)
    label[nickel] = NICKEL
    label[_lowest(score, label == PORE, n_film)] = CARBON
    if n_carbon > n_film:
        # Clumps: blobs of a smooth field, anywhere in the pore space, whatever the geometry.
        clump = -_smooth_noise(rng, (h, w), p["clump_scale"])
        label[_lowest(clump, label == PORE, n_carbon - n_film)] = CARBON
    return label


def _lowest(score: np.ndarray, where: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of the ``n`` pixels of ``where`` with the lowest ``score`` (fewer on ties)."""
    free = score[where]
    if n <= 0:
        return np.zeros_like(where)
    if n >= len(free):
        return where.copy()
    return where & (score < np.partition(free, n)[n])


def _difficulty(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth difficulty field float32 ``[H, W]`` in [0, 1]; about half of the area is hard."""
    p = PARAMS
    field = _smooth_noise(rng, (h, w), p["difficulty_scale"] * min(h, w))
    return (1.0 / (1.0 + np.exp(-p["difficulty_gain"] * field))).astype(np.float32)


def _partial_volume(img: np.ndarray, factor: float) -> np.ndarray:
    """Box-average down-sampling by ``factor`` then linear up-sampling to the same shape."""
    from scipy import ndimage as ndi

    h, w = img.shape
    small = ndi.zoom(ndi.uniform_filter(img, int(round(factor))), 1.0 / factor, order=1)
    return ndi.zoom(small, (h / small.shape[0], w / small.shape[1]), order=1)[:h, :w]


def _textures(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Isotropic and oriented band-pass noise (unit std, float32 ``[H, W]``), same band.

    Both share the spectral ring of radius ``1 / texture_period``; the oriented one keeps
    only two opposite arcs of it (streaks across a local direction), so the two have equal
    power and differ only in orientation structure. Its direction takes one of three
    values, switching between smooth random domains.
    """
    p = PARAMS
    spec = np.fft.rfft2(rng.standard_normal((h, w)).astype(np.float32))
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    k0, bw = 1.0 / p["texture_period"], p["texture_bandwidth"]
    radius = np.hypot(fx, fy)
    ring = np.exp(-0.5 * ((radius - k0) / bw) ** 2)
    k1 = 1.0 / p["pore_texture_period"]
    spec2 = np.fft.rfft2(rng.standard_normal((h, w)).astype(np.float32))
    iso = np.fft.irfft2(spec2 * np.exp(-0.5 * ((radius - k1) / bw) ** 2), s=(h, w))
    angle = np.arctan2(fy, fx)
    phi = rng.uniform(0.0, np.pi)
    domains = np.stack([_smooth_noise(rng, (h, w), p["domain_scale"] * min(h, w))
                        for _ in range(3)])
    which = domains.argmax(0)
    oriented = np.zeros((h, w), np.float32)
    for k in range(3):
        # angular window of the arc, periodic in pi (the spectrum of a real field is symmetric)
        da = np.angle(np.exp(2j * (angle - phi - k * np.pi / 3))) / 2
        arc = ring * np.exp(-0.5 * (da / p["texture_arc"]) ** 2)
        oriented += np.where(which == k, np.fft.irfft2(spec * arc, s=(h, w)) / np.sqrt(arc.mean()), 0)
    iso /= iso.std() + 1e-8
    oriented /= oriented.std() + 1e-8
    return iso.astype(np.float32), oriented


def _motif_dictionary() -> np.ndarray:
    """Fixed dictionary float32 ``[M, K, K]`` of zero-mean, unit-norm random motifs."""
    p = PARAMS
    m, k = int(p["motif_count"]), int(p["motif_size"])
    d = np.random.default_rng(int(p["motif_seed"])).standard_normal((m, k, k)).astype(np.float32)
    d -= d.mean((1, 2), keepdims=True)
    return d / np.sqrt((d * d).sum((1, 2), keepdims=True))


def _motif_textures(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(pore, carbon) textures, unit std float32 ``[H, W]``, with the same power spectrum.

    Carbon: sparse random-sign impulses, each convolved with one motif of the fixed
    dictionary. Pore: Gaussian noise shaped to the dictionary's mean power spectrum.
    """
    p = PARAMS
    d = _motif_dictionary()
    m, k = d.shape[0], d.shape[1]
    pad = np.zeros((m, h, w), np.float32)
    pad[:, :k, :k] = d
    pad = np.roll(pad, (-(k // 2), -(k // 2)), axis=(1, 2))  # centre the motifs at the origin
    dspec = np.fft.rfft2(pad)
    spikes = (rng.random((m, h, w)) < p["motif_density"] / m).astype(np.float32)
    spikes *= rng.choice(np.array([-1.0, 1.0], np.float32), (m, h, w))
    carbon = np.fft.irfft2((np.fft.rfft2(spikes) * dspec).sum(0), s=(h, w))
    shape = np.sqrt((np.abs(dspec) ** 2).mean(0))
    pore = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((h, w))) * shape, s=(h, w))
    return (pore / (pore.std() + 1e-8)).astype(np.float32), (carbon / (carbon.std() + 1e-8)).astype(np.float32)


def _render(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """Tomography-like uint8 image ``[H, W]`` of a label map, difficulty varying in space."""
    # here, not at the top: every run loaded names its synthetic set by this module's
    # generator_fingerprint, and scipy.ndimage took 0.3 s of each `paser segment` start
    from scipy import ndimage as ndi

    p = PARAMS
    h, w = label.shape
    diff = _difficulty(rng, h, w)
    carbon = label == CARBON
    delta = p["carbon_delta_easy"] + (p["carbon_delta_hard"] - p["carbon_delta_easy"]) * diff
    if p["texture_mode"] == "motif":
        iso, oriented = _motif_textures(rng, h, w)
    else:
        iso, oriented = _textures(rng, h, w)
    grey = np.array([p["grey_pore"], 0.0, p["grey_nickel"]], np.float32)[label]
    grey[carbon] = p["grey_pore"] + delta[carbon]
    tex = np.where(label == PORE, p["pore_texture"] * iso, 0) + np.where(carbon, oriented, 0)
    tex *= p["texture_amp"]
    if not p["texture_post"]:
        grey += tex
    easy = ndi.gaussian_filter(grey, p["psf_easy"])
    hard = _partial_volume(ndi.gaussian_filter(grey, p["psf_hard"]), p["pv_factor"])
    img = easy + diff * (hard - easy)
    if p["texture_post"]:
        img += tex
    gain = 1.0 + diff * (p["contrast_hard"] - 1.0)
    shift = p["offset_hard"] + p["shading"] * _smooth_noise(rng, (h, w), p["shading_scale"])
    img = gain * img + diff * shift
    sigma = p["noise_easy"] + diff * (p["noise_hard"] - p["noise_easy"])
    img += sigma * rng.standard_normal((h, w), dtype=np.float32)
    img *= 1.0 + p["gain_jitter"] * rng.uniform(-1.0, 1.0)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def generate_sample(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (image uint8 [H, W], label uint8 [H, W] in class indices 0=pore, 1=carbon, 2=nickel).

    Deterministic in ``seed``; ``height`` and ``width`` (px) must be at least 32.
    """
    if height < 32 or width < 32:
        raise ConfigError(f"synthetic sample {height}x{width}: height and width must be >= 32")
    rng = np.random.default_rng(seed)
    label = _label_map(rng, height, width)
    return _render(rng, label), label


def sample_seed(seed: int, split_index: int, image_index: int) -> int:
    """Per-image seed: independent of worker count and order."""
    return int(np.random.SeedSequence([seed, split_index, image_index]).generate_state(1)[0])


def _write_chunk(out: str, height: int, width: int, seed: int, split: int, indices: range) -> np.ndarray:
    """Generate and write images ``indices`` of split ``split``; return class pixel counts [3]."""
    name = SPLITS[split]
    lut = np.array([LABEL_CODEC[c] for c in (PORE, CARBON, NICKEL)], np.uint8)
    counts = np.zeros(3, np.int64)
    for i in indices:
        image, label = generate_sample(height, width, sample_seed(seed, split, i))
        counts += np.bincount(label.ravel(), minlength=3)
        file = f"{name}_{i:05d}.png"
        Image.fromarray(image, mode="L").save(Path(out, f"{name}_images", file), format="PNG", compress_level=1)
        Image.fromarray(lut[label], mode="L").save(Path(out, f"{name}_label", file), format="PNG", compress_level=1)
    return counts


def _fractions(counts: np.ndarray) -> dict[str, float]:
    total = max(int(counts.sum()), 1)
    return {k: float(counts[c]) / total for k, c in (("pore", PORE), ("carbon", CARBON), ("nickel", NICKEL))}


def generate_dataset(
    out: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    height: int = 224,
    width: int = 256,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the dataset and return the stats dict (also written to out/stats.json).

    Layout: ``out/{train,validation,test}_images/<split>_<5-digit index>.png`` (8-bit grey
    input) and ``out/{split}_label/`` with the same names (8-bit grey, pore 0, carbon 255,
    nickel 128). ``workers`` processes (default ``os.cpu_count()``; 1 runs in-process)
    each write whole chunks of images; the files do not depend on ``workers``.
    """
    if height < 32 or width < 32:
        raise ConfigError(f"synthetic dataset {height}x{width}: height and width must be >= 32")
    start = time.perf_counter()
    out = Path(out)
    # a file (or a path inside one) was the file system's bare 'File exists' on a split folder
    taken = next((p for p in (out, *out.parents) if p.exists()), None)
    if taken is not None and not taken.is_dir():
        raise ConfigError(f"{out}: " + ("a file" if taken == out else f"{taken} is a file")
                          + ", not a folder; the synthetic set is written into a new or empty "
                          "folder: give --out a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out}: not empty; the synthetic set is written into a new or empty "
                          "folder (another set's images would mix with it): give another --out, "
                          "or empty it")
    sizes = (n_train, n_val, n_test)
    for name in SPLITS:
        (out / f"{name}_images").mkdir(parents=True, exist_ok=True)
        (out / f"{name}_label").mkdir(parents=True, exist_ok=True)
    workers = max(1, workers or os.cpu_count() or 1)
    chunk = max(1, min(32, sum(sizes) // (4 * workers) or 1))
    tasks = [
        (str(out), height, width, seed, s, range(i, min(i + chunk, n)))
        for s, n in enumerate(sizes)
        for i in range(0, n, chunk)
    ]
    counts = np.zeros((3, 3), np.int64)  # [split, class]
    with _Progress(progress, sum(sizes), _final(Path(out))) as bar:
        if workers == 1:
            for task in tasks:
                counts[task[4]] += _write_chunk(*task)
                bar.advance(len(task[5]))
        else:
            from paser.runtime import detached_worker

            with ProcessPoolExecutor(workers, initializer=detached_worker,
                                     initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(_write_chunk, *task): task for task in tasks}
                try:
                    for fut in as_completed(futures):
                        task = futures[fut]
                        counts[task[4]] += fut.result()
                        bar.advance(len(task[5]))
                except BaseException:  # Ctrl-C, SIGTERM: the chunks not begun are dropped
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    stats = {
        "fractions": _fractions(counts.sum(0)),
        "split_fractions": {name: _fractions(counts[s]) for s, name in enumerate(SPLITS)},
        "counts": dict(zip(SPLITS, sizes, strict=True)),
        "height": height,
        "width": width,
        "seed": seed,
        "params": dict(PARAMS),
        "seconds": round(time.perf_counter() - start, 3),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _final(out: Path) -> Path:
    """The folder a set is generated for: the cache's is written as ``NAME.partial`` and
    renamed when complete (:func:`paser.data.registry.ensure_dataset`)."""
    return out.with_name(out.name.removesuffix(".partial"))


class _Progress:
    """A rich progress bar over images, or nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, total: int, where: Path | None = None):
        self._bar = self._task = None
        if enabled:
            from rich.console import Console

            from paser.runtime import _Progress  # a line now and then in a log, as any bar

            self._bar = _Progress(transient=True, console=Console(stderr=True))
            self._task = self._bar.add_task(
                "synthetic images" + ("" if where is None else f" into {where}"), total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)


GENERATOR_VERSION = 2
"""Bump when the generator's code changes what it writes (the cache key includes it)."""


def generator_fingerprint() -> str:
    """Short hash of the generator's version and parameters: part of the cache folder name."""
    import hashlib

    blob = json.dumps({"version": GENERATOR_VERSION, "params": PARAMS}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]
