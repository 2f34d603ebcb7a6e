"""Build any model of a pool from a name, like ``smp.create_model``.

Names:
- ``unet_tiny``, ``unet_small``, ``unet_large``: the reference UNets (16,571 /
  1,080,595 / 17,275,459 parameters for 1 input channel, 3 classes). Keyword
  arguments override ``c0``, ``widths`` and ``dropout`` (the quick preset uses
  narrower widths) or set ``width_mult`` to scale every width.
- ``unet``: the same UNet with ``c0`` and ``widths`` given explicitly.
- ``smp:<Arch>:<encoder>``: any segmentation-models-pytorch architecture with a
  timm or smp encoder, for example ``smp:DeepLabV3Plus:resnet18`` or
  ``smp:Segformer:mit_b0``. Built with ``encoder_weights=None``: nothing is
  downloaded (:func:`load_weights` reads encoder weights from a local file).
- ``package.module:factory``: your own model, built by
  ``factory(in_channels=C, num_classes=K, **kwargs)``; it must map ``[B, C, H, W]`` to
  logits ``[B, K, H, W]``.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paser.errors import ConfigError
from paser.models.unet import UNET_SIZES, UNet

UNET_NAMES = tuple(f"unet_{size}" for size in UNET_SIZES)


def create_model(name: str, in_channels: int = 1, num_classes: int = 3,
                 encoder_file: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Return an untrained model ``[B, in_channels, H, W] -> logits [B, num_classes, H, W]``.

    ``encoder_file``: for an smp model whose encoder timm builds (:func:`timm_encoder`), a
    local file of the timm network's weights, which timm loads into it as it loads what it
    downloads (its feature extractor's names, its first convolution adapted to
    ``in_channels``)."""
    if name.startswith("smp:"):
        return _create_smp(name, in_channels, num_classes, encoder_file, **kwargs)
    if encoder_file is not None:
        raise ConfigError(f"model '{name}': an encoder file is for segmentation-models-pytorch "
                          "models, whose encoder timm builds")
    if ":" in name:
        return _create_imported(name, in_channels, num_classes, **kwargs)
    if name == "unet" or name in UNET_NAMES:
        spec = dict(UNET_SIZES[name.removeprefix("unet_")]) if name != "unet" else {}
        mult = kwargs.pop("width_mult", None)
        spec.update(kwargs)
        missing = {"c0", "widths"} - spec.keys()
        if missing:  # width_mult scales them: they are needed first
            raise ConfigError(f"model 'unet' needs {sorted(missing)}; e.g. c0=8, widths=[16, 32, 32]")
        if mult is not None:
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0:
                raise ConfigError(f"model '{name}': width_mult={mult!r} must be a number > 0 "
                                  "(0.25: a quarter of every width)")
            spec["c0"] = max(1, round(spec["c0"] * mult))
            spec["widths"] = [max(1, round(w * mult)) for w in spec["widths"]]
        try:
            return UNet(in_channels=in_channels, num_classes=num_classes, **spec)
        except TypeError as err:
            raise ConfigError(f"model '{name}': {err}") from None
    raise ConfigError(
        f"unknown model name '{name}'; use one of {', '.join(UNET_NAMES)}, 'unet', "
        "'smp:<Arch>:<encoder>' (e.g. smp:DeepLabV3Plus:resnet18) or an import path "
        "'package.module:factory'"
    )


def _create_imported(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    module_name, _, attr = name.partition(":")
    # importlib takes neither an empty nor a relative module name (its own ValueError,
    # TypeError)
    if not module_name or module_name.startswith(".") or not attr or ":" in attr:
        raise ConfigError(f"model '{name}': an import path is 'package.module:factory' (a "
                          "module on PYTHONPATH, a function or class of it), e.g. "
                          "mylab.nets:small_net")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as err:
        raise ConfigError(f"model '{name}': cannot import {module_name} ({err}); is it installed "
                          "or on PYTHONPATH?") from None
    except AttributeError:
        raise ConfigError(f"model '{name}': {module_name} has no '{attr}'") from None
    try:
        model = factory(in_channels=in_channels, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model '{name}': {err}; the factory is called as "
                          f"{attr}(in_channels=..., num_classes=..., **kwargs)") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model '{name}': the factory returned {type(model).__name__}, "
                          "not a torch.nn.Module")
    return model


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local PyTorch (``.pt``, ``.pth``; also inside a ``state_dict``
    or ``model`` entry) or safetensors file; nothing is downloaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign files: many kinds
        text = str(err)
        if "Weights only load failed" in text:  # torch's advice (weights_only=False) is no
            # option here: paser unpickles no code from a weights file
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            held = (f"it holds a pickled {found.group(1)}, not tensors alone" if found else
                    "not a PyTorch file of tensors alone (a whole model, other Python "
                    "objects, or another format)")
            raise ConfigError(f"{path}: cannot read weights: {held}, and paser loads no "
                              "pickled code; save the weights alone, torch.save("
                              "model.state_dict(), path), or as a .safetensors file") from None
        raise ConfigError(f"{path}: cannot read weights ({text.splitlines()[0][:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


#: the classifier heads of classification networks (torchvision, timm, the MiT files),
#: which an encoder file carries and an encoder has no use for (EfficientNet's conv_head
#: has its own norm, bn2, at the top level)
HEADS = ("fc", "head", "classifier", "conv_head", "bn2", "last_linear", "head_drop", "pre_logits")


def fit_encoder_state(state: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """An encoder's weights as a classification network's file holds them, made to fit an
    smp encoder of smp's own whose state dict is ``own`` (what smp does when it downloads
    them): the classifier head left out (:data:`HEADS`), and an RGB first convolution adapted
    by timm's ``adapt_input_conv`` (on grayscale data: its filters summed). An encoder that
    timm builds (``tu-``) takes its file through timm's own loader instead
    (:func:`create_model`'s ``encoder_file``)."""
    from timm.models import adapt_input_conv

    out = {}
    for k, v in state.items():
        mine = own.get(k)
        if mine is None and k.split(".")[0] in HEADS:
            continue
        # an RGB first convolution only (a stem of another width, a space-to-depth one, is
        # left to the fit check): timm's adaptation, as every timm version calls it
        if mine is not None and v.dim() == mine.dim() == 4 and v.shape[1] == 3 \
                and mine.shape[1] != 3 \
                and (v.shape[0], *v.shape[2:]) == (mine.shape[0], *mine.shape[2:]):
            v = adapt_input_conv(mine.shape[1], v)
        out[k] = v
    return out


def load_weights(model: nn.Module, path: str | Path, part: str | None = None) -> None:
    """Load a local weights file into ``model`` (or its submodule ``part``, e.g. an smp
    model's ``encoder``, the file then read as :func:`fit_encoder_state` makes it fit);
    every tensor must fit, or a ConfigError lists what does not."""
    target = model if part is None else getattr(model, part, None)
    if target is None:
        raise ConfigError(f"{path}: encoder weights given, but the model has no '{part}' "
                          "(only segmentation-models-pytorch models have one)")
    state = read_state_dict(path)
    own = target.state_dict()
    if part == "encoder":
        state = fit_encoder_state(state, own)
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or wrong:
        # the first tensor of another shape, both shapes: a class or channel count that
        # differs (models.num_classes, models.in_channels) shows in them
        first = (f"; {wrong[0]} is {list(state[wrong[0]].shape)} in the file, "
                 f"{list(own[wrong[0]].shape)} in the {part or 'model'}" if wrong else "")
        raise ConfigError(
            f"{path}: the weights do not fit the {part or 'model'}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            + (f", {len(wrong)} of another shape (e.g. {wrong[:2]}){first}" if wrong else ""))
    target.load_state_dict(state)


def timm_encoder(name: str) -> bool:
    """Whether the model ``name`` is an smp model whose encoder timm builds (``tu-``, and
    the ``timm-`` names smp converts to it)."""
    parts = name.split(":")
    return len(parts) == 3 and parts[0] == "smp" and _timm_universal(parts[2])


def _create_smp(name: str, in_channels: int, num_classes: int,
                encoder_file: str | Path | None = None, **kwargs: Any) -> nn.Module:
    parts = name.split(":")
    if len(parts) != 3 or not all(parts[1:]):
        raise ConfigError(f"model '{name}': expected 'smp:<Arch>:<encoder>', e.g. smp:Unet:resnet18")
    import segmentation_models_pytorch as smp

    _, arch, encoder = parts
    weights = kwargs.pop("encoder_weights", None)
    if weights is not None and weights is not False:
        raise ConfigError(
            f"model '{name}': kwargs encoder_weights={weights!r} would download weights, and "
            "paser downloads nothing at run time; give a local file as the model's own key, "
            "encoder_weights: /path/to/encoder.pth (docs/models.md)")
    if not _timm_universal(encoder):  # smp passes unknown keys to its own encoders, which
        _known_kwargs(name, arch, kwargs)  # drop them (timm's models refuse them)
    if encoder_file is not None:
        path = Path(encoder_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: weights file not found")
        if not _timm_universal(encoder):
            raise ConfigError(f"model '{name}': its encoder is smp's own; load its file with "
                              "load_weights(model, path, 'encoder')")
        try:  # timm reads the local file (pretrained_cfg's 'file'): nothing is downloaded
            return smp.create_model(arch, encoder_name=encoder, in_channels=in_channels,
                                    classes=num_classes, encoder_weights=True,
                                    pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except (KeyError, ValueError, TypeError, RuntimeError, OSError) as err:
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise ConfigError(f"{path}: timm cannot load it as {encoder.removeprefix('tu-')}'s "
                              f"weights ({first}); give a file of that network's "
                              "weights") from None
    try:
        return smp.create_model(arch, encoder_name=encoder, in_channels=in_channels,
                                classes=num_classes, encoder_weights=None, **kwargs)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:  # timm: RuntimeError
        raise ConfigError(f"model '{name}': segmentation-models-pytorch refused it: {err}") from None


def _timm_universal(encoder: str) -> bool:
    """Whether smp builds ``encoder`` through timm (``tu-``, and the ``timm-`` names it
    converts), which takes further keyword arguments of its own."""
    if encoder.startswith("tu-"):
        return True
    from segmentation_models_pytorch import encoders

    same = getattr(encoders, "is_equivalent_to_timm_universal", None)
    return encoder.startswith("timm-") if same is None else bool(same(encoder))


def _known_kwargs(name: str, arch: str, kwargs: dict) -> None:
    """Refuse keyword arguments that the smp architecture ``arch`` neither names nor takes
    from its ``**kwargs`` (the deprecated keys it still reads, e.g. ``decoder_use_batchnorm``)."""
    import inspect

    import segmentation_models_pytorch as smp

    cls = getattr(smp, "MODEL_ARCHITECTURES_MAPPING", {}).get(arch.lower())
    if cls is None:  # an unknown architecture (create_model says so), or another smp
        return
    named = {p.name for p in inspect.signature(cls.__init__).parameters.values()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    try:
        named |= set(re.findall(r"kwargs\.pop\(\s*[\"'](\w+)", inspect.getsource(cls.__init__)))
    except (OSError, TypeError):  # no source at hand: the named keys alone
        pass
    unknown = sorted(kwargs.keys() - named)
    if unknown:
        given = {"encoder_name", "in_channels", "classes", "encoder_weights"}  # paser's own
        raise ConfigError(f"model '{name}': {arch} takes no {', '.join(unknown)}; its keyword "
                          f"arguments are {', '.join(sorted(named - given))}")


class Resized(nn.Module):
    """Run ``model`` at a fixed ``size`` (H, W): the input is resized to it (bilinear) and
    the logits back to the input's size. For models built for larger images than the data
    (the paper runs EfficientViT on MNIST upscaled to 256 x 256)."""

    def __init__(self, model: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.model, self.size = model, (int(size[0]), int(size[1]))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        up = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return F.interpolate(self.model(up), size=(h, w), mode="bilinear", align_corners=False)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` normalises by batch statistics in training (BatchNorm of any
    dimension, SyncBatchNorm): then a batch of one image may not train it (one value per
    channel, as in DeepLabV3+'s pooling branch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
