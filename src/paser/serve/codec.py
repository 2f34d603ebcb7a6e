"""What travels between the edge and the cloud tier: images, patches and predictions as
compressed numpy (``.npz``) or PNG, checked against size limits before anything is
decoded.

Pixels go out as 8-bit integers when that is exact (an 8-bit source image), else as 16-bit
(``round(x * 65535)``: exact for 16-bit sources, within 7.7e-6 for float ones).
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image

from paser.errors import DataError

NPZ = "application/x-npz"
PNG = "image/png"
#: dtypes a patch array may have (in either byte order), and the value that maps to 1.0:
#: booleans are 0 and 1, as the image reader scales a bilevel image
SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.bool_): 1.0,
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
    """Values in [0, 1] as uint8 when ``x * 255`` are whole numbers (then exactly), else as
    uint16 (``round(x * 65535)``)."""
    x = np.clip(x, 0.0, 1.0)
    as8 = np.rint(x * 255.0)
    if np.array_equal(as8.astype(np.float32) / np.float32(255.0), x):
        return as8.astype(np.uint8)
    return np.rint(x * 65535.0).astype(np.uint16)


def read_npz(body: bytes, max_values: int) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` body. Their headers (shape, dtype) are checked against
    ``max_values`` (all arrays together) before anything is decompressed, so a small body
    cannot expand into a huge array; pickled objects are refused."""
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            members = [n for n in zf.namelist() if n.endswith(".npy")]
            total = 0
            for member in members:
                with zf.open(member) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(fh)
                if dtype.hasobject:
                    raise PayloadError(422, f"'{member[:-4]}' holds Python objects; send "
                                       "numeric arrays")
                total += int(np.prod(shape, dtype=np.int64))
                if total > max_values:
                    raise PayloadError(413, f"'{member[:-4]}' has shape {list(shape)}: more "
                                       f"than the server's {max_values} values per request; "
                                       "send fewer patches per request")
            arrays = {}
            for member in members:
                with zf.open(member) as fh:
                    arrays[member[:-4]] = np.lib.format.read_array(fh, allow_pickle=False)
            return arrays
    except PayloadError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise PayloadError(400, f"the body is not a readable .npz ({err})") from None


def decode_npz(body: bytes, name: str, max_values: int) -> np.ndarray:
    """Array ``name`` of an ``.npz`` body (:func:`read_npz`)."""
    return npz_array(read_npz(body, max_values), name)


def npz_array(arrays: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Array ``name`` of the arrays :func:`read_npz` read, or the 400 that says it is not
    there."""
    if name not in arrays:
        raise PayloadError(400, f"the .npz has no array '{name}' (it has: "
                           f"{', '.join(arrays) or 'none'})")
    return arrays[name]


def decode_png(body: bytes, max_values: int) -> np.ndarray:
    """A PNG body as an array ``[H, W]`` or ``[H, W, C]`` (8- or 16-bit), its size checked
    before decoding, then decoded as paser's image reader reads the same file (a 16-bit
    colour PNG at its 16 bits, a palette as its colours, alpha dropped)."""
    from paser.data.images import read_png_bytes

    try:
        with Image.open(io.BytesIO(body)) as img:
            if img.format != "PNG":
                raise PayloadError(415, f"the body is {img.format}, not PNG")
            w, h = img.size
            if w * h * len(img.getbands()) > max_values:
                raise PayloadError(413, f"a {w} x {h} PNG: more than the server's "
                                   f"{max_values} values per request")
        return read_png_bytes(body)
    except PayloadError:
        raise
    except DataError as err:  # a 16-bit one imagecodecs cannot decode
        raise PayloadError(400, f"the body is not a readable PNG ({err})") from None
    except Image.UnidentifiedImageError:  # its message names a BytesIO object
        raise PayloadError(400, "the body is not a readable PNG (not an image at all; an npz "
                           f"body goes with Content-Type {NPZ})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise PayloadError(400, f"the body is not a readable PNG ({err})") from None


def encode_png(array: np.ndarray) -> bytes:
    """An 8-bit array ``[H, W]`` as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
