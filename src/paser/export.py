"""ONNX export of a trained run, and onnxruntime models that run in the same routing path.

``export_run`` writes, for one image size, with a dynamic batch dimension:

- ``f0_mc.onnx``: f0's T Monte Carlo passes as one graph (the UNet's encoder once, the
  rest on T copies, mean softmax) with dropout kept active. ``torch.onnx`` turns
  ``nn.Dropout`` into an identity, so the export copy of f0 draws its masks explicitly
  (:class:`MaskDropout`, exported as ``RandomUniformLike``): every onnxruntime call
  draws fresh masks (they cannot be seeded from PyTorch);
- ``f0.onnx``: f0 deterministic (dropout off), logits;
- ``policy.onnx``: state ``[B, S, Hp, Wp]`` (the run's ``stage2.state``) -> logits
  ``[B, P, K+1]``;
- ``f1.onnx`` .. ``fK.onnx``: one patch (with its halo) -> logits;
- ``manifest.json``: sizes, T, grid, classes, model names, the cost table (GFLOP, with
  the convention), the policy's digest, and the measured onnxruntime-vs-PyTorch error
  of every deterministic part.

:func:`load_onnx_router` builds a :class:`~paser.routing.Router` from those files, so
``paser segment --engine onnxruntime`` runs the whole routed pipeline without PyTorch
models: padding, patching and stitching are the routing path's own.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from paser.cost import FLOP_CONVENTION
from paser.errors import CheckpointError, ConfigError, DataError
from paser.patches import PatchGrid
from paser.routing import CostTable, Router, model_digests
from paser.runtime import atomic_write_text, file_sha256
from paser.uncertainty import kept_on

MANIFEST = "manifest.json"


class MaskDropout(nn.Module):
    """Inverted dropout with an explicit uniform mask, always on: what ONNX keeps.
    ``channels``: one draw per channel of each image (``nn.Dropout1d/2d/3d``: a mask of
    ``[B, C, 1, ...]``), else one per element (``nn.Dropout``)."""

    def __init__(self, p: float, channels: bool = False):
        super().__init__()
        self.p, self.channels = float(p), channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the first element of each channel: a uniform draw shaped [B, C, 1, ...]
        like = x[(slice(None), slice(None)) + (slice(0, 1),) * (x.dim() - 2)] \
            if self.channels else x
        return x * (torch.rand_like(like) >= self.p).to(x.dtype) * (1.0 / (1.0 - self.p))


class MonteCarloF0(nn.Module):
    """f0's T passes as one batched forward: ``[B, C, H, W]`` -> mean probabilities.

    ``last_only``: only f0's last dropout is on (``mc_dropout=last``): the UNet's decoder up
    to it runs once, the rest on T copies. ``active=False`` (``mc_dropout=none``): none is
    on, f0's deterministic pass."""

    def __init__(self, f0: nn.Module, samples: int, last_only: bool = False,
                 active: bool = True):
        super().__init__()
        self.f0, self.samples, self.last_only = copy.deepcopy(f0).eval(), samples, last_only
        # the dropouts mc_predict keeps on (paser.uncertainty.mc_dropout); the others stay
        # off, as in eval mode
        for name, module in kept_on(self.f0, active, last_only):
            if isinstance(module, nn.AlphaDropout):
                raise ConfigError(f"f0's {name} is an AlphaDropout, which the ONNX export "
                                  "cannot keep on for Monte Carlo passes (it keeps "
                                  "nn.Dropout and nn.Dropout1d/2d/3d); export a run with "
                                  "mc_dropout none, or use those dropouts in f0")
            parent = self.f0.get_submodule(name.rpartition(".")[0]) if "." in name else self.f0
            setattr(parent, name.rpartition(".")[2],
                    MaskDropout(module.p, channels=not isinstance(module, nn.Dropout)))
        self.eval()  # MaskDropout is on in any mode; eval keeps norms and the rest deterministic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.samples
        if hasattr(self.f0, "shared") and self.last_only:
            logits = self.f0.last_pass([s.repeat(t, 1, 1, 1)
                                        for s in self.f0.shared(x, last_only=True)])
        elif hasattr(self.f0, "encode"):
            logits = self.f0.decode([s.repeat(t, 1, 1, 1) for s in self.f0.encode(x)])
        else:
            logits = self.f0(x.repeat(t, 1, 1, 1))
        probs = logits.float().softmax(1)
        return probs.reshape(t, x.shape[0], *probs.shape[1:]).mean(0)


def _onnxruntime(exporting: bool = True):
    """onnxruntime, or a clear error when the ``export`` extra is not installed; running an
    export needs onnxruntime alone (``exporting=False``), making one onnx and onnxscript
    too."""
    try:
        if exporting:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401  (torch.onnx's exporter)
        import onnxruntime
    except ImportError as err:
        if not exporting:
            raise ConfigError(f"running an ONNX export needs onnxruntime ({err}); install it "
                              "with: pip install onnxruntime (or 'paser[export]')") from None
        raise ConfigError(f"ONNX needs onnx, onnxruntime and onnxscript ({err}); install them "
                          "with: pip install 'paser[export]'") from None
    return onnxruntime


def _onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        torch.onnx.export(module, (example,), str(path), input_names=["input"],
                          output_names=["output"], dynamic_shapes=({0: batch},), dynamo=True)


def export_run(model, out_dir: str | Path, height: int, width: int) -> dict:
    """Export ``model`` (a :class:`paser.PaSeR`, any device) for ``height x width`` images
    into ``out_dir``; return the manifest (also written there)."""
    ort = _onnxruntime()

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():  # not the file system's 'File exists'
        raise DataError(f"--out {out_dir}: a file, not a folder; give a folder for the export")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    router = copy.deepcopy(model.router).cpu().eval()
    grid = router.grid
    hp, wp = grid.padded_size(height, width)
    ph, pw = hp // grid.rows + 2 * grid.halo, wp // grid.cols + 2 * grid.halo
    c = cfg.models.in_channels
    gen = torch.Generator().manual_seed(0)
    parts: dict[str, tuple[nn.Module, tuple[int, ...]]] = {
        "f0_mc": (MonteCarloF0(router.f0, router.mc_samples, router.mc_dropout == "last",
                               active=router.mc_dropout != "none"), (c, hp, wp)),
        "f0": (router.f0, (c, hp, wp)),
        "policy": (router.policy, (router.state_channels, hp, wp)),
        **{f"f{k}": (m, (c, ph, pw)) for k, m in enumerate(router.pool, start=1)},
    }
    parity, scaled = {}, {}
    for name, (module, shape) in parts.items():
        path = out_dir / f"{name}.onnx"
        _onnx(module, torch.rand(2, *shape, generator=gen), path)
        if name == "f0_mc":
            continue
        x = torch.rand(3, *shape, generator=gen)
        with torch.inference_mode():
            want = module(x).float().numpy()
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"input": x.numpy()})[0]
        parity[name] = float(np.abs(got - want).max())
        # float32 rounding grows with the value: the policy's logits on random states lie
        # far out of what it was trained on (1e4 and more), where 8e-3 is a few ulp; each
        # element's difference relative to its own size (above 1), so a small one off by
        # much is not hidden by a large one elsewhere
        scaled[name] = float((np.abs(got - want) / np.maximum(1.0, np.abs(want))).max())
    costs = router.costs(height, width)
    manifest = {
        "height": height, "width": width, "padded": [hp, wp], "patch_input": [ph, pw],
        "grid": [grid.rows, grid.cols], "halo": grid.halo, "mc_samples": router.mc_samples,
        "mc_dropout": router.mc_dropout, "uncertainty": router.signal,
        "state": router.state_kind, "in_channels": c, "num_classes": cfg.models.num_classes,
        "models": [cfg.models.f0.name] + [m.name for m in cfg.models.pool],
        "files": {name: f"{name}.onnx" for name in parts},
        "costs": {k: v for k, v in costs.to_dict().items() if k not in ("f0_mc", "fixed",
                                                                       "flop_convention")},
        "flop_convention": FLOP_CONVENTION, "policy": router.policy_digest,
        # each model's weights, as the run had them: a later load checks they are the run's
        "digests": model_digests(router),
        "max_abs_error_vs_torch": parity, "max_scaled_error_vs_torch": scaled,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        # the files as written: a load refuses files of another export mixed in
        "sha256": {f.name: file_sha256(f) for name in parts for f in _part_files(out_dir, name)},
    }
    # whole or not at all: a manifest cut short would name no file of this export
    atomic_write_text(json.dumps(manifest, indent=2), out_dir / MANIFEST)
    return manifest


def validation_size(cfg) -> tuple[int, int]:
    """Height and width of the run's validation images: the default export size."""
    from paser.data import validation_split

    images = validation_split(cfg.data, False, cfg.models.in_channels).images[:1]
    return int(images.shape[-2]), int(images.shape[-1])


class OnnxModel(nn.Module):
    """An onnxruntime session as a module of the routing path (CPU tensors in and out)."""

    def __init__(self, path: Path):
        super().__init__()
        ort = _onnxruntime(exporting=False)  # not installed: its own error, not the file's
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own Fail / InvalidProtobuf: a damaged file
            raise CheckpointError(f"{path}: onnxruntime cannot load it "
                                  f"({str(err).strip().splitlines()[0][:200]}); export "
                                  "again") from None
        # no weights of its own; one empty parameter tells callers the device (CPU)
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"input": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out)


class OnnxMonteCarlo(OnnxModel):
    """``f0_mc.onnx``: :func:`paser.uncertainty.mc_predict` calls :meth:`mc_probs`."""

    def __init__(self, path: Path, samples: int, last_only: bool = False):
        super().__init__(path)
        self.samples, self.last_only = samples, last_only

    def mc_probs(self, x: torch.Tensor, samples: int, last_only: bool = False) -> torch.Tensor:
        if samples != self.samples:
            runs = ("one pass" if self.samples == 1
                    else f"{self.samples} Monte Carlo passes")
            raise ConfigError(f"the ONNX f0 runs {runs}, not {samples}; export again with "
                              f"mc_samples={samples}")
        if last_only != self.last_only:
            on = {True: "only its last dropout", False: "every dropout"}
            raise ConfigError(f"the ONNX f0 keeps {on[self.last_only]} on, not "
                              f"{on[last_only]}; export again with the run's mc_dropout")
        return self(x)


class OnnxRouter(Router):
    """The routing path on onnxruntime models, for the exported image size."""

    def __init__(self, export_dir: Path, manifest: dict):
        files = {k: export_dir / v for k, v in manifest["files"].items()}
        pool = [OnnxModel(files[f"f{k}"]) for k in range(1, len(manifest["models"]))]
        dropout = manifest.get("mc_dropout", "all")
        # one deterministic pass: f0's logits (mc_predict takes their softmax)
        f0 = (OnnxModel(files["f0"]) if dropout == "none" else
              OnnxMonteCarlo(files["f0_mc"], manifest["mc_samples"], dropout == "last"))
        super().__init__(f0, OnnxModel(files["policy"]), pool,
                         PatchGrid(*manifest["grid"], halo=manifest["halo"]),
                         manifest["mc_samples"], manifest["in_channels"], dropout,
                         manifest.get("uncertainty", "entropy"), manifest.get("state", "paper"),
                         manifest["num_classes"])
        self.manifest = manifest
        self._costs[tuple(manifest["padded"])] = CostTable(**manifest["costs"])

    @property
    def policy_digest(self) -> str:
        """The exported policy's (the sessions hold no PyTorch weights to hash)."""
        return self.manifest["policy"]

    def costs(self, height: int, width: int) -> CostTable:
        if self.grid.padded_size(height, width) != tuple(self.manifest["padded"]):
            m = self.manifest
            raise DataError(f"the ONNX export runs {m['height']} x {m['width']} images (padded "
                            f"to {m['padded'][0]} x {m['padded'][1]}); this one is routed at "
                            f"{height} x {width} (its own size, or the run's tiles): export "
                            f"again with --height {height} --width {width}")
        return super().costs(height, width)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        self.costs(*x.shape[-2:])
        return super().forward(x, *args, **kwargs)


def load_onnx_router(export_dir: str | Path) -> OnnxRouter:
    """The exported run as a :class:`~paser.routing.Router` on onnxruntime."""
    export_dir = Path(export_dir)
    _onnxruntime(exporting=False)  # first: without it, an export made now would not run here
    path = export_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{export_dir}: no {MANIFEST}; run `paser export` into it first")
    try:
        manifest = json.loads(path.read_text())
        missing = [f for f in manifest["files"].values() if not (export_dir / f).is_file()]
    except (ValueError, KeyError, TypeError, AttributeError):  # cut short, or not paser's
        raise CheckpointError(f"{path}: not a manifest `paser export` wrote (cut short, or "
                              "another tool's); export again") from None
    if missing:
        raise CheckpointError(f"{export_dir}: {', '.join(missing)} missing; export again")
    written = manifest.get("sha256", {})
    # the weights beside each graph (`<part>.onnx.data`): left behind when only the .onnx
    # files were copied, which is not a damaged export but an incomplete copy
    left = [name for name in written if not (export_dir / name).is_file()]
    if left:
        raise CheckpointError(f"{export_dir}: {', '.join(left)} missing (the weights "
                              "`paser export` writes beside each .onnx file); copy the export "
                              "folder whole, or export again")
    changed = [name for name, digest in written.items()
               if file_sha256(export_dir / name) != digest]
    if changed:
        raise CheckpointError(f"{export_dir}: {', '.join(changed)} not as `paser export` wrote "
                              f"them with this {MANIFEST} (files of another export, or an "
                              "export cut short?); export again")
    return OnnxRouter(export_dir, manifest)


def _part_files(export_dir: Path, name: str) -> list[Path]:
    """A part's model file and the external-data file onnx may write beside it."""
    return [f for f in (export_dir / f"{name}.onnx", export_dir / f"{name}.onnx.data")
            if f.is_file()]


