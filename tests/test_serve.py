"""The edge/cloud split: `paser serve` (FastAPI) and `paser segment --remote`.

The API through FastAPI's test client; the edge's routing on the remote tier equals the
local one; an unreachable tier degrades patches to f0's prediction; and one end-to-end
run against a real uvicorn process that is stopped mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
import torch
from fastapi.testclient import TestClient
from PIL import Image
from tests.helpers import paser, paser_here, reserved_port

from paser.calibration import Calibration
from paser.models import count_parameters
from paser.patches import PatchGrid
from paser.routing import weights_digest
from paser.segment import find_images, segment_files
from paser.serve.client import RemoteError
from paser.serve.codec import NPZ, PNG, decode_npz, encode_npz, quantise
from paser.serve.server import _unit, create_app
from paser.volumes import open_volume, segment_volumes

RNG = np.random.default_rng(0)


def _load(run):
    from paser import PaSeR

    return PaSeR.load(run, device="cpu", calibrated=False)


@pytest.fixture(scope="module")
def server(mnist_run):
    model = _load(mnist_run)
    return model, TestClient(create_app(model, max_request_bytes=200_000, max_values=50_000,
                                        max_patches=16))


def _post(client, body, model="f1", kind=NPZ, **params):
    return client.post("/v1/segment", params={"model": model, **params}, content=body,
                       headers={"Content-Type": kind})


def _patches(n=3, size=16):
    return RNG.integers(0, 256, (n, 1, size, size), dtype=np.uint8)


def test_healthz_and_models_report_names_parameters_and_gflop(server):
    model, client = server
    assert client.get("/healthz").json()["models"] == ["f1", "f2"]
    info = client.get("/v1/models").json()
    router = model.router
    assert (info["in_channels"], info["num_classes"], info["halo"]) == (1, 2, 0)
    size = json.loads((model.run_dir / "results.json").read_text())["image_size"]
    assert info["image_size"] == size and info["patch_size"] == size  # a 1 x 1 grid
    costs = router.costs(*size)
    for k, m in enumerate(info["models"], start=1):
        assert m["name"] == f"f{k}" and m["arch"] == model.config.models.pool[k - 1].name
        assert m["params"] == count_parameters(router.pool[k - 1]) > 0
        assert m["gflops_per_patch"] == pytest.approx(costs.patch[k])
        assert m["digest"] == weights_digest(router.pool[k - 1])
    assert info["limits"]["max_patches"] == 16



def test_healthz_and_models_name_the_run(server):
    """/healthz named no run, and /v1/models the run folder as the server was given it
    ('runs/quick'): two servers could not be told apart. /healthz, open without the token,
    names the run's folder, /v1/models its whole path."""
    model, client = server
    assert client.get("/healthz").json()["run"] == model.run_dir.name == "run"
    assert client.get("/v1/models").json()["run"] == str(model.run_dir.resolve())
    relative = TestClient(create_app(type(model)(model.router, model.config, Path(
        os.path.relpath(model.run_dir)))))
    assert relative.get("/v1/models").json()["run"] == str(model.run_dir.resolve())

def test_probabilities_and_labels_are_the_pool_models(server):
    model, client = server
    u8 = _patches()
    x = torch.from_numpy(u8.astype(np.float32) / 255)
    with torch.inference_mode():
        want = model.router.run_local(2, x).numpy()
    for arr in (u8, quantise(x.numpy()), x.numpy()):  # 8-bit, 16-bit, float: the same values
        res = _post(client, encode_npz(patches=arr), model="f2")
        assert res.status_code == 200 and res.headers["X-Paser-Patches"] == "3"
        np.testing.assert_allclose(decode_npz(res.content, "probs", 10**6), want, atol=1e-6)
    labels = want.argmax(1)
    res = _post(client, encode_npz(patches=u8[:, 0]), model="f2", output="labels")
    assert np.array_equal(decode_npz(res.content, "labels", 10**6), labels)  # [N, h, w] too
    half = _post(client, encode_npz(patches=u8), model="f2", dtype="float16")
    assert decode_npz(half.content, "probs", 10**6).dtype == np.float16
    # a PNG of the 3 patches stacked vertically, labels back as a PNG strip
    buf = io.BytesIO()
    Image.fromarray(u8[:, 0].reshape(48, 16)).save(buf, format="PNG")
    res = _post(client, buf.getvalue(), model="f2", kind=PNG, output="labels", format="png",
                count=3)
    assert res.headers["content-type"] == PNG
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(res.content))),
                          labels.reshape(48, 16))
    gflops = float(res.headers["X-Paser-Gflops"])
    assert gflops == pytest.approx(3 * model.router.costs(16, 16).patch[2])


def _zip_with_header(shape, dtype="<f4"):
    """An .npz whose header claims ``shape`` but holds almost nothing (a bomb)."""
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, dtype=dtype))
    header["shape"] = shape
    raw = io.BytesIO()
    np.lib.format.write_array_header_1_0(raw, header)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("patches.npy", raw.getvalue())
    return buf.getvalue()


BAD = {
    "junk body": (dict(body=b"not an npz"), 400, "not a readable .npz"),
    "empty body": (dict(body=b""), 400, "empty body"),
    "content type": (dict(body=b"x", kind="text/plain"), 415, "Content-Type 'text/plain'"),
    "unknown model": (dict(body=b"x", model="f9"), 404, "no model 'f9'; this server has f1, f2"),
    "no array": (dict(body=encode_npz(other=np.zeros(3))), 400,
                 "needs an array 'patches' [N, C, h, w], or 'image' [B, C, H, W] with 'index' "
                 "[N] (it has: other)"),
    # both ways at once: the image and its index were ignored without a word
    "patches and image": (dict(body=encode_npz(patches=np.zeros((1, 1, 8, 8), np.uint8),
                                               image=np.zeros((1, 1, 8, 8), np.uint8),
                                               index=np.array([0]))), 400,
                          "the .npz has 'patches' and 'image' or 'index': send either the "
                          "patches, or the image with the index of its patches, not both"),
    "index range": (dict(body=encode_npz(image=np.zeros((2, 1, 8, 8), np.uint8),
                                         index=np.array([0, 2]))), 422,
                    "'index' must be 1-D integers in [0, 2) (patches of 2 image(s) on a 1x1"),
    "index dtype": (dict(body=encode_npz(image=np.zeros((1, 1, 8, 8), np.uint8),
                                         index=np.array([0.0]))), 422, "got float64"),
    "pickle": (dict(body=encode_npz(patches=np.array([{}], dtype=object))), 422,
               "holds Python objects"),
    "channels": (dict(body=encode_npz(patches=np.zeros((2, 3, 8, 8), np.uint8))), 422,
                 "expected [N, 1, h, w]"),
    "dtype": (dict(body=encode_npz(patches=np.zeros((2, 1, 8, 8), np.int64))), 422,
              "dtype int64"),
    "NaN": (dict(body=encode_npz(patches=np.full((1, 1, 8, 8), np.nan, np.float32))), 422,
            "finite and in [0, 1]"),
    "out of range": (dict(body=encode_npz(patches=np.full((1, 1, 8, 8), 2.0, np.float32))), 422,
                     "finite and in [0, 1]"),
    "too many patches": (dict(body=encode_npz(patches=np.zeros((17, 1, 8, 8), np.uint8))), 413,
                         "more than the server's 16 per request"),
    "body too large": (dict(body=RNG.integers(0, 255, 250_000, np.uint8).tobytes()), 413,
                       "more than the server's 200000; send fewer images or patches per "
                       "request; a paser edge sends one image's at the least: start paser serve "
                       "with a larger --max-request-mb"),
    "decompression bomb": (dict(body=_zip_with_header((1000, 1, 1000, 1000))), 413,
                           "more than the server's 50000 values"),
    "patch too large": (dict(body=encode_npz(patches=np.zeros((1, 1, 1030, 40), np.uint8))),
                        413, "patches of 1030 x 40: larger than the 1024 x 1024 (halo "
                        "included) this run routes"),
    "png probs": (dict(body=b"x", format="png"), 422, "format=png answers labels only"),
    "npz sent as png": (dict(body=encode_npz(patches=np.zeros((1, 1, 8, 8), np.uint8)),
                             kind=PNG, output="labels"), 400,
                        "not an image at all; an npz body goes with Content-Type"),
    "bad query": (dict(body=b"x", output="masks"), 422, "query.output"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_are_4xx_with_a_json_error_and_the_server_goes_on(server, case):
    _, client = server
    kwargs, status, message = BAD[case]
    res = _post(client, kwargs.pop("body"), **kwargs)
    assert res.status_code == status, res.text
    assert message in res.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_an_index_past_max_patches_is_refused_before_the_patches_are_cut(server, monkeypatch):
    """Each index is one value of the body and a whole patch once cut: 300,000 zeros (a 2.7 kB
    body) made the tiny battery run's server cut 1.2 GB of 32 x 32 patches before its 413;
    16 Mi of them, within the values a request may hold, would have cut 64 GiB."""
    _, client = server  # max_patches 16
    cut, context = [], PatchGrid.context
    monkeypatch.setattr(PatchGrid, "context", lambda grid, x: cut.append(x.shape[0])
                        or context(grid, x))
    image = np.zeros((1, 1, 28, 28), np.uint8)
    res = _post(client, encode_npz(image=image, index=np.zeros(17, np.int64)))
    assert res.status_code == 413, res.text
    assert res.json()["error"] == "17 patches: more than the server's 16 per request; split them"
    assert cut == []  # refused from the index's length alone
    res = _post(client, encode_npz(image=image, index=np.zeros(16, np.int64)), output="labels")
    assert res.status_code == 200 and res.headers["X-Paser-Patches"] == "16" and cut == [1]


@pytest.mark.parametrize("shape, why", [
    ((2, 2), "their deepest layers would see one pixel of it"),  # a norm layer's ValueError
    ((1, 32), "pooled, a side of it is narrower than their deeper layers' kernels"),  # counting
])
def test_patches_too_small_for_the_models_are_a_422_not_a_500(server, shape, why):
    """2 x 2 patches failed in the norm layer with a ValueError, and 1 x 32 ones in the FLOP
    count before the inference: both were a 500 with no word of what was wrong."""
    _, client = server
    res = _post(client, encode_npz(patches=np.zeros((1, 1, *shape), np.uint8)))
    assert res.status_code == 422, res.text
    assert res.json()["error"] == (f"patches of {shape[0]} x {shape[1]} are too small for f1 "
                                   f"({why}); send larger ones, cut as the routing path cuts "
                                   "them")
    assert client.get("/healthz").status_code == 200


def test_png_whose_height_is_not_count_patches_is_a_422(server):
    _, client = server
    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 8), np.uint8)).save(buf, format="PNG")
    res = _post(client, buf.getvalue(), kind=PNG, output="labels", count=3)
    assert res.status_code == 422 and "count=3" in res.json()["error"]


@contextlib.contextmanager
def _first_request_held(model, client, body: bytes, monkeypatch):
    """A request of ``body`` in a thread, held inside its inference (the only slot of a
    server of ``max_concurrency=1``) until the block ends, so that what the block sends
    finds the server busy whatever the machine's speed: no sleep, no race. Yields the
    models run (only the first inference waits: a server that lets a second in fails)
    and the first request's answer, ``first["res"]`` once the block has ended."""
    run_local = model.router.run_local
    started, release = threading.Event(), threading.Event()
    calls, first = [], {}

    def held(k, x):
        calls.append(k)
        if len(calls) == 1:
            started.set()
            assert release.wait(60), "the test never released the first request"
        return run_local(k, x)

    monkeypatch.setattr(model.router, "run_local", held)
    thread = threading.Thread(target=lambda: first.update(res=_post(client, body)))
    thread.start()
    try:
        assert started.wait(60)  # the first request is inside its inference, holding the slot
        yield calls, first
    finally:
        release.set()
        thread.join(60)


def test_a_busy_server_answers_503_with_retry_after(mnist_run, monkeypatch):
    """The first request holds the only slot until the test releases it, so the second
    finds the server busy whatever the machine's speed: no sleep, no race."""
    model = _load(mnist_run)
    client = TestClient(create_app(model, max_concurrency=1, queue_timeout=0.05))
    body = encode_npz(patches=_patches(1))
    with _first_request_held(model, client, body, monkeypatch) as (calls, first):
        assert client.get("/healthz").json()["running"] == 1
        second = _post(client, body)
    assert second.status_code == 503 and second.headers["Retry-After"] == "1"
    assert "busy" in second.json()["error"]
    assert first["res"].status_code == 200 and len(calls) == 1  # released, answered in full
    health = client.get("/healthz").json()
    assert (health["running"], health["served"]) == (0, 1)



def _left_while_queued(app, body: bytes) -> int:
    """The status a request gets from ``app`` (ASGI, called directly) when its client sends
    the body and then closes the connection, as an edge whose request timed out does."""
    messages = [{"type": "http.request", "body": body, "more_body": False},
                {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if len(messages) > 1 else messages[0]

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/segment",
             "raw_path": b"/v1/segment", "query_string": b"model=f1", "root_path": "",
             "headers": [(b"content-type", NPZ.encode()),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_a_request_whose_client_left_while_it_waited_runs_no_model(mnist_run, monkeypatch):
    """An edge whose request timed out while it waited for its turn sends it again (its
    retries): the request it left waited on and ran the model later for no one (on the
    demo, three 1-s timeouts behind a 20-s request ran after it, each logged 200), so that
    under load a server did the same work two and three times. It is now dropped (499)
    as soon as the client is seen gone."""
    model = _load(mnist_run)
    app = create_app(model, max_concurrency=1, queue_timeout=5)
    body = encode_npz(patches=_patches(1))
    client = TestClient(app)
    with _first_request_held(model, client, body, monkeypatch) as (calls, first):
        left = _left_while_queued(app, body)
    assert left == 499 and first["res"].status_code == 200
    assert len(calls) == 1  # the left request ran no model, before or after the first
    assert client.get("/healthz").json()["served"] == 1


def test_counting_a_new_patch_size_leaves_a_concurrent_inference_its_weights(mnist_run):
    """With --max-concurrency above 1, a request of a patch size not counted yet counts
    f_k's FLOPs while another request may be running f_k: the count swapped f_k's weights
    for shape-only (meta) ones while it ran, and the other request's answer was made of
    them (garbage, without an error). The count's forward here runs another inference."""
    model = _load(mnist_run)
    f1 = model.router.pool[0]
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = f1(x)
    meanwhile = []

    def another_request(module, args):
        if args[0].device.type == "meta":  # the count's forward
            def run():
                with torch.inference_mode():
                    meanwhile.append(f1(x))
            thread = threading.Thread(target=run)
            thread.start()
            thread.join()

    client = TestClient(create_app(model, max_concurrency=2))  # (counts the run's size)
    f1.register_forward_pre_hook(another_request)
    res = _post(client, encode_npz(patches=_patches(1, size=24)), output="labels")
    assert res.status_code == 200, res.text
    assert len(meanwhile) >= 1 and all(torch.equal(m, want) for m in meanwhile)


def _forced(model, bias):
    """The run with a calibration that routes by ``bias`` (to reach the remote tier)."""
    base = Calibration([0.0, 0.0, 0.0], 0.0, {"budget_gflops": 1.0}, 0.0, [], 0.0, {}, 0, 0, 0)
    model.calibration = replace(base, bias=bias)
    return model


def test_routing_on_the_remote_tier_equals_routing_here(mnist_run):
    """A 2 x 2 grid with a halo, so patches overlap and are cut, sent and stitched back."""
    server_model, edge = _load(mnist_run), _load(mnist_run)
    for m in (server_model, edge):
        m.router.grid = PatchGrid(2, 2, halo=4)
    client = TestClient(create_app(server_model))
    x = torch.randint(0, 256, (3, 1, 32, 32)) / 255.0
    actions = torch.tensor([[0, 1, 2, 2], [1, 1, 1, 0], [2, 0, 0, 2]])
    with torch.inference_mode():
        here = edge.router(x, actions=actions, mc_seed=0)
        pool = edge.use_remote("http://testserver", http=client)
        assert pool.connect()["halo"] == 4
        there = edge.router(x, actions=actions, mc_seed=0)
    transfer = pool.take()
    assert torch.equal(there.mask, here.mask) and there.degraded is None
    assert torch.allclose(there.gflops, here.gflops)
    # f1's and f2's patches of the 3 images in one request
    assert transfer.requests == 1 and transfer.patches_sent == 8 and transfer.errors == []
    assert transfer.bytes_sent < 2 * len(encode_npz(patches=quantise(x.numpy())))
    assert transfer.bytes_sent > 0 and transfer.bytes_received > 0
    # probabilities instead of labels: the stitched probabilities themselves agree
    edge.use_remote("http://testserver", http=client, output="probs")
    with torch.inference_mode():
        probs = edge.router(x, actions=actions, mc_seed=0).probs
    assert torch.allclose(probs, here.probs, atol=1e-3)  # float16 on the wire


class _Older:
    """The server as one made before requests of several models: /v1/models without
    ``index_per_model``, and a request without ``model=`` refused; what each post sent."""

    def __init__(self, client):
        self.client, self.sent, self.models = client, [], []

    def get(self, url, **kwargs):
        res = self.client.get(url, **kwargs)
        info = res.json()
        info["request"].pop("index_per_model")
        return httpx.Response(res.status_code, json=info, request=res.request)

    def post(self, url, **kwargs):
        self.sent.append(len(kwargs["content"]))
        self.models.append(kwargs["params"].get("model"))
        if "model" not in kwargs["params"]:
            return httpx.Response(422, json={"error": "query.model: Field required"},
                                  request=httpx.Request("POST", url))
        return self.client.post(url, **kwargs)


def _two_on_f1_two_on_f2(mnist_run, http, max_patches=4096):
    """docs/deployment.md's mixed case: a 2 x 2 grid with halo 4, the left patches on f1,
    the right ones on f2 (every pixel is read by patches of both models); the labels here
    and through the remote tier, and what that sent."""
    server_model, edge = _load(mnist_run), _load(mnist_run)
    for m in (server_model, edge):
        m.router.grid = PatchGrid(2, 2, halo=4)
    x = torch.randint(0, 256, (1, 1, 32, 32), generator=torch.Generator().manual_seed(1)) / 255.0
    actions = torch.tensor([[1, 2, 1, 2]])
    with torch.inference_mode():
        here = edge.router(x, actions=actions, mc_seed=0)
        pool = edge.use_remote("http://testserver", http=http(TestClient(create_app(
            server_model, max_patches=max_patches))))
        there = edge.router(x, actions=actions, mc_seed=0)
    assert there.degraded is None and torch.equal(there.mask, here.mask)
    return x, pool.take(), pool.http


@pytest.mark.slow
def test_the_image_travels_once_for_every_pool_model(mnist_run):
    """Each pool model's patches went in a request of their own, each with the pixels its
    patches read: in docs/deployment.md's mixed case the pixels went twice, more than the
    whole image (121 % of its bytes on the synthetic battery's images)."""
    x, one, _ = _two_on_f1_two_on_f2(mnist_run, lambda client: client)
    _, each, older = _two_on_f1_two_on_f2(mnist_run, _Older)
    assert (one.requests, one.patches_sent, one.errors) == (1, 4, [])
    assert (each.requests, each.patches_sent, each.errors) == (2, 4, [])  # model by model
    assert older.models == ["f1", "f2"] and each.bytes_sent == sum(older.sent)
    image = quantise(x.numpy())
    whole = len(encode_npz(patches=image))
    assert each.bytes_sent > whole  # every pixel twice
    # every pixel once, with the two models' indices
    assert one.bytes_sent == len(encode_npz(image=image, index_f1=np.array([0, 2]),
                                            index_f2=np.array([1, 3])))
    assert one.bytes_sent < each.bytes_sent and one.bytes_sent - whole < 500



@pytest.mark.slow
def test_a_server_restarted_as_an_older_one_is_asked_model_by_model(mnist_run):
    """A server that took requests of several models when the edge connected, restarted as
    one made before them, answered each of them 422 ('query.model: Field required'), and the
    edge never asked /v1/models again: every image's f1 and f2 patches kept f0's prediction,
    marked degraded, until the command was run again. It now asks again on such a refusal
    and goes on model by model, with the labels of routing here."""
    server_model, edge = _load(mnist_run), _load(mnist_run)
    for m in (server_model, edge):
        m.router.grid = PatchGrid(2, 2, halo=4)
    x = torch.randint(0, 256, (1, 1, 32, 32), generator=torch.Generator().manual_seed(1)) / 255.0
    actions = torch.tensor([[1, 2, 1, 2]])
    client = TestClient(create_app(server_model))
    with torch.inference_mode():
        here = edge.router(x, actions=actions, mc_seed=0)
        pool = edge.use_remote("http://testserver", http=client)
        assert pool.connect()["request"]["index_per_model"] is True
        pool.http = older = _Older(client)  # restarted as an older paser
        first = edge.router(x, actions=actions, mc_seed=0)
        second = edge.router(x, actions=actions, mc_seed=0)
    for there in (first, second):
        assert there.degraded is None and torch.equal(there.mask, here.mask)
    # the refused request of both models, then each model's; the next image model by model
    assert older.models == [None, "f1", "f2", "f1", "f2"]
    transfer = pool.take()
    assert (transfer.requests, transfer.patches_sent, transfer.errors) == (5, 8, [])

@pytest.mark.slow
def test_the_servers_patch_limit_counts_every_models_patches(server, mnist_run, monkeypatch):
    """--max-patches holds for the sum of a request's indices, checked before any patch is
    cut; the edge splits its request to fit, and the labels stay those of routing here."""
    _, client = server  # max_patches 16
    cut, context = [], PatchGrid.context
    monkeypatch.setattr(PatchGrid, "context", lambda grid, x: cut.append(x.shape[0])
                        or context(grid, x))
    body = encode_npz(image=np.zeros((1, 1, 28, 28), np.uint8), index_f1=np.zeros(9, np.int64),
                      index_f2=np.zeros(8, np.int64))
    res = client.post("/v1/segment", content=body, headers={"Content-Type": NPZ})
    assert res.status_code == 413, res.text
    assert res.json()["error"] == ("17 patches (9 in 'index_f1' + 8 in 'index_f2'): more than "
                                   "the server's 16 per request; split them")
    assert cut == []
    monkeypatch.undo()
    _, split, _ = _two_on_f1_two_on_f2(mnist_run, lambda client: client, max_patches=3)
    # f1's 2 patches with one of f2's, then f2's other alone
    assert (split.requests, split.patches_sent, split.errors) == (2, 4, [])


def test_a_request_of_every_pool_model_answers_each(server):
    model, client = server
    u8 = RNG.integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    body = encode_npz(image=u8, index_f2=np.array([1]), index_f1=np.array([0, 1]))
    res = client.post("/v1/segment", params={"output": "labels", "digest_f1": weights_digest(
        model.router.pool[0])}, content=body, headers={"Content-Type": NPZ})
    assert res.status_code == 200, res.text
    assert (res.headers["X-Paser-Model"], res.headers["X-Paser-Patches"]) == ("f2,f1", "3")
    x = torch.from_numpy(u8 / np.float32(255))
    with torch.inference_mode():
        for k, images in ((1, x), (2, x[1:])):
            got = decode_npz(res.content, f"labels_f{k}", 10**6)
            assert np.array_equal(got, model.router.run_local(k, images).argmax(1).numpy())
    assert client.get("/v1/models").json()["request"]["index_per_model"] is True


POOLED = {
    "no index": (dict(arrays=dict(image=np.zeros((1, 1, 8, 8), np.uint8),
                                  index=np.array([0]))), 400,
                 "without model=, the .npz needs 'image' [B, C, H, W] with one 'index_fK' [N_k] "
                 "per model (it has: image, index); or name the model"),
    "unknown model": (dict(arrays=dict(image=np.zeros((1, 1, 8, 8), np.uint8),
                                       index_f9=np.array([0]))), 404,
                      "no model 'f9' (array 'index_f9'); this server has f1, f2"),
    "index range": (dict(arrays=dict(image=np.zeros((1, 1, 8, 8), np.uint8),
                                     index_f1=np.array([0]), index_f2=np.array([1])
                                     )), 422, "'index_f2' must be 1-D integers in [0, 1)"),
    "digest": (dict(params=dict(digest_f2="0" * 64)), 409,
               "f2 here has other weights than the client expects"),
    "digest of no model": (dict(params=dict(digest="0" * 64)), 422,
                           "digest= goes with model=; for one 'index_fK' per model send "
                           "digest_fK= for each"),
    "png": (dict(kind=PNG), 422, "without model=, a request is an .npz of 'image' with one "
            "'index_fK' per model, answered as .npz; name the model for a PNG"),
}


@pytest.mark.parametrize("case", list(POOLED))
def test_bad_requests_of_every_pool_model_are_4xx_with_a_json_error(server, case):
    _, client = server
    kwargs, status, message = POOLED[case]
    body = encode_npz(**kwargs.get("arrays", dict(image=np.zeros((1, 1, 8, 8), np.uint8),
                                                  index_f1=np.array([0]))))
    res = client.post("/v1/segment", params=kwargs.get("params", {}), content=body,
                      headers={"Content-Type": kwargs.get("kind", NPZ)})
    assert res.status_code == status, res.text
    assert message in res.json()["error"]


def test_unreachable_tier_keeps_f0s_prediction_and_is_not_retried_while_down(mnist_run):
    edge = _forced(_load(mnist_run), [0.0, 0.0, 100.0])  # every image to f2
    x = torch.rand(4, 1, 28, 28)
    with reserved_port() as port:  # nothing listens there
        pool = edge.use_remote(f"http://127.0.0.1:{port}", timeout=0.5, retries=1,
                               backoff=0.0)
        out = edge.segment(x)
        transfer = pool.take()
        edge.segment(x)  # within down_for: no waiting on timeouts again
        skipped = pool.take()
    assert out.degraded.all() and torch.equal(out.actions, torch.full((4, 1), 2))
    assert torch.equal(out.mask, out.mc.pred)  # f0's prediction
    costs = edge.router.costs(28, 28)
    assert torch.allclose(out.gflops, torch.full((4,), costs.fixed, dtype=torch.float64))
    assert transfer.patches_failed == 4 and "ConnectError" in transfer.errors[0]
    assert skipped.requests == 0 and skipped.patches_sent == 0 and skipped.patches_failed == 4
    assert "not asked: it failed less than 30 s ago" in skipped.errors[0]


@pytest.mark.slow
def test_a_volumes_degraded_patches_are_recorded_and_done_again(mnist_run, tmp_path):
    """A volume segmented while the remote tier is down says so, and is not skipped as done
    by the next call, which segments it as if the tier had answered the first time."""
    vol = np.random.default_rng(3).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "scan.tif", vol, photometric="minisblack")
    edge = _forced(_load(mnist_run), [0.0, 0.0, 100.0])  # every slice to f2
    here = np.stack([edge.label_codec.encode(edge.segment(
        torch.from_numpy(s / 255.0)[None, None].float()).mask[0].numpy()) for s in vol])
    out = tmp_path / "out"
    with reserved_port() as port:  # nothing listens there
        edge.use_remote(f"http://127.0.0.1:{port}", timeout=0.5, retries=0, backoff=0.0)
        segment_volumes(edge, [open_volume(tmp_path / "scan.tif")], out)
    rec = json.loads((out / "scan.json").read_text())
    assert rec["degraded_patches"] == 4 and [s["degraded"] for s in rec["slices"]] == [1] * 4
    assert rec["remote"]["degraded_patches"] == 4 and rec["remote"]["patches_failed"] == 4
    [row] = csv.DictReader(open(out / "volumes.csv"))
    assert row["degraded patches"] == "4"
    edge.use_remote("http://testserver", http=TestClient(create_app(_load(mnist_run))))
    [res] = segment_volumes(edge, [open_volume(tmp_path / "scan.tif")], out)
    assert not res.resumed
    rec = json.loads((out / "scan.json").read_text())
    assert "degraded_patches" not in rec and all("degraded" not in s for s in rec["slices"])
    assert np.array_equal(tifffile.imread(out / "scan_labels.tif"), here)


@pytest.mark.slow
def test_a_volumes_remote_figures_are_its_slices_segmented_as_images(mnist_run, tmp_path,
                                                                     capsys):
    """volumes.csv and a volume's JSON had no bytes sent (summary.csv and an image's JSON
    have them): a volume's are its slices' as images, summed."""
    vol = np.random.default_rng(5).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "scan.tif", vol, photometric="minisblack")
    (tmp_path / "in").mkdir()
    for z, s in enumerate(vol):
        Image.fromarray(s).save(tmp_path / "in" / f"s{z}.png")
    edge = _forced(_load(mnist_run), [0.0, 100.0, 0.0])  # every patch to f1, remote
    edge.use_remote("http://testserver", http=TestClient(create_app(_load(mnist_run))))
    segment_files(edge, find_images([tmp_path / "in"]), tmp_path / "images")
    images = [json.loads((tmp_path / "images" / f"s{z}.json").read_text())["remote"]
              for z in range(2)]
    segment_volumes(edge, [open_volume(tmp_path / "scan.tif")], tmp_path / "vol")
    remote = json.loads((tmp_path / "vol" / "scan.json").read_text())["remote"]
    for key in ("bytes_sent", "bytes_received", "requests", "patches_sent", "degraded_patches"):
        assert remote[key] == sum(i[key] for i in images), key
    assert remote["bytes_sent"] > 0 and remote["requests"] == 2 and remote["slices"] == 2
    assert remote["bytes_whole_volume"] == sum(i["bytes_whole_image"] for i in images)
    assert remote["edge_gflops"] == pytest.approx(sum(i["edge_gflops"] for i in images))
    assert remote["cloud_gflops"] == pytest.approx(sum(i["cloud_gflops"] for i in images))
    assert remote["url"] == "http://testserver" and remote["errors"] == []
    [row] = csv.DictReader(open(tmp_path / "vol" / "volumes.csv"))
    assert (row["degraded patches"], row["bytes sent"], row["bytes whole volume"]) == (
        "0", str(remote["bytes_sent"]), str(remote["bytes_whole_volume"]))
    # the volume's line, and where a call without --remote finished it (no URL then)
    from types import SimpleNamespace

    from paser.cli.deploy import _volume_lines

    rec = json.loads((tmp_path / "vol" / "scan.json").read_text())
    for url, shown in (("http://testserver", "  remote http://testserver: sent "),
                       (None, "  remote: sent ")):
        rec["remote"]["url"] = url
        _volume_lines([SimpleNamespace(record=rec, source="scan.tif", resumed=False)],
                      tmp_path / "vol")
        line = capsys.readouterr().out.splitlines()[1]
        assert line.startswith(f"{shown}{remote['bytes_sent']:,} bytes against "), line


@pytest.mark.slow
def test_one_images_patches_past_the_servers_limit_go_in_several_requests(mnist_run):
    server_model, edge = _load(mnist_run), _load(mnist_run)
    for m in (server_model, edge):
        m.router.grid = PatchGrid(2, 2, halo=4)
    client = TestClient(create_app(server_model, max_patches=1))
    x = torch.randint(0, 256, (1, 1, 32, 32)) / 255.0
    actions = torch.tensor([[2, 2, 2, 0]])
    with torch.inference_mode():
        here = edge.router(x, actions=actions, mc_seed=0)
        pool = edge.use_remote("http://testserver", http=client)
        there = edge.router(x, actions=actions, mc_seed=0)
    transfer = pool.take()
    assert there.degraded is None and torch.equal(there.mask, here.mask)
    assert transfer.requests == 3 and transfer.errors == []


@pytest.mark.slow
def test_a_server_restarted_with_other_weights_is_an_error_not_a_mix(mnist_run):
    server_model, edge = _load(mnist_run), _load(mnist_run)
    client = TestClient(create_app(server_model))
    edge.use_remote("http://testserver", http=client).connect()  # the same weights: served
    x, actions = torch.rand(1, 1, 28, 28), torch.tensor([[2]])
    with torch.inference_mode():
        edge.router(x, actions=actions, mc_seed=0)
        for p in server_model.router.pool[1].parameters():  # as a restart with another run
            p.add_(0.01)
        other = TestClient(create_app(server_model))
        edge.router.remote.http = other
        with pytest.raises(RemoteError, match="f2 here has other weights than the client"):
            edge.router(x, actions=actions, mc_seed=0)


def test_labels_outside_the_runs_classes_are_a_failed_answer(mnist_run, monkeypatch):
    import paser.serve.client as client_module

    pick = client_module.npz_array
    monkeypatch.setattr(client_module, "npz_array",  # a misbehaving server's answer
                        lambda *a, **k: np.full_like(pick(*a, **k), 12))
    edge = _forced(_load(mnist_run), [0.0, 0.0, 100.0])
    pool = edge.use_remote("http://testserver", http=TestClient(create_app(_load(mnist_run))))
    out = edge.segment(torch.rand(1, 1, 28, 28))
    assert out.degraded.all()
    assert "an answer that is not [1, 28, 28] labels (class 12 of 2)" in pool.take().errors[0]


def test_a_url_that_is_not_a_paser_server_is_an_error_not_a_server_down(mnist_run):
    from fastapi import FastAPI

    from paser.serve.client import RemoteError

    edge = _load(mnist_run)
    pool = edge.use_remote("http://testserver/v1", http=TestClient(FastAPI()))
    with pytest.raises(RemoteError, match="HTTP 404: not a paser server, or not its root URL"):
        pool.connect()


def test_a_server_with_other_weights_is_refused(mnist_run):
    server_model = _load(mnist_run)
    with torch.no_grad():
        next(server_model.router.pool[0].parameters()).add_(1.0)
    edge = _load(mnist_run)
    pool = edge.use_remote("http://testserver", http=TestClient(create_app(server_model)))
    with pytest.raises(RemoteError, match="f1 has other weights than this run's"):
        pool.connect()


def _wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("paser serve did not come up")


@pytest.mark.slow  # `paser serve` (uvicorn) and `paser segment` in processes
def test_end_to_end_with_uvicorn_stopped_mid_run(mnist_run, tmp_path, server_port):
    port = server_port
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "paser", "serve", "--run-dir",
                             str(mnist_run), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(url, proc)
        folder = tmp_path / "in"
        folder.mkdir()
        for i in range(6):
            Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8)).save(
                folder / f"img{i}.png")
        edge = _forced(_load(mnist_run), [0.0, 100.0, 0.0])  # every image to f1
        # a slow first answer on a loaded machine is not the stopped server this test is about
        pool = edge.use_remote(url, timeout=30.0, retries=1, backoff=0.0)
        pool.connect()

        def stop_after_two(res):
            if res.stem == "img1":
                proc.terminate()
                proc.wait(30)

        results = segment_files(edge, find_images([folder]), tmp_path / "out",
                                on_done=stop_after_two)
    finally:
        proc.kill()
    assert [r.ok for r in results] == [True] * 6  # nothing lost
    assert [r.degraded for r in results] == [0, 0, 1, 1, 1, 1]
    records = [json.loads((tmp_path / "out" / f"img{i}.json").read_text()) for i in range(6)]
    for i, rec in enumerate(records):
        remote = rec["remote"]
        assert rec["actions"] == [[1]] and remote["degraded"] == [[i >= 2]]
        assert remote["bytes_whole_image"] > 0
        if i < 2:
            assert remote["requests"] == 1 and remote["errors"] == []
            assert 0 < remote["bytes_sent"] and remote["cloud_gflops"] > 0
        else:
            assert remote["cloud_gflops"] == 0 and remote["patches_failed"] == 1
    assert remote["requests"] == 0  # marked down after the first failure: no more waiting
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [r["degraded patches"] for r in rows] == ["0", "0", "1", "1", "1", "1"]
    # the CLI against the stopped server: a warning, every image written, exit status 0
    res = paser("segment", str(folder), "--run-dir", str(mnist_run), "--out",
                str(tmp_path / "cli"), "--remote", url, "--timeout", "1", "--retries", "0")
    assert res.returncode == 0, res.stderr
    assert f"warning: remote tier {url} does not answer" in res.stderr
    assert "6 of 6 images segmented in" in res.stdout and "patches degraded" in res.stdout


def test_segment_remote_without_the_serve_extra_says_what_to_install(mnist_run, monkeypatch,
                                                                      tmp_path):
    """httpx often comes with other packages; without the serve extra the user is told to
    install it, before any import of httpx fails with a traceback."""
    from paser.cli.deploy import _connect_remote
    from paser.errors import PaserError

    for module in ("fastapi", "httpx"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails
    with pytest.raises(PaserError, match=r"the edge/cloud split needs FastAPI, uvicorn and "
                                         r"httpx .*pip install 'paser\[serve\]'"):
        _connect_remote(_load(mnist_run), "http://127.0.0.1:9", 1.0, 0, None, None)
    # the command says so before it loads the run (a folder that is no run: not reached)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    res = paser_here("segment", tmp_path / "a.png", "--run-dir", tmp_path / "no-run-here",
                     "--out", tmp_path / "o", "--remote", "http://127.0.0.1:9")
    assert res.returncode == 2 and "pip install 'paser[serve]'" in res.stderr, res.stderr


@pytest.mark.slow
def test_remote_on_a_folder_an_earlier_call_segmented_without_it_sums_what_was_sent(
        mnist_run, tmp_path):
    """Images an earlier call segmented without --remote have no bytes sent: the line of
    bytes is over the others (it was a TypeError on their None)."""
    for i in range(3):
        Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8)).save(
            tmp_path / f"img{i}.png")
    first = [tmp_path / "img0.png", tmp_path / "img1.png"]
    out = tmp_path / "out"
    assert paser_here("segment", *first, "--run-dir", mnist_run, "--out", out).returncode == 0
    with reserved_port() as port:  # nothing listens there: a warning, patches kept on f0
        url = f"http://127.0.0.1:{port}"
        res = paser_here("segment", *first, tmp_path / "img2.png", "--run-dir", mnist_run,
                         "--out", out, "--remote", url, "--timeout", "0.5", "--retries", "0")
    assert res.returncode == 0, res.stderr
    whole = json.loads((out / "img2.json").read_text())["remote"]["bytes_whole_image"]
    assert "2 of 3 images were segmented before" in res.stdout
    assert f"remote {url}: sent 0 bytes per image against {whole:,} for the whole image " \
           "(0.0%)" in res.stdout, res.stdout
    assert "(2 segmented before without --remote)" in res.stdout, res.stdout


def test_segment_says_why_patches_were_degraded(mnist_run, tmp_path, monkeypatch):
    """The closing lines said how many patches kept f0's prediction, not why (a volume's: 'the
    remote tier did not answer', also when it answered 413), and the images after the first
    failure recorded only 'not asked: it failed less than 30 s ago'."""
    from paser import PaSeR

    load = PaSeR.load  # every patch to f2, on the remote tier
    monkeypatch.setattr(PaSeR, "load", lambda *a, **k: _forced(load(*a, **k), [0.0, 0.0, 100.0]))
    tifffile.imwrite(tmp_path / "scan.tif", RNG.integers(0, 256, (2, 28, 28), dtype=np.uint8),
                     photometric="minisblack")
    Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "a.png")
    with reserved_port() as port:  # nothing listens there
        url = f"http://127.0.0.1:{port}"
        res = paser_here("segment", tmp_path / "scan.tif", tmp_path / "a.png", "--run-dir",
                         mnist_run, "--out", tmp_path / "out", "--remote", url, "--timeout",
                         "0.5", "--retries", "0")
    assert res.returncode == 0, res.stderr
    refused = json.loads((tmp_path / "out" / "scan.json").read_text())["remote"]["errors"][0]
    assert refused.startswith(f"{url}: ConnectError")  # the volume went first
    assert f"  2 patches degraded (f0's prediction kept: {refused} (and 1 other error: each " \
           "JSON lists its own)); the same command again redoes them" in res.stdout, res.stdout
    said = (f"{url}: not asked: it failed less than 30 s ago (down_for): "
            f"{refused.removeprefix(url + ': ')}")
    assert json.loads((tmp_path / "out" / "a.json").read_text())["remote"]["errors"] == [said]
    assert f"  why: {said}; the same command again redoes those images" in res.stderr


def test_a_port_in_use_is_one_line_before_the_run_loads():
    from paser.errors import PaserError
    from paser.serve.server import _check_port

    with reserved_port(server=True) as port:  # no other process takes it once it is free
        with socket.socket() as held:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.bind(("127.0.0.1", port))
            held.listen()
            with pytest.raises(PaserError,
                               match=f"--port {port} on 127.0.0.1: cannot listen there"):
                _check_port("127.0.0.1", port)
        _check_port("127.0.0.1", port)  # free again


class _Flaky:
    """The server behind a proxy whose posts answer ``answers`` in turn (``None``: the
    server's own answer); what each post sent and received, in bytes."""

    def __init__(self, client, answers):
        self.client, self.answers, self.sent, self.got = client, list(answers), [], []

    def get(self, *args, **kwargs):
        return self.client.get(*args, **kwargs)

    def post(self, url, **kwargs):
        self.sent.append(len(kwargs["content"]))
        answer = self.answers.pop(0) if self.answers else None
        res = self.client.post(url, **kwargs) if answer is None else answer
        self.got.append(len(res.content))
        return res


@pytest.mark.slow
def test_a_busy_answer_is_retried_with_capped_backoff_and_every_byte_counted(mnist_run,
                                                                           monkeypatch):
    import types

    import paser.serve.client as client_module

    slept = []
    monkeypatch.setattr(client_module, "time", types.SimpleNamespace(
        monotonic=time.monotonic, sleep=slept.append))
    busy = httpx.Response(503, json={"error": "busy"})
    proxy = _Flaky(TestClient(create_app(_load(mnist_run))), [busy, busy])
    edge = _forced(_load(mnist_run), [0.0, 0.0, 100.0])  # every image to f2
    pool = edge.use_remote("http://testserver", http=proxy, retries=2, backoff=5.0)
    assert edge.segment(torch.rand(1, 1, 28, 28)).degraded is None  # the third attempt
    t = pool.take()
    assert (t.requests, t.retries, t.patches_failed, slept) == (3, 2, 0, [5.0, 8.0])  # 10 capped
    assert t.bytes_sent == sum(proxy.sent) == 3 * proxy.sent[0]  # each attempt sent it all
    assert t.bytes_received == sum(proxy.got) > 2 * len(busy.content)  # the 503s' too


@pytest.mark.slow
def test_a_bad_answer_to_one_request_fails_every_patch_of_the_call(mnist_run):
    """One image's 3 patches in 3 requests (max_patches 1): the second answers class 2 of 2
    classes, so all 3 keep f0's prediction and count as failed, not the one request's."""
    server_model, edge = _load(mnist_run), _load(mnist_run)
    for m in (server_model, edge):
        m.router.grid = PatchGrid(2, 2, halo=4)
    wrong = httpx.Response(200, content=encode_npz(labels=np.full((1, 16, 16), 2, np.uint8)))
    proxy = _Flaky(TestClient(create_app(server_model, max_patches=1)), [None, wrong])
    pool = edge.use_remote("http://testserver", http=proxy)
    x = torch.randint(0, 256, (1, 1, 32, 32)) / 255.0
    with torch.inference_mode():
        out = edge.router(x, actions=torch.tensor([[2, 2, 2, 0]]), mc_seed=0)
    t = pool.take()
    assert out.degraded.tolist() == [[True, True, True, False]] and t.patches_failed == 3
    assert t.errors == ["http://testserver: an answer that is not [1, 16, 16] labels "
                        "(class 2 of 2)"]


def test_the_edge_splits_by_the_servers_byte_limit_and_refuses_port_0(mnist_run):
    from paser.errors import ConfigError
    from paser.serve.client import RemotePool

    edge = _load(mnist_run)
    pool = RemotePool("http://testserver", edge)
    # two 28 x 28 images fit at 2 bytes a value (16-bit) and the 4096 bytes kept for the zip
    pool.server = {"limits": {"max_values": 10**6, "max_patches": 10**6,
                              "max_request_bytes": 4096 + 2 * 2 * 28 * 28}}
    assert pool._image_chunks((5, 1, 28, 28)) == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(ConfigError, match="port 0 is not a port"):
        RemotePool("http://127.0.0.1:0", edge)


def test_the_servers_limits_hold_at_their_bounds(server, mnist_run):
    _, client = server  # max_request_bytes 200,000; patches up to 1024 x 1024
    res = _post(client, RNG.integers(0, 255, 200_000, np.uint8).tobytes())
    assert res.status_code == 400  # read (junk), not refused as too large
    res = _post(client, encode_npz(patches=np.zeros((1, 1, 40, 1030), np.uint8)))
    assert res.status_code == 413 and "patches of 40 x 1030: larger" in res.json()["error"]
    halo = _load(mnist_run)
    halo.router.grid = PatchGrid(2, 2, halo=4)
    res = _post(TestClient(create_app(halo)), encode_npz(patches=np.zeros((1, 1, 8, 8),
                                                                          np.uint8)))
    assert res.status_code == 422 and "the run's halo of 4 pixels" in res.json()["error"]


def test_patches_in_either_byte_order_or_as_booleans_reach_the_models_as_the_same_values():
    """An .npz of big-endian uint16 patches (written on another machine) was refused as
    "dtype >u2; send ... uint16", and bilevel patches as "dtype bool"; they are the values
    their native uint16 and 0 / 1 give, as the image reader scales such files."""
    patches = RNG.integers(0, 65536, (2, 1, 8, 8), dtype=np.uint16)
    assert np.array_equal(_unit(patches.astype(">u2"), "patches", 1), _unit(patches, "patches", 1))
    bits = patches > 30000
    assert np.array_equal(_unit(bits, "patches", 1), bits.astype(np.float32))
    assert np.array_equal(_unit(bits.astype(np.uint8) * 255, "patches", 1), _unit(bits, "patches", 1))
