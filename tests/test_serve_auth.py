"""The cloud tier lets in only its own edges: with a token, every request but /healthz needs
it, and one without it (or with another) is a 401 before its body is read; each request is
one log line with its id and never the token; an edge whose token is refused, or that does
not trust the server's certificate, stops with one line instead of falling back to f0; an
HTTPS round trip with a throwaway CA; and the load test's invariants on a small load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from benchmarks import load as load_script
from benchmarks.load import Answer, Job, load_test, plan, violations
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from paser.calibration import Calibration
from paser.cli import app
from paser.errors import ConfigError, PaserError, RemoteAccessError
from paser.patches import PatchGrid
from paser.segment import find_images, segment_files
from paser.serve import TOKEN_ENV, read_token
from paser.serve.client import RemotePool
from paser.serve.codec import NPZ, encode_npz
from paser.serve.server import create_app, exposure_warning, serve

pytestmark = pytest.mark.slow  # uvicorn servers and `paser` processes

TOKEN = "k3Jv-tH2_secret-for-tests-0123456789"
WANTS_A_TOKEN = ("wants a token: pass --token-file FILE holding the token its `paser serve` "
                 "was given (Python: use_remote(url, token=...))")
RNG = np.random.default_rng(0)


def _load(run):
    from paser import PaSeR

    return PaSeR.load(run, device="cpu", calibrated=False)


def _forced(model, bias):
    """The run with a calibration that routes by ``bias`` (to reach the remote tier)."""
    base = Calibration([0.0, 0.0, 0.0], 0.0, {"budget_gflops": 1.0}, 0.0, [], 0.0, {}, 0, 0, 0,
                       policy=model.router.policy_digest)
    model.calibration = replace(base, bias=bias)
    return model


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def _segment(client, headers, body=None):
    body = encode_npz(patches=RNG.integers(0, 256, (3, 1, 16, 16), dtype=np.uint8)) \
        if body is None else body
    return client.post("/v1/segment", params={"model": "f1"}, content=body,
                       headers={"Content-Type": NPZ, **headers})


@pytest.fixture(scope="module")
def guarded(mnist_run):
    model = _load(mnist_run)
    return model, TestClient(create_app(model, token=TOKEN, max_request_bytes=200_000))


@pytest.fixture
def model_calls(guarded, monkeypatch):
    """How many times the guarded server's pool models ran."""
    router, calls = guarded[0].router, []
    run_local = router.run_local
    monkeypatch.setattr(router, "run_local", lambda k, x: calls.append(k) or run_local(k, x))
    return calls


# ---- the server: 401 before anything else ---------------------------------------------------

REFUSED = {"no header": {}, "wrong token": _bearer("not-the-token"),
           "one character more": _bearer(TOKEN + "x"), "a prefix": _bearer(TOKEN[:-1]),
           "no scheme": {"Authorization": TOKEN}, "basic": {"Authorization": f"Basic {TOKEN}"},
           "empty bearer": {"Authorization": "Bearer "}}


@pytest.mark.parametrize("case", list(REFUSED))
def test_without_the_token_every_v1_request_is_a_401_json_error(guarded, model_calls, case):
    _, client = guarded
    for res in (client.get("/v1/models", headers=REFUSED[case]),
                _segment(client, REFUSED[case]), client.get("/openapi.json",
                                                            headers=REFUSED[case])):
        assert res.status_code == 401, res.text
        assert res.headers["WWW-Authenticate"] == "Bearer"
        assert "token" in res.json()["error"] and TOKEN not in res.text
    assert model_calls == []


def test_with_the_token_the_models_answer(guarded, model_calls):
    _, client = guarded
    assert client.get("/v1/models", headers=_bearer(TOKEN)).json()["models"][0]["name"] == "f1"
    res = _segment(client, _bearer(TOKEN))
    assert res.status_code == 200 and res.headers["X-Paser-Patches"] == "3"
    assert model_calls == [1]


def test_the_scheme_is_case_insensitive_as_http_says(guarded):
    _, client = guarded
    for scheme in ("bearer", "BEARER"):
        res = client.get("/v1/models", headers={"Authorization": f"{scheme} {TOKEN}"})
        assert res.status_code == 200, res.text


def test_a_refused_request_is_not_read(guarded, model_calls):
    """A body over the size limit, or junk, is a 401 without the token, not the 413 or 400
    that reading it would give."""
    _, client = guarded
    too_big = RNG.integers(0, 255, 250_000, np.uint8).tobytes()
    assert _segment(client, {}, too_big).status_code == 401
    assert _segment(client, _bearer("wrong"), b"junk").status_code == 401
    assert _segment(client, _bearer(TOKEN), too_big).status_code == 413
    assert model_calls == []


def test_healthz_is_open_and_says_nothing_about_the_token(guarded):
    model, _ = guarded
    guarded_health = TestClient(create_app(model, token=TOKEN)).get("/healthz")
    open_health = TestClient(create_app(model)).get("/healthz")
    assert guarded_health.status_code == 200
    assert guarded_health.json() == open_health.json()  # the same with a token as without
    assert "token" not in guarded_health.text.lower()


# ---- request ids and logs ---------------------------------------------------------------------

def test_a_sane_request_id_is_echoed_and_any_other_replaced(guarded):
    _, client = guarded
    sent = "4f9c2b1e-7d3a-4c55-9e0b-2a1f6c8d9e70"
    assert client.get("/healthz", headers={"X-Request-Id": sent}).headers["X-Request-Id"] == sent
    for insane in ("a b", "x" * 65, "id;rm", "<script>"):
        got = client.get("/healthz", headers={"X-Request-Id": insane}).headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{16}", got)
    ids = {client.get("/healthz").headers["X-Request-Id"] for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    assert _segment(client, {}).headers["X-Request-Id"]  # a 401 has one too


def test_each_request_is_one_log_line_without_the_token(guarded, caplog):
    _, client = guarded
    caplog.set_level(logging.INFO, logger="paser.serve")
    _segment(client, {**_bearer(TOKEN), "X-Request-Id": "ok-1"})
    _segment(client, {**_bearer("a-wrong-token"), "X-Request-Id": "refused-1"})
    _segment(client, {**_bearer(TOKEN), "X-Request-Id": "bad-1"}, b"junk")
    lines = [r.getMessage() for r in caplog.records if r.name == "paser.serve"]
    assert len(lines) == 3
    assert re.fullmatch(r"ok-1 POST /v1/segment 200 model=f1 patches=3 ms=[\d.]+ "
                        r"client=testclient", lines[0])
    assert lines[1].startswith("refused-1 POST /v1/segment 401 model=- patches=- ms=")
    assert lines[2].startswith("bad-1 POST /v1/segment 400 model=f1 patches=- ms=")
    assert TOKEN not in caplog.text and "a-wrong-token" not in caplog.text


# ---- configuration -----------------------------------------------------------------------------

def test_the_token_comes_from_the_file_else_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(None) is None  # no token anywhere: an open server (with a warning)
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    assert read_token(None) == "from-the-environment"
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    assert read_token(tmp_path / "token") == TOKEN  # the file wins; whitespace dropped


@pytest.mark.parametrize("case", ["missing", "empty", "spaces", "empty variable"])
def test_an_unusable_token_is_one_line_naming_its_source(tmp_path, monkeypatch, case):
    path = tmp_path / "token"
    if case == "empty":
        path.write_text("\n\n")
    elif case == "spaces":
        path.write_text("two words")
    elif case == "empty variable":
        monkeypatch.setenv(TOKEN_ENV, " ")
    with pytest.raises(PaserError) as err:
        read_token(None if case == "empty variable" else path)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert (TOKEN_ENV if case == "empty variable" else f"token file {path}") in message
    assert {"missing": "does not exist", "empty": "is empty", "spaces": "printable ASCII",
            "empty variable": "is empty"}[case] in message


def test_anything_but_loopback_without_a_token_or_tls_is_warned_about():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.1.1"):
        assert exposure_warning(host, token=False, tls=False) is None
    for host in ("0.0.0.0", "::", "192.168.1.20", "cloud.example.org"):
        assert "without a token" in exposure_warning(host, token=False, tls=True)
        assert "over plain HTTP" in exposure_warning(host, token=True, tls=False)
        assert exposure_warning(host, token=True, tls=True) is None


def test_a_certificate_that_will_not_load_is_one_line_before_the_model_loads(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate")
    for files, message in (
            ({"ssl_certfile": tmp_path / "none.pem"}, f"--ssl-certfile {tmp_path}/none.pem: "
                                                      "no such file"),
            ({"ssl_keyfile": tmp_path / "cert.pem"}, "--ssl-keyfile needs --ssl-certfile"),
            ({"ssl_certfile": tmp_path / "cert.pem"}, "not a PEM certificate and its "
                                                      "unencrypted key")):
        with pytest.raises(PaserError, match=re.escape(message)):
            serve(tmp_path / "no-run", **files)  # no run there: the files are checked first



def test_a_certificate_without_its_key_names_the_flag_left_out(tmp_path):
    """`--ssl-certfile cloud.pem` alone, its key in cloud.key (as openssl writes them), was
    'not a PEM certificate and its unencrypted key', which sent the user to the file."""
    import trustme

    cert = trustme.CA().issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    with pytest.raises(PaserError, match=r"--ssl-certfile \S+cert.pem: not a PEM certificate "
                                         r"and its unencrypted key \(.*\); where its key is in "
                                         r"a file of its own, pass --ssl-keyfile$"):
        serve(tmp_path / "no-run", ssl_certfile=tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    with pytest.raises(PaserError, match=r"key\.pem: not a PEM .*\)$"):  # a wrong pair: no hint
        serve(tmp_path / "no-run", ssl_certfile=tmp_path / "key.pem",
              ssl_keyfile=tmp_path / "key.pem")

def test_the_edges_token_and_ca_flags_need_a_remote_url_of_their_kind(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    runner, common = CliRunner(), ["segment", str(tmp_path / "a.png"), "--run-dir",
                                   str(tmp_path), "--out", str(tmp_path / "out")]
    for extra, message in ((["--token-file", "t"], "go with --remote URL"),
                           (["--remote", "http://cloud:8000", "--ca-file", "ca.pem"],
                            "--ca-file is for an https:// --remote"),
                           # ran every model here, silently, before
                           (["--timeout", "10", "--retries", "2"], "--timeout and --retries "
                            "set the requests to a --remote server, and none is given: add "
                            "--remote URL (f1..fK then run there), or drop --timeout and "
                            "--retries to run every model here"),
                           (["--retries", "0"], "--retries sets the requests")):
        res = runner.invoke(app, [*common, *extra])
        assert isinstance(res.exception, ConfigError) and message in str(res.exception)


# ---- the edge: a refused token stops it ----------------------------------------------------------

def test_an_edge_without_the_token_stops_at_connect(mnist_run, guarded):
    _, client = guarded
    edge = _load(mnist_run)
    with pytest.raises(RemoteAccessError) as err:
        edge.use_remote("http://testserver", http=client).connect()
    assert str(err.value) == f"http://testserver {WANTS_A_TOKEN}"
    with pytest.raises(RemoteAccessError, match="refused this edge's token: pass --token-file"):
        edge.use_remote("http://testserver", http=client, token="wrong").connect()
    assert edge.use_remote("http://testserver", http=client, token=TOKEN).connect()["halo"] == 0


def test_an_edge_whose_token_is_refused_mid_run_stops_instead_of_degrading(
        mnist_run, guarded, tmp_path):
    _, client = guarded
    edge = _forced(_load(mnist_run), [0.0, 100.0, 0.0])  # every image to f1
    pool = edge.use_remote("http://testserver", http=client, token=TOKEN)
    x = torch.rand(2, 1, 28, 28)
    assert edge.segment(x).degraded is None  # served
    pool.headers = _bearer("the server's old token")  # as if it restarted with a new one
    with pytest.raises(RemoteAccessError, match="refused this edge's token"):
        edge.segment(x)
    for i in range(3):
        Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8)).save(
            tmp_path / f"img{i}.png")
    with pytest.raises(RemoteAccessError):
        segment_files(edge, find_images([tmp_path]), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").glob("*.json")] == [
        ".paser-segment.json"]  # stopped at the first image: no image's record


# ---- HTTPS with a throwaway CA, and `paser serve` / `paser segment --remote` end to end -------

@dataclass
class Https:
    url: str
    ca: Path
    token_file: Path
    log: Path


def _env() -> dict:
    """This environment without PASER_TOKEN: the tests say where the token comes from."""
    return {k: v for k, v in os.environ.items() if k != TOKEN_ENV}


def _paser(*args):
    return subprocess.run([sys.executable, "-m", "paser", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=_env())


@pytest.fixture(scope="module")
def https_server(mnist_run, tmp_path_factory, server_port):
    """`paser serve` with --token-file and a certificate for 127.0.0.1 from a test CA."""
    import trustme  # here: cryptography's import (0.3 s) is paid by the test that uses it

    tmp = tmp_path_factory.mktemp("https")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(tmp / "ca.pem")
    cert.private_key_pem.write_to_path(tmp / "key.pem")
    for pem in cert.cert_chain_pems:
        pem.write_to_path(tmp / "cert.pem", append=True)
    (tmp / "token").write_text(TOKEN + "\n")
    port = server_port
    url = f"https://127.0.0.1:{port}"
    with open(tmp / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "paser", "serve", "--run-dir", str(mnist_run), "--port",
             str(port), "--token-file", str(tmp / "token"), "--ssl-certfile",
             str(tmp / "cert.pem"), "--ssl-keyfile", str(tmp / "key.pem")],
            stdout=subprocess.DEVNULL, stderr=log, env=_env())
    try:
        trust = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/healthz", verify=trust, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "paser serve did not come up"
                time.sleep(0.2)
        yield Https(url, tmp / "ca.pem", tmp / "token", tmp / "serve.log")
    finally:
        proc.kill()
        proc.wait(30)


def _images(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8)).save(
            folder / f"img{i}.png")
    return folder


def test_segment_remote_over_https_with_a_test_ca(mnist_run, https_server, tmp_path):
    run = Path(shutil.copytree(mnist_run, tmp_path / "run"))
    _forced(_load(run), [0.0, 100.0, 0.0]).calibration.save(run)  # every image to f1
    res = _paser("segment", _images(tmp_path / "in", 2), "--run-dir", run, "--out",
                 tmp_path / "out", "--remote", https_server.url, "--token-file",
                 https_server.token_file, "--ca-file", https_server.ca, "--workers", "0")
    assert res.returncode == 0, res.stderr
    assert f"remote tier {https_server.url}: f1" in res.stderr
    assert "2 of 2 images segmented in" in res.stdout and " 0 patches degraded" in res.stdout
    for i in range(2):
        remote = json.loads((tmp_path / "out" / f"img{i}.json").read_text())["remote"]
        assert remote["requests"] == 1 and remote["errors"] == [] and remote["cloud_gflops"] > 0
    # the server's side: one line per request, never the token
    log = https_server.log.read_text()
    assert len(re.findall(r" POST /v1/segment 200 model=f1 patches=1 ms=", log)) >= 2
    assert re.search(r" GET /v1/models 200 model=- patches=- ms=", log)
    assert TOKEN not in log and "warning" not in log.lower()  # loopback, token and TLS


def test_an_edge_without_the_token_stops_with_one_line(mnist_run, https_server, tmp_path):
    res = _paser("segment", _images(tmp_path / "in", 1), "--run-dir", mnist_run, "--out",
                 tmp_path / "out", "--remote", https_server.url, "--ca-file", https_server.ca)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {https_server.url} {WANTS_A_TOKEN}"]
    assert not (tmp_path / "out" / "img0.json").exists()


def test_the_edge_checks_the_servers_certificate(mnist_run, https_server):
    edge = _load(mnist_run)
    pool = RemotePool(https_server.url, edge, token=TOKEN)  # the system's CAs only
    with pytest.raises(RemoteAccessError, match=r"its certificate is not trusted here \(.+\); "
                       "pass --ca-file"):
        pool.connect()
    pool = RemotePool(https_server.url, edge, token="wrong", ca_file=https_server.ca)
    with pytest.raises(RemoteAccessError, match="refused this edge's token"):
        pool.connect()
    pool = RemotePool(https_server.url, edge, token=TOKEN, ca_file=https_server.ca)
    assert [m["name"] for m in pool.connect()["models"]] == ["f1", "f2"]


# ---- the load test -------------------------------------------------------------------------------

def test_a_small_load_keeps_every_invariant(mnist_run):
    figures = load_test(_load(mnist_run), (28, 28), requests=40, threads=4)
    assert figures["violations"] == []
    assert figures["kinds"] == {"valid": 32, "malformed": 4, "refused": 4}
    assert figures["status"].get("401") == 4
    assert figures["model_calls"] == figures["valid_answered"] == figures["status"]["200"]
    assert set(figures["status"]) <= {"200", "400", "401", "404", "415", "422", "503"}


def test_the_load_test_sends_as_many_requests_as_it_is_asked():
    """Before, 3 requests at shares 0.5 malformed and 0.5 refused were 4 (2 and 2), and
    --requests 10 --malformed 0.7 --refused 0.7 sent 14, reported as '10 requests'."""
    stub = SimpleNamespace(router=SimpleNamespace(grid=PatchGrid(2, 2)), config=SimpleNamespace(
        models=SimpleNamespace(in_channels=1, pool=["f1", "f2"])))
    jobs = plan(stub, (32, 32), 3, 0.5, 0.5, "token")
    assert sorted(j.kind for j in jobs) == ["malformed", "malformed", "refused"]
    assert [j.kind for j in plan(stub, (32, 32), 10, 0.1, 0.1, "token")].count("valid") == 8
    with pytest.raises(ValueError, match="together at most 1"):
        plan(stub, (32, 32), 10, 0.7, 0.7, "token")


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "argument --threads: 0: at least 1"),
    (["--requests", "0"], "argument --requests: 0: at least 1"),
    (["--max-concurrency", "0"], "argument --max-concurrency: 0: at least 1"),
    (["--queue-timeout", "-1"], "argument --queue-timeout: -1.0: 0 or more"),
    (["--malformed", "1.5"], "argument --malformed: 1.5: a share, 0 to 1"),
    (["--malformed", "0.7", "--refused", "0.7"], "together more than every request"),
])
def test_load_settings_it_cannot_run_are_an_error(monkeypatch, tmp_path, capsys, argv,
                                                  message):
    """Before, --threads 0 stopped on ThreadPoolExecutor's ValueError with the server up,
    --max-concurrency 0 answered every valid request 503 after the queue timeout and exited
    0, and --requests 0 reported '0 requests' and exited 0, its invariants held by nothing."""
    monkeypatch.setattr(sys, "argv", ["load.py", *argv, "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit) as e:
        load_script.main()
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_the_load_tests_invariants_catch_what_they_guard():
    def answer(kind, status, digest=None, expect=200, retry_after=None):
        return Answer(Job(kind, "input 0", {}, {}, b"", expect), status, retry_after, digest, 1.0)

    healthy = {"status": "ok", "running": 0, "served": 1}
    assert violations([answer("valid", 200, "a"), answer("refused", 401, expect=401),
                       answer("valid", 503, retry_after="1")], 1, healthy) == []
    broken = violations([answer("valid", 200, "a"), answer("valid", 200, "b"),
                         answer("refused", 200, "a", expect=401), answer("valid", 500),
                         answer("valid", 503)], 4, {"status": "ok", "running": 1, "served": 2})
    assert broken == ["refused 'input 0': HTTP 200, expected 401",
                      "valid 'input 0': HTTP 500",
                      "valid 'input 0': HTTP 503 without Retry-After",
                      "valid 'input 0': 2 different answers",
                      "the model ran 4 times for 2 valid requests answered",
                      "afterwards /healthz reports 1 running and 2 served, expected 0 and 2"]
