"""The edge/cloud split: ``paser serve`` (the pool models over HTTP) and the edge's
:class:`RemotePool` (``paser segment --remote``). Needs the ``serve`` extra
(``pip install 'paser[serve]'``: FastAPI, uvicorn, httpx)."""

from __future__ import annotations

import os
from pathlib import Path

from paser.errors import PaserError

#: where ``paser serve`` and ``paser segment --remote`` find the token without --token-file
TOKEN_ENV = "PASER_TOKEN"


def require_serve_extra() -> None:
    """Check that the ``serve`` extra is installed, or say how to install it."""
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise PaserError(f"the edge/cloud split needs FastAPI, uvicorn and httpx ({err}); "
                         "pip install 'paser[serve]'") from None


def read_token(token_file: str | Path | None) -> str | None:
    """The secret the server and its edges share: the contents of ``token_file`` (surrounding
    whitespace dropped), else the ``PASER_TOKEN`` environment variable, else ``None`` (no
    token). A missing, unreadable or empty file, or a set but empty variable, is an error:
    either would otherwise leave the server open without a word."""
    if token_file is None:
        token = os.environ.get(TOKEN_ENV)
        if token is None:
            return None
        where = TOKEN_ENV
    else:
        where = f"token file {token_file}"
        try:
            token = Path(token_file).read_text()
        except FileNotFoundError:
            raise PaserError(f"{where} does not exist; write the shared token into it, e.g. "
                             "python -c \"import secrets; print(secrets.token_urlsafe(32))\" "
                             f"> {token_file}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise PaserError(f"{where}: cannot read it ({err})") from None
    token = token.strip()
    if not token:
        raise PaserError(f"{where} is empty; it must hold the shared token")
    if not all(33 <= ord(c) < 127 for c in token):
        raise PaserError(f"{where} holds a token with spaces or characters other than "
                         "printable ASCII; it travels in an HTTP header, so use e.g. "
                         "secrets.token_urlsafe(32)")
    return token
