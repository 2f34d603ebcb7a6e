"""The cloud tier: f1..fK of a trained run behind HTTP (FastAPI), for edges that run f0 and
the policy themselves and send only the patches routed to a pool model.

``GET /healthz`` (the run folder's name, the models, the load); ``GET /v1/models`` (the
run's path, names, parameters, GFLOP per patch, weight digests, the halo patches must
carry, the limits); ``POST /v1/segment?model=fK`` with patches as
``.npz`` (array ``patches`` ``[N, C, h, w]``, or ``image`` ``[B, C, H, W]`` with ``index``
``[N]``: the server cuts them) or a PNG of N patches stacked vertically (``count=N``),
answering class probabilities or labels for the patches' centres. Without ``model=``, one
``.npz`` holds ``image`` and one ``index_fK`` per model it asks, and the answer one
``probs_fK`` (or ``labels_fK``) each: the image travels once for every model
(``"index_per_model"`` in ``/v1/models`` says a server takes it). Every
error is a JSON ``{"error": ...}`` with a 4xx status (5xx only for the server's own
failures); none stops the server.

With a token, every path but ``/healthz`` needs ``Authorization: Bearer <token>``; without
it (or with another) the answer is a 401, before the body is read. Every request gets an id
(``X-Request-Id``: the client's when it is sane) and one line on the ``paser.serve`` logger:
id, method, path, status, model, patches, ms, client; never a payload, a header or the
token.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import json
import logging
import re
import secrets
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from paser.api import too_small
from paser.cost import FLOP_CONVENTION, gflops_per_sample
from paser.data.images import Intensity, native, to_channels
from paser.errors import PaserError
from paser.metrics import predicted_classes
from paser.models import count_parameters
from paser.routing import weights_digest
from paser.serve import codec
from paser.serve.codec import NPZ, PNG, SCALES, PayloadError

MiB = 2 ** 20
#: paths open without the token: a load balancer's health check
OPEN_PATHS = {"/healthz"}
#: a client's X-Request-Id is kept when it looks like this (a UUID, a hex or base64url id)
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
log = logging.getLogger("paser.serve")


def run_image_size(model) -> tuple[int, int] | None:
    """The run's image size: from its ``results.json``, else its validation split, else
    ``None`` (the data is not on this machine)."""
    results = None if model.run_dir is None else Path(model.run_dir) / "results.json"
    if results is not None and results.is_file():
        try:  # a report cut short (a full disk, a copy stopped) is as none: the split says
            size = json.loads(results.read_text()).get("image_size")
        except (OSError, ValueError, AttributeError):
            size = None
        if size:
            return int(size[0]), int(size[1])
    try:
        from paser.export import validation_size

        return validation_size(model.config)
    except (PaserError, OSError):
        return None


def describe_models(model, image_size: tuple[int, int] | None = None) -> list[dict]:
    """f1..fK of ``model`` (a :class:`paser.PaSeR`): name, architecture, parameters, weight
    digest and, when the image size is known, GFLOP on one patch with its halo."""
    router, cfg = model.router, model.config
    patch = None
    if image_size is not None:
        costs = router.costs(*image_size)
        patch = costs.patch
    return [{"name": f"f{k}", "arch": spec.name, "params": count_parameters(router.pool[k - 1]),
             "gflops_per_patch": None if patch is None else patch[k],
             "digest": weights_digest(router.pool[k - 1])}
            for k, spec in enumerate(cfg.models.pool, start=1)]


def create_app(model, max_request_bytes: int = 32 * MiB, max_values: int = 16 * MiB,
               max_patches: int = 4096, max_concurrency: int = 1,
               queue_timeout: float = 30.0, token: str | None = None,
               max_patch_side: int = 1024) -> FastAPI:
    """The HTTP app serving the pool models of ``model`` (a :class:`paser.PaSeR`).

    Limits: a body over ``max_request_bytes`` or an array over ``max_values`` values (shape
    read from the header, before decompressing) is a 413; more than ``max_patches`` patches
    (those of every model a request asks, together) a 413, as is a patch larger than the
    run's (halo included; ``max_patch_side`` pixels a side for a run that routes images
    whole); at most ``max_concurrency`` inferences run at
    once, and a request that waits more than ``queue_timeout`` seconds for its turn is a 503
    with ``Retry-After`` (one whose client closes the connection meanwhile is dropped: 499).
    ``token``: the shared secret every path but ``/healthz`` requires (``None``: open).
    """
    router, cfg = model.router.eval(), model.config
    channels, classes, halo = cfg.models.in_channels, cfg.models.num_classes, router.grid.halo
    device = model.device
    image_size = run_image_size(model)
    models = describe_models(model, image_size)
    names = [m["name"] for m in models]
    digests = {m["name"]: m["digest"] for m in models}
    gate = threading.BoundedSemaphore(max_concurrency)  # not asyncio's: one per event loop
    busy = {"running": 0, "served": 0}
    flops: dict[tuple[int, int, int], float] = {}
    flops_lock = threading.Lock()
    limits = {"max_request_bytes": max_request_bytes, "max_values": max_values,
              "max_patches": max_patches, "max_concurrency": max_concurrency,
              "queue_timeout_s": queue_timeout}

    expected = None if token is None else token.encode()
    # the largest patch, halo included, a request may hold: the run's own where it routes
    # tiles of one size (a 4,000-pixel patch took 14 GB), else max_patch_side
    tile = model.tile
    largest = ((tile[0] // router.grid.rows + 2 * halo, tile[1] // router.grid.cols + 2 * halo)
               if tile is not None else (max_patch_side, max_patch_side))
    limits["max_patch"] = list(largest)

    app = FastAPI(title="paser cloud tier", version="1",
                  description="The pool models f1..fK of a PaSeR run, patch by patch.")

    @app.middleware("http")
    async def _guard_and_log(request: Request, call_next) -> Response:
        """The token, checked before the route runs (so before the body is read), then one
        log line; the endpoint leaves the model and patch count in ``request.state``."""
        start = time.perf_counter()
        rid = request.headers.get("x-request-id", "")
        rid = rid if REQUEST_ID.fullmatch(rid) else secrets.token_hex(8)
        status = 500  # unless an answer comes back: the exception goes on to the 500 handler
        # whether the client has gone, asked of the connection itself: the endpoint's own
        # request reads through this middleware's wrapper, which never says so
        request.state.gone = request.is_disconnected
        try:
            problem = None
            if expected is not None and request.url.path not in OPEN_PATHS:
                problem = _token_problem(request.headers.get("authorization"), expected)
            response = (JSONResponse({"error": problem}, status_code=401,
                                     headers={"WWW-Authenticate": "Bearer"})
                        if problem else await call_next(request))
            status = response.status_code
            response.headers["X-Request-Id"] = rid
            return response
        finally:
            state = request.state
            log.info("%s %s %s %d model=%s patches=%s ms=%.1f client=%s", rid, request.method,
                     ascii(request.url.path)[1:-1][:100], status, getattr(state, "model", "-"),
                     getattr(state, "patches", "-"), 1000 * (time.perf_counter() - start),
                     request.client.host if request.client else "-")

    @app.exception_handler(PayloadError)
    async def _payload(request: Request, err: PayloadError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse({"error": str(err)}, status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return JSONResponse({"error": problems}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    # which run answers: its folder's name on the open /healthz (a path says more of the
    # machine than a health check needs), its whole path behind the token
    run_path = None if model.run_dir is None else Path(model.run_dir).resolve()

    @app.get("/healthz")  # on the event loop: it answers while every thread is busy
    async def healthz() -> dict:
        return {"status": "ok", "run": None if run_path is None else run_path.name,
                "models": names, "device": str(device),
                "running": busy["running"], "served": busy["served"]}

    @app.get("/v1/models")
    async def list_models() -> dict:
        patch = None if image_size is None else router.grid.patch_size(*image_size)
        return {"run": None if run_path is None else str(run_path),
                "in_channels": channels, "num_classes": classes,
                "halo": halo, "grid": [router.grid.rows, router.grid.cols],
                "image_size": image_size, "patch_size": patch, "models": models,
                "flop_convention": FLOP_CONVENTION, "limits": limits,
                "request": {"content_types": [NPZ, PNG],
                            "npz": ["patches [N, C, h + 2 halo, w + 2 halo]",
                                    "image [B, C, H, W] + index [N]: patches cut here",
                                    "image [B, C, H, W] + index_fK [N_k] per model, no "
                                    "model=: answers probs_fK or labels_fK"],
                            "index_per_model": True,
                            "png": "N patches stacked vertically, count=N",
                            "dtypes": sorted(str(d) for d in SCALES)},
                "output": ["probs", "labels"]}

    def infer(k: int, x: torch.Tensor, output: str, dtype: str) -> tuple[np.ndarray, float]:
        """Pool model k on patches through the routing path; the answer and its GFLOP."""
        n, _, h, w = x.shape
        try:  # the count runs the model too: a patch too small fails there first
            with flops_lock:
                if (k, h, w) not in flops:  # on a copy: the count swaps a module's weights
                    # for shape-only ones while it runs, and another request may run f_k
                    flops[(k, h, w)] = gflops_per_sample(copy.deepcopy(router.pool[k - 1]),
                                                         channels, h, w)
            with torch.inference_mode():
                probs = router.run_local(k, x.to(device))
        except torch.OutOfMemoryError:
            raise PayloadError(503, f"out of memory on {n} patches; send fewer") from None
        except (RuntimeError, ValueError) as err:
            why = too_small(err)
            if why is not None:
                raise PayloadError(422, f"patches of {h} x {w} are too small for f{k} ({why}); "
                                   "send larger ones, cut as the routing path cuts them"
                                   ) from None
            if isinstance(err, ValueError):
                raise
            raise PayloadError(422, f"f{k} cannot run on patches of shape {list(x.shape)} "
                               f"({str(err).splitlines()[0]})") from None
        if output == "labels":
            return predicted_classes(probs).to(torch.uint8).cpu().numpy(), n * flops[(k, h, w)]
        return probs.cpu().numpy().astype(dtype), n * flops[(k, h, w)]

    def infer_each(jobs: list[tuple[int, torch.Tensor]], output: str, dtype: str
                   ) -> list[tuple[np.ndarray, float]]:
        return [infer(k, x, output, dtype) for k, x in jobs]

    @app.post("/v1/segment")
    async def segment(request: Request,
                      model: str | None = Query(None, description="f1 .. fK; left out for "
                                                "an .npz of 'image' with one 'index_fK' per "
                                                "model"),
                      output: Literal["probs", "labels"] = "probs",
                      format: Literal["npz", "png"] = "npz",
                      dtype: Literal["float32", "float16"] = "float32",
                      count: int = Query(1, ge=1, description="patches stacked in a PNG"),
                      digest: str | None = Query(None, description="the weights the client "
                                                 "expects (GET /v1/models): refused with 409 "
                                                 "when this server's differ")
                      ) -> Response:
        if model is not None and model not in names:
            raise PayloadError(404, f"no model '{model}'; this server has {', '.join(names)}")
        if model is None and digest is not None:
            raise PayloadError(422, "digest= goes with model=; for one 'index_fK' per model "
                               "send digest_fK= for each")
        expects = {key.removeprefix("digest_"): value
                   for key, value in request.query_params.items() if key.startswith("digest_")}
        for name, value in ({model: digest} if digest is not None else expects).items():
            if name not in names:
                raise PayloadError(404, f"no model '{name}' (digest_{name}=); this server has "
                                   f"{', '.join(names)}")
            if value != digests[name]:
                raise PayloadError(409, f"{name} here has other weights than the client "
                                   "expects (the server was restarted with another run?); "
                                   "connect again to the server of the client's run")
        request.state.model = model  # for the log line: a name of ours, never the client's text
        if format == "png" and output != "labels":
            raise PayloadError(422, "format=png answers labels only; use output=labels, or "
                               "format=npz for probabilities")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in (NPZ, "application/octet-stream", PNG):
            raise PayloadError(415, f"Content-Type '{kind or 'none'}': send {NPZ} (array "
                               f"'patches' [N, C, h, w]) or {PNG}")
        if model is None and (kind == PNG or format == "png"):
            raise PayloadError(422, "without model=, a request is an .npz of 'image' with one "
                               "'index_fK' per model, answered as .npz; name the model for a "
                               "PNG")
        body = await _read_body(request, max_request_bytes)
        if model is None:  # every model asked at once: [N_1 + N_2 + ..., C, h, w]
            x, asked = _npz_pooled(body, names, router.grid, channels, max_values,
                                   max_patches, tile)
            notes, request.state.model = [], ",".join(asked)
        else:
            x, notes = (_png_patches(body, count, channels, max_values) if kind == PNG
                        else _npz_patches(body, router.grid, channels, max_values,
                                          max_patches, tile))
            asked = {model: x.shape[0]}
        request.state.patches = x.shape[0]
        if x.shape[0] > max_patches:
            raise PayloadError(413, f"{x.shape[0]} patches: more than the server's "
                               f"{max_patches} per request; split them")
        if min(x.shape[-2:]) <= 2 * halo:
            raise PayloadError(422, f"patches of {x.shape[-2]} x {x.shape[-1]}: they must "
                               f"carry the run's halo of {halo} pixels on each side")
        if largest is not None and (x.shape[-2] > largest[0] or x.shape[-1] > largest[1]):
            raise PayloadError(413, f"patches of {x.shape[-2]} x {x.shape[-1]}: larger than "
                               f"the {largest[0]} x {largest[1]} (halo included) this run "
                               "routes; cut them as the routing path does")
        # waits here, holding no thread, while the client waits too
        turn = await _acquire(gate, queue_timeout, request.state.gone)
        if turn is None:  # an edge that timed out asks again: this one would run for no one
            raise PayloadError(499, "the client closed the connection while its request "
                               "waited for its turn; nothing ran")
        if not turn:
            raise PayloadError(503, f"busy: no inference slot within {queue_timeout:g} s; "
                               "retry later")
        busy["running"] += 1
        start = time.perf_counter()
        jobs = [(int(name[1:]), part)
                for name, part in zip(asked, x.split(list(asked.values())), strict=True)]
        try:
            answers = await run_in_threadpool(infer_each, jobs, output, dtype)
        finally:
            busy["running"] -= 1
            gate.release()
        busy["served"] += 1
        headers = {"X-Paser-Model": ",".join(asked), "X-Paser-Patches": str(x.shape[0]),
                   "X-Paser-Gflops": repr(sum(gflops for _, gflops in answers)),
                   "X-Paser-Ms": f"{1000 * (time.perf_counter() - start):.2f}"}
        if notes:
            headers["X-Paser-Notes"] = "; ".join(notes)
        if format == "png":
            strip = answers[0][0].reshape(-1, answers[0][0].shape[-1])
            return Response(codec.encode_png(strip), media_type=PNG,
                            headers=headers)
        arrays = ({output: answers[0][0]} if model is not None else
                  {f"{output}_{name}": answer for name, (answer, _) in zip(asked, answers,
                                                                          strict=True)})
        return Response(codec.encode_npz(**arrays), media_type=NPZ, headers=headers)

    return app


async def _acquire(gate: threading.BoundedSemaphore, timeout: float,
                   gone: Callable[[], Awaitable[bool]] | None = None) -> bool | None:
    """An inference slot within ``timeout`` seconds, polled on the event loop (a thread
    blocked on it per queued request took the pool's threads, and /healthz with them);
    ``None`` once ``gone()`` says the client closed the connection meanwhile (asked every
    0.1 s): an edge whose request timed out sends it again, and the one it left ran later
    for no one, so that retries under load queued the same work two and three times."""
    deadline = time.monotonic() + timeout
    asked = time.monotonic()
    while not gate.acquire(blocking=False):
        if time.monotonic() >= deadline:
            return False
        if gone is not None and time.monotonic() - asked >= 0.1:
            if await gone():
                return None
            asked = time.monotonic()
        await asyncio.sleep(0.005)
    return True


def _token_problem(header: str | None, expected: bytes) -> str | None:
    """What is wrong with an ``Authorization`` header, or ``None`` when it carries the token
    (compared in constant time: the answer's timing says nothing of how much matched)."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return ("this server needs a token: send 'Authorization: Bearer <token>' (paser "
                "segment --token-file FILE)")
    # Starlette decodes headers as latin-1: encoding back gives the bytes that were sent
    if not hmac.compare_digest(given.strip().encode("latin-1"), expected):
        return "wrong token: send the one this server was started with"
    return None


#: what a client over the body limit can do; a paser edge already sends at most what fits,
#: one image's patches at the least, and cannot cut an image's request further: its
#: operator's remedy is the server's limit (the 413 ends up in the edge's JSON and last lines)
_FEWER = ("send fewer images or patches per request; a paser edge sends one image's at the "
          "least: start paser serve with a larger --max-request-mb")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise PayloadError(400, f"Content-Length '{length}' is not a number")
        if int(length) > limit:
            raise PayloadError(413, f"a body of {int(length)} bytes: more than the server's "
                               f"{limit}; {_FEWER}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadError(413, f"a body over the server's {limit} bytes; {_FEWER}")
    if not body:
        raise PayloadError(400, f"an empty body: send patches as {NPZ} or {PNG}")
    return bytes(body)


def _npz_patches(body: bytes, grid, channels: int, max_values: int, max_patches: int,
                 tile: tuple[int, int] | None = None) -> tuple[torch.Tensor, list]:
    """Patches with their halo from an ``.npz``: array ``patches`` ``[N, C, h, w]`` as they
    are, or ``image`` ``[B, C, H, W]`` with ``index`` ``[N]``, cut here (:func:`_cut`)."""
    arrays = codec.read_npz(body, max_values)
    if "patches" in arrays and ("image" in arrays or "index" in arrays):
        raise PayloadError(400, "the .npz has 'patches' and 'image' or 'index': send either "
                           "the patches, or the image with the index of its patches, not both")
    if "patches" in arrays:
        return torch.from_numpy(_unit(arrays["patches"], "patches", channels)), []
    if "image" not in arrays or "index" not in arrays:
        raise PayloadError(400, "the .npz needs an array 'patches' [N, C, h, w], or 'image' "
                           f"[B, C, H, W] with 'index' [N] (it has: {', '.join(arrays) or 'none'})")
    return _cut(arrays, ["index"], grid, channels, max_patches, tile), []


def _npz_pooled(body: bytes, names: list[str], grid, channels: int, max_values: int,
                max_patches: int, tile: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, dict[str, int]]:
    """A request without ``model=``: ``image`` ``[B, C, H, W]`` with one ``index_fK``
    ``[N_k]`` per model it asks (of ``names``). Every model's patches, cut once
    (:func:`_cut`) in the order of the arrays, and how many each model has."""
    arrays = codec.read_npz(body, max_values)
    keys = [key for key in arrays if key.startswith("index_")]
    if "image" not in arrays or not keys:
        raise PayloadError(400, "without model=, the .npz needs 'image' [B, C, H, W] with one "
                           "'index_fK' [N_k] per model (it has: "
                           f"{', '.join(arrays) or 'none'}); or name the model")
    for key in keys:
        if key.removeprefix("index_") not in names:
            raise PayloadError(404, f"no model '{key.removeprefix('index_')}' (array '{key}'); "
                               f"this server has {', '.join(names)}")
    patches = _cut(arrays, keys, grid, channels, max_patches, tile)
    return patches, {key.removeprefix("index_"): arrays[key].size for key in keys}


def _cut(arrays: dict[str, np.ndarray], keys: list[str], grid, channels: int,
         max_patches: int, tile: tuple[int, int] | None) -> torch.Tensor:
    """The patches with their halo that the index arrays ``keys`` (each ``[N_k]``: patches in
    the routing path's order, image by image) name in ``image`` ``[B, C, H, W]`` (divisible
    by the run's grid; of its ``tile`` size where it routes tiles), all keys' one after the
    other: cut once the sum of the ``N_k`` is within ``max_patches``, as each index is one
    value of the body and a whole patch once cut."""
    image = _unit(arrays["image"], "image", channels)
    b, _, h, w = image.shape
    if tile is not None and (h, w) != tuple(tile):
        # padding it to the grid would make patches larger than the run's: refused next
        raise PayloadError(422, f"an image of {h} x {w}: this run routes tiles of {tile[0]} "
                           f"x {tile[1]} (data.tile); send its tiles as 'image' [B, C, "
                           f"{tile[0]}, {tile[1]}] (the last ones padded), or 'patches'")
    try:
        fits = grid.padded_size(h, w) == (h, w)
    except PaserError:
        fits = False
    if not fits:
        raise PayloadError(422, f"an image of {h} x {w} does not divide into the run's {grid} "
                           "grid; pad it to the grid first")
    for key in keys:
        index = arrays[key]
        if index.ndim != 1 or index.dtype.kind not in "iu" or not index.size \
                or index.min() < 0 or index.max() >= b * grid.num_patches:
            raise PayloadError(422, f"'{key}' must be 1-D integers in [0, "
                               f"{b * grid.num_patches}) (patches of {b} image(s) on a {grid} "
                               f"grid), got {index.dtype} shape {list(index.shape)}")
    count = sum(arrays[key].size for key in keys)
    if count > max_patches:  # 16 Mi zeros (a 17 kB body) cut 64 GiB of 32 x 32 patches
        each = "" if len(keys) == 1 else " (" + " + ".join(
            f"{arrays[key].size} in '{key}'" for key in keys) + ")"
        raise PayloadError(413, f"{count} patches{each}: more than the server's {max_patches} "
                           "per request; split them")
    index = np.concatenate([arrays[key].astype(np.int64) for key in keys])
    return grid.context(torch.from_numpy(image)).index_select(0, torch.from_numpy(index))


def _unit(arr: np.ndarray, name: str, channels: int) -> np.ndarray:
    """``[N, C, h, w]`` (or ``[N, h, w]`` for one channel) as float32 in [0, 1]."""
    arr = native(arr)  # big-endian uint16 was refused as "dtype >u2; send uint16"
    if arr.dtype not in SCALES:
        raise PayloadError(422, f"'{name}' has dtype {arr.dtype}; send uint8, uint16, bool, "
                           "float16, float32 or float64")
    if arr.ndim == 3 and channels == 1:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] != channels or 0 in arr.shape:
        raise PayloadError(422, f"'{name}' has shape {list(arr.shape)}; expected "
                           f"[N, {channels}, h, w] with N, h, w >= 1")
    x = arr.astype(np.float32) / np.float32(SCALES[arr.dtype])
    if arr.dtype.kind == "f" and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise PayloadError(422, f"float '{name}' must be finite and in [0, 1]")
    return np.ascontiguousarray(x)


def _png_patches(body: bytes, count: int, channels: int, max_values: int
                 ) -> tuple[torch.Tensor, list]:
    arr = codec.decode_png(body, max_values)
    if arr.shape[0] % count:
        raise PayloadError(422, f"a PNG {arr.shape[0]} pixels high cannot hold count={count} "
                           "patches stacked vertically")
    notes: list[str] = []
    try:
        x = to_channels(Intensity().scale(arr, "the PNG", notes), channels, "the PNG", notes)
    except PaserError as err:
        raise PayloadError(422, str(err)) from None
    c, h, w = x.shape
    x = x.reshape(c, count, h // count, w).transpose(1, 0, 2, 3)
    return torch.from_numpy(np.ascontiguousarray(x)), notes


def exposure_warning(host: str, token: bool, tls: bool) -> str | None:
    """Why serving on ``host`` this way is unsafe, or ``None``: a loopback address is only
    reachable from this machine (a reverse proxy here, or an SSH tunnel); any other needs a
    token, and TLS so that the token and the images do not cross the network readable."""
    if host == "localhost" or _is_loopback(host):
        return None
    if not token:
        return (f"serving on {host} without a token: anyone who can reach this port can run "
                "the models on their images; pass --token-file (docs/deployment.md)")
    if not tls:
        return (f"serving on {host} over plain HTTP: the token and the images cross the "
                "network readable; pass --ssl-certfile, or bind 127.0.0.1 behind a TLS "
                "reverse proxy (docs/deployment.md)")
    return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    """A port another process holds is one line, before the run loads (uvicorn's own
    message came after it, with exit status 3)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise PaserError(f"--host {host}: not an address here ({err})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise PaserError(f"--port {port} on {host}: cannot listen there ({err.strerror}); "
                             "pick another --port, or stop what holds it") from None


def _check_tls(certfile: str | Path | None, keyfile: str | Path | None) -> None:
    """Load the certificate and key here, so that a wrong file is one line, not a traceback
    from uvicorn (and an encrypted key an error, not a password prompt)."""
    if certfile is None:
        if keyfile is not None:
            raise PaserError("--ssl-keyfile needs --ssl-certfile (the server's certificate)")
        return
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path is not None and not Path(path).is_file():
            raise PaserError(f"{flag} {path}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            certfile, keyfile, password="")
    except ssl.SSLError as err:
        # a certificate alone, its key in a file of its own (as openssl and most CAs give
        # them): the fix is the flag left out, not the file
        hint = "" if keyfile else "; where its key is in a file of its own, pass --ssl-keyfile"
        raise PaserError(f"--ssl-certfile {certfile}" + (f" with --ssl-keyfile {keyfile}"
                         if keyfile else "") + f": not a PEM certificate and its unencrypted "
                         f"key ({err.reason or err}){hint}") from None


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          token: str | None = None, ssl_certfile: str | Path | None = None,
          ssl_keyfile: str | Path | None = None, **limits) -> None:
    """Load the run and serve its pool models with uvicorn until interrupted: HTTPS with
    ``ssl_certfile`` (PEM; ``ssl_keyfile`` when the key is not in it), ``token`` required on
    every path but /healthz (:func:`create_app`), one log line per request on stderr."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from paser import PaSeR

    _check_tls(ssl_certfile, ssl_keyfile)
    _check_port(host, port)
    model = PaSeR.load(run_dir, device=device, calibrated=False)
    logging_config = copy.deepcopy(LOGGING_CONFIG)  # our lines formatted as uvicorn's
    logging_config["loggers"]["paser.serve"] = {"handlers": ["default"], "level": "INFO",
                                                "propagate": False}
    config = uvicorn.Config(create_app(model, token=token, **limits), host=host, port=port,
                            log_config=logging_config, access_log=False,  # ours replaces it
                            ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    warning = exposure_warning(host, token is not None, ssl_certfile is not None)
    if warning:
        log.warning(warning)
    uvicorn.Server(config).run()
