"""From `edgekit agent`'s options to a running agent: where the token comes from, TLS, and what is exposed.

The token never has to be on the command line (where every user of the board sees it in the process
list): `$EDGEKIT_AGENT_TOKEN` or `--token-file`, else a fresh one is printed once. The agent listens on
loopback unless `--host` opens it, and says so on stderr when it does.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from edgekit.errors import UsageError
from edgekit.runtimes.remote import TOKEN_ENV


def warn(message: str) -> None:
    print(f"edgekit agent: warning: {message}", file=sys.stderr, flush=True)


def agent_token(token: str | None, token_file: str | None) -> str:
    """The shared token from --token-file, --token or $EDGEKIT_AGENT_TOKEN (in that order), else a new one."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"{token_file}: cannot read the token file ({getattr(err, 'strerror', None) or err})"
                             ) from None
    elif token:
        warn(f"--token is visible to every user of this machine in the process list; use ${TOKEN_ENV} or "
             "--token-file")
    elif os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV]
    else:
        token = secrets.token_urlsafe(24)
        print(f"edgekit agent: token {token}  (clients: {TOKEN_ENV}={token})", file=sys.stderr, flush=True)
    if len(token) < 8:
        raise UsageError("the agent's token must have at least 8 characters")
    return token


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server TLS context from a certificate chain and its key (PEM), or None for plain HTTP."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise UsageError("--tls-cert and --tls-key go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"{cert}: cannot load the TLS certificate with key {key} "
                         f"({getattr(err, 'strerror', None) or err})") from None
    return context


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def serve(host: str, port: int, *, token: str | None = None, token_file: str | None = None,
          tls_cert: str | None = None, tls_key: str | None = None, **options: Any) -> None:
    """Run the agent until interrupted."""
    from edgekit.agent.server import Agent

    secret = agent_token(token, token_file)
    tls = tls_context(tls_cert, tls_key)
    if not is_loopback(host):
        warn(f"listening on {host}: anyone who can reach this address and holds the token can run models here"
             + ("" if tls else "; without --tls-cert the token and the models cross the network in clear"))
    try:
        agent = Agent((host, port), secret, tls=tls, **options)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    scheme = "https" if tls else "http"
    print(f"edgekit agent {agent.name} listening on {scheme}://{host}:{agent.server_address[1]} "
          f"({', '.join(lane.name for lane in agent.lanes.values())} lanes, {agent.max_bytes / 1e6:g} MB per request, "
          f"{agent.max_connections} connections)", file=sys.stderr, flush=True)
    def stop(signum: int, frame: Any) -> None:  # a service manager's SIGTERM: the workers go with the agent
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        agent.serve_forever()
    finally:
        agent.server_close()
