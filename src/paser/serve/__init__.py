"""The edge/cloud split: ``paser serve`` (the pool models over HTTP) and the edge's
:class:`RemotePool` (``paser segment --remote``). Needs the ``serve`` extra
(``pip install 'paser[serve]'``: FastAPI, uvicorn, httpx)."""

from paser.errors import PaserError


def require_serve_extra() -> None:
    """Check that the ``serve`` extra is installed, or say how to install it."""
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise PaserError(f"the edge/cloud split needs FastAPI, uvicorn and httpx ({err}); "
                         "pip install 'paser[serve]'") from None
