"""Who may use the service: a bearer token on every route but /health, and where it may listen.

The token comes from ``--token-file FILE`` or the ``DISTFD_TOKEN`` environment variable (never from
the command line, where other users of the machine could read it). Binding an address other than
loopback without a token is refused unless the operator says ``--insecure-no-auth``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

TOKEN_ENV = "DISTFD_TOKEN"
MIN_TOKEN_CHARS = 16


def load_token(token_file: Path | None) -> str | None:
    """The token from ``token_file``, else from ``$DISTFD_TOKEN``, else None; ValueError if unusable."""
    if token_file is not None:
        try:
            mode = token_file.stat().st_mode
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --token-file {token_file}: {e}") from e
        if mode & 0o044:
            raise ValueError(
                f"--token-file {token_file} can be read by other users of this machine; make it "
                f"private: chmod 600 {token_file}"
            )
        where = f"--token-file {token_file}"
    elif os.environ.get(TOKEN_ENV):
        token, where = os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
        raise ValueError(
            f"the token in {where} must be at least {MIN_TOKEN_CHARS} printable ASCII characters without "
            "spaces (an HTTP header carries nothing else); make one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or 'localhost'); a name is not resolved."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """A non-loopback ``--host`` needs a token, or ``--insecure-no-auth``."""
    if token is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"--host {host} is reachable from other machines and no token is set; give --token-file "
            f"FILE (or ${TOKEN_ENV}) so that clients must send 'Authorization: Bearer <token>', or "
            "--insecure-no-auth to serve without one."
        )


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant-time comparison)."""
    if token is None:
        return True
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("latin-1", "replace"), token.encode())


__all__ = ["TOKEN_ENV", "authorized", "check_exposure", "is_loopback", "load_token"]
