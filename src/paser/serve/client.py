"""The edge side of the split: f0 and the policy run here, the patches routed to f1..fK go
to a ``paser serve`` process, and when it cannot answer they keep f0's prediction and are
marked degraded. The run always finishes.

A :class:`RemotePool` plugs into the one routing path (``Router.remote``, used by
:meth:`paser.routing.Router.dispatch`): padding, the policy, patching and stitching stay
the same, only where f1..fK run changes.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from paser.errors import ConfigError, PaserError, RemoteAccessError
from paser.models import count_parameters
from paser.routing import weights_digest
from paser.serve.codec import NPZ, PayloadError, encode_npz, npz_array, quantise, read_npz

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
#: the longest wait between two attempts of one request, seconds
MAX_BACKOFF = 8.0


class RemoteError(PaserError):
    """The server is not serving this run's pool models (or not a paser server at all)."""


@dataclass
class Transfer:
    """What one image's (or batch's) remote calls cost and how they went."""

    bytes_sent: int = 0
    bytes_received: int = 0
    requests: int = 0
    retries: int = 0
    patches_sent: int = 0
    patches_failed: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class RemotePool:
    """f1..fK on a ``paser serve`` server at ``url``.

    ``timeout`` seconds per request (connect and read), ``retries`` further attempts on a
    network error, a timeout or a 408/429/5xx (``backoff * 2**attempt`` seconds apart, at
    most :data:`MAX_BACKOFF`);
    after the last one the server counts as down for ``down_for`` seconds, during which
    patches keep f0's prediction at once instead of waiting on timeouts image after image.
    ``output="labels"`` (default) receives class labels, about 1/(2 x classes) of the
    bytes of ``"probs"``; the stitched probabilities of those patches are then one-hot.
    ``token`` goes with every request (``Authorization: Bearer``); an https:// server's
    certificate is checked against the system's CAs, or ``ca_file`` (PEM) for a private CA.
    A refused token or an untrusted certificate raises :class:`RemoteAccessError`: no retry
    or fallback mends a configuration.
    ``http`` replaces the HTTP client (tests pass FastAPI's ``TestClient``).
    """

    def __init__(self, url: str, model, timeout: float = 10.0, retries: int = 2,
                 backoff: float = 0.25, down_for: float = 30.0,
                 output: str = "labels", http: httpx.Client | None = None,
                 token: str | None = None, ca_file: str | Path | None = None):
        if output not in ("labels", "probs"):
            raise PaserError(f"output '{output}': use labels or probs")
        if not str(url).startswith(("http://", "https://")):  # else every call "fails": f0 alone
            raise ConfigError(f"--remote {url}: give an http:// or https:// URL of a `paser "
                              "serve` process")
        try:
            port = httpx.URL(url).port
        except (httpx.InvalidURL, ValueError) as err:
            raise ConfigError(f"--remote {url}: not a URL ({err})") from None
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"--remote {url}: port {port} is not a port (1 to 65535)")
        self.url, self.output = url.rstrip("/"), output
        self.retries, self.backoff, self.down_for = retries, backoff, down_for
        self.headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        self.http = http if http is not None else httpx.Client(
            base_url=self.url, timeout=timeout, verify=_trust(ca_file))
        self.expected = _local_models(model)
        cfg = model.config
        self.channels, self.classes = cfg.models.in_channels, cfg.models.num_classes
        self.grid = model.router.grid
        self.server: dict | None = None
        self.down_until, self.down_why = 0.0, ""
        self.stats = Transfer()

    # ---- connecting -------------------------------------------------------------------

    def connect(self) -> dict:
        """``GET /v1/models`` and check it serves this run's models; raises
        :class:`RemoteError` on a mismatch, :class:`RemoteAccessError` when it refuses the
        token or its certificate is not trusted, ``httpx.HTTPError`` when it does not answer."""
        try:
            res = self.http.get("/v1/models", headers=self.headers)
        except httpx.ConnectError as err:
            if "WRONG_VERSION_NUMBER" in str(err):  # TLS to a plain-HTTP server
                raise RemoteError(f"{self.url}: the server speaks plain HTTP, not TLS; use "
                                  "http://") from None
            reason = _untrusted(err)
            if reason is None:
                raise
            if "hostname mismatch" in reason.lower() or "ip address mismatch" in reason.lower():
                raise RemoteAccessError(f"{self.url}: its certificate is for another host name "
                                        f"({reason}); connect by a name or address the "
                                        "certificate names") from None
            raise RemoteAccessError(f"{self.url}: its certificate is not trusted here ({reason})"
                                    "; pass --ca-file with the CA that signed it (Python: "
                                    "use_remote(url, ca_file=...))") from None
        except httpx.RemoteProtocolError:
            if self.url.startswith("http://"):  # plain HTTP to a TLS server
                raise RemoteError(f"{self.url}: the server does not speak plain HTTP (TLS?); "
                                  "use https://") from None
            raise
        if res.status_code == 401:
            raise self._refused()
        if res.status_code in (404, 405):
            raise RemoteError(f"{self.url} answered /v1/models with HTTP {res.status_code}: "
                              "not a paser server, or not its root URL (give "
                              "http://host:port, as `paser serve` prints)")
        res.raise_for_status()
        try:
            info = res.json()
            served = {m["name"]: m for m in info["models"]}
            setup = (info["in_channels"], info["num_classes"], info["halo"], info["grid"])
        except (ValueError, KeyError, TypeError):
            raise RemoteError(f"{self.url} answered /v1/models with something that is not a "
                              "paser server's model list") from None
        here = (self.channels, self.classes, self.grid.halo, [self.grid.rows, self.grid.cols])
        if setup != here:
            raise RemoteError(f"{self.url} serves models for (channels, classes, halo, grid) "
                              f"{setup}; this run has {here}")
        for want in self.expected:
            have = served.get(want["name"])
            if have is None or have["arch"] != want["arch"]:
                offered = ", ".join(f"{n} ({m['arch']})" for n, m in served.items())
                raise RemoteError(f"{self.url} has no {want['name']} ({want['arch']}); it "
                                  f"serves {offered}")
            if want["digest"] and have.get("digest") != want["digest"]:
                raise RemoteError(f"{self.url}'s {want['name']} has other weights than this "
                                  "run's: serve the same run directory (`paser serve --run-dir`)")
        self.server = info
        return info

    # ---- the routing path's hook ----------------------------------------------------------

    def run(self, x: torch.Tensor, routed: dict[int, torch.Tensor]
            ) -> dict[int, torch.Tensor | None]:
        """Probabilities ``[N_k, classes, h, w]`` of each pool model f``k`` of ``routed`` on
        its patches ``routed[k]`` (flat, in the routing path's order) of the padded images
        ``x`` ``[B, C, Hp, Wp]``; ``None`` for a model when the server did not answer (after
        retries) or is marked down.

        What is sent is the images with every pixel outside the routed patches' context
        windows zeroed (which compresses to almost nothing) and each model's indices
        (``index_fK``), in one request for every model: the server cuts the patches itself,
        so a pixel that several patches read travels once. A server that takes one model a
        request (one without ``index_per_model`` in ``/v1/models``) is asked model by
        model, each request with the pixels of that model's patches alone.
        """
        answers: dict[int, torch.Tensor | None] = {}
        pending = list(routed)
        while pending:
            n = sum(routed[k].numel() for k in pending)
            if time.monotonic() < self.down_until:
                self._failed(n, f"{self.url}: not asked: it failed less than "
                             f"{self.down_for:g} s ago (down_for): {self.down_why}")
                return {**answers, **dict.fromkeys(pending)}
            if self.server is None:
                try:
                    self.connect()
                except (httpx.HTTPError, RemoteError) as err:
                    self._mark_down(describe_error(err))
                    self._failed(n, f"{self.url}: {describe_error(err)}")
                    return {**answers, **dict.fromkeys(pending)}
            asked = pending if self._together() else pending[:1]
            pending = pending[len(asked):]
            probs = self._send(x, {k: routed[k] for k in asked})
            answers.update(probs if probs is not None else dict.fromkeys(asked))
        return answers

    def _send(self, x: torch.Tensor, routed: dict[int, torch.Tensor]
              ) -> dict[int, torch.Tensor] | None:
        """:meth:`run` for the models of ``routed``, all in each request: their answers, or
        ``None`` when a request failed (every one of their patches then counts as failed)."""
        n = sum(idx.numel() for idx in routed.values())
        self.stats.patches_sent += n
        idx = torch.cat(list(routed.values()))
        image = quantise((x * self._needed(idx, x.shape)).cpu().numpy())
        idx = idx.cpu().numpy()
        model = np.repeat(list(routed), [i.numel() for i in routed.values()])  # idx's model
        parts: dict[int, list[np.ndarray]] = {k: [] for k in routed}
        per_image, most = self.grid.num_patches, self.server["limits"]["max_patches"]
        for lo, hi in self._image_chunks(image.shape):
            sel = (idx >= lo * per_image) & (idx < hi * per_image)
            sel, of = idx[sel] - lo * per_image, model[sel]
            for start in range(0, sel.size, most):  # one image's patches past the limit too
                part, part_of = sel[start:start + most], of[start:start + most]
                index = {k: part[part_of == k] for k in routed if (part_of == k).any()}
                answer = self._post(image[lo:hi], index, image.shape[-2:])
                if answer is None:
                    return self._failed(n, None)
                for k, out in answer.items():
                    parts[k].append(out)
        return {k: self._probs(np.concatenate(part)) for k, part in parts.items()}

    def _probs(self, out: np.ndarray) -> torch.Tensor:
        """The server's answer as probabilities ``[N, classes, h, w]`` (labels one-hot)."""
        out = torch.from_numpy(out)
        if self.output == "labels":
            return torch.nn.functional.one_hot(out.long(), self.classes).permute(0, 3, 1, 2
                                                                                 ).float()
        return out.float()

    def _needed(self, idx: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``[B, 1, Hp, Wp]``: 1 on the pixels the patches ``idx`` read (each patch and its
        halo, within the image), 0 elsewhere."""
        b, _, hp, wp = shape
        grid, m = self.grid, self.grid.halo
        flags = torch.zeros(b * grid.num_patches, device=idx.device)
        flags[idx] = 1.0
        mask = grid.patch_map(flags.view(b, grid.num_patches), hp, wp)[:, None]
        if m:
            mask = torch.nn.functional.max_pool2d(mask, 2 * m + 1, stride=1, padding=m)
        return mask

    def take(self) -> Transfer:
        """The transfer figures since the last call, and start afresh."""
        stats, self.stats = self.stats, Transfer()
        return stats

    def close(self) -> None:
        self.http.close()

    # ---- internals --------------------------------------------------------------------------

    def _image_chunks(self, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """Ranges of images per request within the server's limits (values, bytes at 2 a
        value, patches)."""
        limits = self.server["limits"]
        per_image = int(np.prod(shape[1:]))
        fit = min(limits["max_values"] // per_image,
                  (limits["max_request_bytes"] - 4096) // (2 * per_image),
                  limits["max_patches"] // self.grid.num_patches)
        step = max(1, fit)  # one image over the limits: the server says why
        return [(lo, min(lo + step, shape[0])) for lo in range(0, shape[0], step)]

    def _together(self) -> bool:
        """Whether the server takes the patches of several models in one request (its
        ``/v1/models`` says ``index_per_model``)."""
        request = (self.server or {}).get("request")  # what this server takes
        return isinstance(request, dict) and request.get("index_per_model") is True

    def _post(self, image: np.ndarray, index: dict[int, np.ndarray], size: tuple[int, int]
              ) -> dict[int, np.ndarray] | None:
        """One request for the patches ``index[k]`` of each model ``k`` in ``image``: one
        model's as ``model=fK`` with ``index`` (what every server takes), several as
        ``index_fK`` each, or one request a model where the server takes one model a
        request."""
        if len(index) > 1 and not self._together():
            return self._one_by_one(image, index, size)
        params = {"output": self.output, "dtype": "float16"}
        digests = {m["name"]: m["digest"] for m in self.expected}
        if len(index) == 1:
            [(k, part)] = index.items()
            arrays = {"image": image, "index": part}
            params["model"] = f"f{k}"
            if digests[f"f{k}"]:  # the server refuses (409) once it serves other weights
                params["digest"] = digests[f"f{k}"]  # than connect saw
        else:
            arrays = {"image": image, **{f"index_f{k}": part for k, part in index.items()}}
            params.update({f"digest_f{k}": digests[f"f{k}"] for k in index if digests[f"f{k}"]})
        body = encode_npz(**arrays)
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
                time.sleep(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF))
            self.stats.requests += 1
            self.stats.bytes_sent += len(body)
            try:
                res = self.http.post("/v1/segment", params=params, content=body,
                                     headers={**self.headers, "Content-Type": NPZ})
            except httpx.HTTPError as err:
                error = f"{self.url}: {describe_error(err)}"
                continue
            if res.status_code == 401:  # the server was restarted with another token
                raise self._refused()
            if res.status_code == 409:  # ... or with another run's weights
                self.server = None
                raise RemoteError(f"{self.url}: {_server_error(res)}")
            self.stats.bytes_received += len(res.content)
            if res.status_code == 200:
                return self._answer(res, index, size)
            error = f"{self.url}: HTTP {res.status_code}: {_server_error(res)}"
            if res.status_code not in RETRY_STATUS:
                if len(index) > 1 and not self._still_together():
                    return self._one_by_one(image, index, size)
                self.stats.errors.append(error)
                return None  # our request is wrong: retrying will not help, the server is up
        self._mark_down(error.removeprefix(f"{self.url}: "))
        self.stats.errors.append(error)
        return None

    def _still_together(self) -> bool:
        """After a request of several models was refused: whether the server still takes
        them, asked again (``GET /v1/models``). A server restarted as one made before such
        requests answers each 422 (``model=`` missing) where the last one took them."""
        self.server = None  # as at a 409: the models are checked again when it answers
        try:
            self.connect()
        except httpx.HTTPError:
            return True  # it did not say: the refusal stands, and the next image asks again
        return self._together()

    def _one_by_one(self, image: np.ndarray, index: dict[int, np.ndarray],
                    size: tuple[int, int]) -> dict[int, np.ndarray] | None:
        """:meth:`_post` for each model of ``index`` in a request of its own."""
        answers: dict[int, np.ndarray] = {}
        for k, part in index.items():
            answer = self._post(image, {k: part}, size)
            if answer is None:
                return None
            answers.update(answer)
        return answers

    def _answer(self, res: httpx.Response, index: dict[int, np.ndarray], size: tuple[int, int]
                ) -> dict[int, np.ndarray] | None:
        """Each model's array of the answer (``labels`` or ``probs``; ``labels_fK`` ... for
        several models), checked against the patches asked: ``None`` if one is wrong."""
        h, w = size[0] // self.grid.rows, size[1] // self.grid.cols
        per = (h, w) if self.output == "labels" else (self.classes, h, w)
        total = sum(part.size for part in index.values()) * int(np.prod(per))
        try:  # every model's array, decompressed once
            arrays: dict | PayloadError = read_npz(res.content, max_values=total)
        except PayloadError as err:
            arrays = err
        answers = {}
        for k, part in index.items():
            name = self.output if len(index) == 1 else f"{self.output}_f{k}"
            want = (part.size, *per)
            try:
                out = arrays if isinstance(arrays, PayloadError) else npz_array(arrays, name)
            except PayloadError as err:
                out = err
            bad_labels = (not isinstance(out, PayloadError) and self.output == "labels"
                          and out.size and int(out.max()) >= self.classes)
            if isinstance(out, PayloadError) or out.shape != want or bad_labels:
                got = out if isinstance(out, PayloadError) else (
                    f"class {int(out.max())} of {self.classes}" if bad_labels
                    else f"shape {list(out.shape)}")
                self.stats.errors.append(f"{self.url}: an answer that is not {list(want)} "
                                         f"{name} ({got})")
                return None
            answers[k] = out
        return answers

    def _refused(self) -> RemoteAccessError:
        said = "wants a token" if not self.headers else "refused this edge's token"
        return RemoteAccessError(f"{self.url} {said}: pass --token-file FILE holding the "
                                 "token its `paser serve` was given (Python: "
                                 "use_remote(url, token=...))")

    def _mark_down(self, why: str) -> None:
        """Ask no more for ``down_for`` seconds; the patches meanwhile say ``why``."""
        self.down_until, self.down_why = time.monotonic() + self.down_for, why
        self.server = None  # check the models again when it comes back

    def _failed(self, n: int, error: str | None) -> None:
        self.stats.patches_failed += n
        if error:
            self.stats.errors.append(error)
        return None


def _trust(ca_file: str | Path | None) -> ssl.SSLContext | bool:
    """httpx's ``verify``: the system's CAs, or those of ``ca_file`` (PEM)."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except FileNotFoundError:
        raise PaserError(f"--ca-file {ca_file}: no such file") from None
    except ssl.SSLError as err:
        raise PaserError(f"--ca-file {ca_file}: not a PEM CA certificate ({err.reason or err})"
                         ) from None


def _untrusted(err: BaseException | None) -> str | None:
    """Why the server's certificate failed verification, when that is what ``err`` (an
    httpx error wrapping httpcore's wrapping ssl's) comes down to; else ``None``."""
    while err is not None:
        if isinstance(err, ssl.SSLCertVerificationError):
            return err.verify_message or str(err)
        err = err.__cause__ or err.__context__
    return None


def _local_models(model) -> list[dict]:
    """What the server must serve: this run's f1..fK, each with its weights' digest (an ONNX
    engine's from its export's manifest; names alone for an export made before it kept
    them)."""
    router = model.router
    exported = getattr(router, "manifest", {}).get("digests", {})
    return [{"name": f"f{k}", "arch": spec.name,
             "digest": weights_digest(router.pool[k - 1])
             if count_parameters(router.pool[k - 1]) else exported.get(f"f{k}", "")}
            for k, spec in enumerate(model.config.models.pool, start=1)]


def describe_error(err: Exception) -> str:
    """An HTTP failure in a few words: a timeout, the server's error, or the exception."""
    if isinstance(err, httpx.TimeoutException):
        return f"timed out ({type(err).__name__})"
    if isinstance(err, httpx.HTTPStatusError):
        return f"HTTP {err.response.status_code}: {_server_error(err.response)}"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _server_error(res: httpx.Response) -> str:
    try:
        return str(res.json()["error"])
    except (ValueError, KeyError, TypeError):
        return res.text[:200]
