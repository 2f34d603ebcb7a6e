"""What travels between the edge and the cloud tier: patches and predictions as compressed
numpy (``.npz``) or PNG, checked against size limits before anything is decoded.

Patches go out as 16-bit integers (``round(x * 65535)``): exact for 8- and 16-bit source
images, within 7.7e-6 for float ones, and half the bytes of float32.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image

NPZ = "application/x-npz"
PNG = "image/png"
#: dtypes a patch array may have, and the value that maps to 1.0
SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0,
          np.dtype(np.float16): 1.0, np.dtype(np.float32): 1.0, np.dtype(np.float64): 1.0}


class PayloadError(ValueError):
    """A request body the server will not decode: ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def encode_npz(**arrays: np.ndarray) -> bytes:
    """``np.savez_compressed`` into bytes."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def quantise(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as uint16 (``round(x * 65535)``)."""
    return np.rint(np.clip(x, 0.0, 1.0) * 65535.0).astype(np.uint16)


def decode_npz(body: bytes, name: str, max_values: int) -> np.ndarray:
    """Array ``name`` of an ``.npz`` body; its header (shape, dtype) is checked against
    ``max_values`` before the data is decompressed, so a small body cannot expand into a
    huge array. Pickled objects are refused."""
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            member = f"{name}.npy"
            if member not in zf.namelist():
                have = ", ".join(n.removesuffix(".npy") for n in zf.namelist()) or "none"
                raise PayloadError(400, f"the .npz has no array '{name}' (it has: {have})")
            with zf.open(member) as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(fh)
            if dtype not in SCALES:
                raise PayloadError(422, f"'{name}' has dtype {dtype}; send uint8, uint16, "
                                   "float16 or float32")
            if int(np.prod(shape, dtype=np.int64)) > max_values:
                raise PayloadError(413, f"'{name}' has shape {list(shape)}: more than the "
                                   f"server's {max_values} values per request; send fewer "
                                   "patches per request")
            with zf.open(member) as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)
    except PayloadError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise PayloadError(400, f"the body is not a readable .npz ({err})") from None


def decode_png(body: bytes, max_values: int) -> np.ndarray:
    """A PNG body as an array ``[H, W]`` or ``[H, W, C]`` (8- or 16-bit), its size checked
    before decoding."""
    try:
        with Image.open(io.BytesIO(body)) as img:
            if img.format != "PNG":
                raise PayloadError(415, f"the body is {img.format}, not PNG")
            w, h = img.size
            if w * h * len(img.getbands()) > max_values:
                raise PayloadError(413, f"a {w} x {h} PNG: more than the server's "
                                   f"{max_values} values per request")
            img.load()
            if img.mode == "P":
                img = img.convert("RGB")
            return np.asarray(img)
    except PayloadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise PayloadError(400, f"the body is not a readable PNG ({err})") from None


def encode_png(array: np.ndarray) -> bytes:
    """An 8-bit array ``[H, W]`` as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
