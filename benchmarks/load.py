"""`python benchmarks/load.py`: does the cloud tier hold up under load, and let in only its own
edges? N requests from C client threads against `paser serve` (with a token) on loopback.

Most requests are what an edge sends (an image with the indices of its routed patches; a
few distinct inputs, each on one pool model, each sent many times); a share is malformed
(each fault with the 4xx it must get) and a share carries no token or a wrong one. The
invariants, each a line in ``violations`` (and exit status 1 when any fails):

- no 5xx but a 503 with ``Retry-After`` (the queue is full; the edge retries it);
- every malformed request gets its own 4xx, every request without the token a 401;
- identical inputs get identical answers (bit for bit);
- the model ran once per valid request answered, and never otherwise: nothing refused,
  by the token or by validation, reached it;
- the server is healthy afterwards (``/healthz`` ok, nothing running, served = answered).

The server runs in this process (uvicorn in a thread: its model calls are counted) and the
bodies are encoded before the clock starts. With no ``--run-dir``, an untrained stand-in at
the demo's shapes (battery-quick: 128 x 128 images, a 2 x 2 grid with halo 8, its f1 and
f2): latency does not depend on the weights. Latency is per request, at the client: p50 and
p99 of the valid requests answered, and of the refused ones. Results: printed, and written
to benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from paser.runtime import atomic_write_text
from paser.serve.codec import NPZ, decode_npz, encode_npz
from paser.serve.server import create_app

RESULTS = Path(__file__).parent / "results"
INPUTS = 4  # distinct valid inputs, each sent about (valid requests / INPUTS) times


@dataclass
class Job:
    """One request: ``kind`` valid, malformed or refused; ``name`` the input or the fault;
    ``expect`` the status it must get (a valid one may also get a 503 with Retry-After)."""

    kind: str
    name: str
    params: dict
    headers: dict
    body: bytes
    expect: int


@dataclass
class Answer:
    job: Job
    status: int
    retry_after: str | None
    digest: str | None  # SHA-256 of a 200's probabilities (dtype, shape and bytes)
    ms: float


def valid_inputs(model, size: tuple[int, int], token: str, seed: int) -> list[Job]:
    """``INPUTS`` edge requests: one random 8-bit image each with a random non-empty set of
    its patches (``index``), on f1, f2, ... in turn; answered with float32 probabilities."""
    rng = np.random.default_rng(seed)
    grid, channels = model.router.grid, model.config.models.in_channels
    pool = len(model.config.models.pool)
    jobs = []
    for i in range(INPUTS):
        image = rng.integers(0, 256, (1, channels, *size), dtype=np.uint8)
        index = np.flatnonzero(rng.random(grid.num_patches) < 0.5)
        index = index if index.size else np.array([0])
        jobs.append(Job("valid", f"input {i}", {"model": f"f{1 + i % pool}", "output": "probs"},
                        {"Authorization": f"Bearer {token}", "Content-Type": NPZ},
                        encode_npz(image=image, index=index), 200))
    return jobs


def malformed_inputs(model, token: str) -> list[Job]:
    """Faults an edge could send with the right token, each with the status it must get."""
    channels = model.config.models.in_channels
    auth = {"Authorization": f"Bearer {token}"}
    npz = {**auth, "Content-Type": NPZ}
    f1 = {"model": "f1"}
    return [
        Job("malformed", "not an npz", f1, npz, b"not an npz", 400),
        Job("malformed", "text/plain", f1, {**auth, "Content-Type": "text/plain"}, b"x", 415),
        Job("malformed", "unknown model", {"model": "f9"}, npz, b"x", 404),
        Job("malformed", "channels", f1, npz,
            encode_npz(patches=np.zeros((2, channels + 1, 24, 24), np.uint8)), 422),
        Job("malformed", "NaN", f1, npz,
            encode_npz(patches=np.full((1, channels, 24, 24), np.nan, np.float32)), 422),
        Job("malformed", "bad query", {"model": "f1", "output": "masks"}, npz, b"x", 422),
    ]


def refused_inputs(valid: list[Job], token: str) -> list[Job]:
    """Valid bodies that would be answered, but without the token or with a wrong one."""
    body, params = valid[0].body, valid[0].params
    return [Job("refused", name, params, {**headers, "Content-Type": NPZ}, body, 401)
            for name, headers in (
                ("no token", {}),
                ("wrong token", {"Authorization": f"Bearer {secrets.token_urlsafe(32)}"}),
                ("one more character", {"Authorization": f"Bearer {token}x"}),
                ("no scheme", {"Authorization": token}))]


def plan(model, size: tuple[int, int], requests: int, malformed: float, refused: float,
         token: str, seed: int = 0) -> list[Job]:
    """``requests`` jobs in a seeded order: shares ``malformed`` and ``refused``, the rest
    valid, each kind cycling through its inputs."""
    valid = valid_inputs(model, size, token, seed)
    pools = {"valid": valid, "malformed": malformed_inputs(model, token),
             "refused": refused_inputs(valid, token)}
    if not (0 <= malformed and 0 <= refused and malformed + refused <= 1):
        raise ValueError(f"shares malformed {malformed} and refused {refused}: each at least "
                         "0, together at most 1")
    counts = {"malformed": round(malformed * requests)}
    # each rounded, they could add up to more than all: 3 requests at 0.5 and 0.5, 2 and 2
    counts["refused"] = min(round(refused * requests), requests - counts["malformed"])
    counts["valid"] = requests - counts["malformed"] - counts["refused"]
    jobs = [pools[kind][i % len(pools[kind])] for kind, n in counts.items() for i in range(n)]
    order = np.random.default_rng(seed).permutation(len(jobs))
    return [jobs[i] for i in order]


@contextmanager
def serving(model, token: str, **limits):
    """:func:`create_app` on uvicorn in a thread, on a free loopback port; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(model, token=token, **limits), log_config=None,
                            log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:  # startup is a few milliseconds: nothing to wait on but this
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def fire(url: str, jobs: list[Job], threads: int, timeout: float = 120.0) -> list[Answer]:
    """Every job, from ``threads`` client threads (one HTTP client each), in order."""
    local = threading.local()

    def send(job: Job) -> Answer:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, timeout=timeout)
        start = time.perf_counter()
        res = local.http.post("/v1/segment", params=job.params, headers=job.headers,
                              content=job.body)
        ms = 1000 * (time.perf_counter() - start)
        digest = None
        if res.status_code == 200:
            probs = decode_npz(res.content, "probs", max_values=2 ** 28)
            digest = hashlib.sha256(f"{probs.dtype}{probs.shape}".encode()
                                    + probs.tobytes()).hexdigest()
        return Answer(job, res.status_code, res.headers.get("retry-after"), digest, ms)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(send, jobs))


def violations(answers: list[Answer], model_calls: int, health: dict | None) -> list[str]:
    """Each invariant the answers break, in words (empty: all hold)."""
    out = []
    for a in answers:
        if a.status >= 500 and not (a.status == 503 and a.retry_after):
            out.append(f"{a.job.kind} '{a.job.name}': HTTP {a.status}"
                       + (" without Retry-After" if a.status == 503 else ""))
        elif a.status != a.job.expect and not (a.job.kind == "valid" and a.status == 503):
            out.append(f"{a.job.kind} '{a.job.name}': HTTP {a.status}, expected {a.job.expect}")
    digests: dict[str, set] = {}
    for a in answers:
        if a.job.kind == "valid" and a.status == 200:
            digests.setdefault(a.job.name, set()).add(a.digest)
    out += [f"valid '{name}': {len(d)} different answers" for name, d in digests.items()
            if len(d) > 1]
    answered = sum(a.job.kind == "valid" and a.status == 200 for a in answers)
    if model_calls != answered:
        out.append(f"the model ran {model_calls} times for {answered} valid requests answered")
    if health is None or health.get("status") != "ok":
        out.append(f"unhealthy afterwards: /healthz {health}")
    elif health["running"] != 0 or health["served"] != answered:
        out.append(f"afterwards /healthz reports {health['running']} running and "
                   f"{health['served']} served, expected 0 and {answered}")
    return out


def percentiles(ms: list[float]) -> dict | None:
    if not ms:
        return None
    return {"n": len(ms), "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "max": max(ms)}


def load_test(model, size: tuple[int, int], requests: int = 400, threads: int = 8,
              malformed: float = 0.1, refused: float = 0.1, seed: int = 0, **limits) -> dict:
    """Run the load on ``model`` (a :class:`paser.PaSeR`) served with a fresh token and
    ``limits`` (:func:`create_app`); the figures, with ``violations`` (empty when every
    invariant holds)."""
    token = secrets.token_urlsafe(32)
    jobs = plan(model, size, requests, malformed, refused, token, seed)
    router, calls, lock = model.router, [0], threading.Lock()
    run_local = router.run_local

    def counted(k, x):
        with lock:
            calls[0] += 1
        return run_local(k, x)

    router.run_local = counted  # the instance attribute: what the server's path calls
    try:
        with serving(model, token, **limits) as url:
            start = time.perf_counter()
            answers = fire(url, jobs, threads)
            wall = time.perf_counter() - start
            try:
                health = httpx.get(f"{url}/healthz", timeout=10).json()
            except (httpx.HTTPError, ValueError):
                health = None
    finally:
        del router.run_local
    by_kind = {kind: [a for a in answers if a.job.kind == kind]
               for kind in ("valid", "malformed", "refused")}
    return {"requests": requests, "threads": threads,
            "kinds": {k: len(v) for k, v in by_kind.items()},
            "distinct_valid_inputs": INPUTS,
            "status": dict(sorted(Counter(str(a.status) for a in answers).items())),
            "model_calls": calls[0],
            "valid_answered": sum(a.status == 200 for a in by_kind["valid"]),
            "latency_ms": {
                "valid answered": percentiles([a.ms for a in by_kind["valid"]
                                               if a.status == 200]),
                "refused (401)": percentiles([a.ms for a in by_kind["refused"]]),
                "malformed": percentiles([a.ms for a in by_kind["malformed"]])},
            "wall_s": wall, "requests_per_s": requests / wall,
            "health_after": health, "limits": limits,
            "violations": violations(answers, calls[0], health)}


def stand_in(preset: str = "battery-quick"):
    """An untrained run at ``preset``'s shapes (seeded) and its image size; the run
    directory holds only a results.json with that size (the server reports it)."""
    from paser import PaSeR
    from paser.checkpoints import build_model, make_policy, model_roles
    from paser.config import load_config
    from paser.patches import PatchGrid
    from paser.routing import Router

    cfg = load_config(preset=preset)
    size = (cfg.data.synthetic.height, cfg.data.synthetic.width)
    torch.manual_seed(0)
    f0, *pool = [build_model(cfg, spec, initial=False) for _, spec in model_roles(cfg)]
    router = Router(f0, make_policy(cfg, 1 + len(pool)), pool, PatchGrid(*cfg.grid,
                    halo=cfg.halo), cfg.mc_samples, cfg.models.in_channels, cfg.mc_dropout,
                    cfg.uncertainty, cfg.stage2.state, cfg.models.num_classes).eval()
    run_dir = Path(tempfile.mkdtemp(prefix="paser-load-"))
    (run_dir / "results.json").write_text(json.dumps({"image_size": list(size)}))
    return PaSeR(router, cfg, run_dir), size


def count(text: str, least: int = 1) -> int:
    """An argparse type: a whole number of at least ``least``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value}: at least {least}")
    return value


def share(text: str) -> float:
    """An argparse type: a share of the requests, 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value}: a share, 0 to 1")
    return value


def seconds(text: str) -> float:
    """An argparse type: seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{value}: 0 or more")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="a trained run; default an untrained stand-in at the "
                    "battery-quick shapes")
    ap.add_argument("--requests", type=count, default=400)
    ap.add_argument("--threads", type=count, default=8)
    ap.add_argument("--malformed", type=share, default=0.1, help="share of malformed requests")
    ap.add_argument("--refused", type=share, default=0.1,
                    help="share of requests without the token or with a wrong one")
    ap.add_argument("--max-concurrency", type=count, default=1)
    ap.add_argument("--queue-timeout", type=seconds, default=30.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = ap.parse_args()
    if args.malformed + args.refused > 1:
        ap.error(f"--malformed {args.malformed} and --refused {args.refused}: together more "
                 "than every request")
    if args.run_dir:
        from paser import PaSeR
        from paser.serve.server import run_image_size

        model = PaSeR.load(args.run_dir, device="cpu", calibrated=False)
        size, run = run_image_size(model), args.run_dir
        if size is None:
            sys.exit(f"{args.run_dir}: no image size in its results.json; run it to the end")
    else:
        model, size = stand_in()
        run = "untrained stand-in, battery-quick shapes"
    figures = load_test(model, size, args.requests, args.threads, args.malformed,
                        args.refused, max_concurrency=args.max_concurrency,
                        queue_timeout=args.queue_timeout)
    if not args.run_dir:
        shutil.rmtree(model.run_dir)  # the stand-in's results.json
    result = {"machine": platform.platform(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "run": run,
              "image_size": list(size), "grid": [model.router.grid.rows, model.router.grid.cols],
              "halo": model.router.grid.halo, **figures}
    lat = figures["latency_ms"]["valid answered"]
    print(f"{figures['requests']} requests from {figures['threads']} threads in "
          f"{figures['wall_s']:.1f} s: {figures['kinds']}; status {figures['status']}; "
          f"model calls {figures['model_calls']} for {figures['valid_answered']} valid "
          f"answered")
    if lat:
        print(f"valid answered: p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms")
    for line in figures["violations"]:
        print(f"violated: {line}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=2), args.out)
    print(f"written to {args.out}")
    sys.exit(1 if figures["violations"] else 0)


if __name__ == "__main__":
    main()
