"""The engine under the remote backends' ``httpx.AsyncClient``, and what its failures are called.

``MODWORKER_HTTP__ENGINE=aiohttp`` (the default) puts aiohttp under the httpx API through
``httpx-aiohttp``'s transport (what the OpenAI SDK offers as its ``aiohttp`` extra): the
same requests, timeouts and pool bound, about half the CPU per request of httpx's own
engine, httpcore (``python worker/offline/bench/http_engine.py``: 0.8-0.9 ms against
1.8-1.9 ms per request of 64 texts on the bench machine). That cost is per batch, so it
matters most for small batches. ``httpx`` keeps httpcore.

``aiohttp_transport(http)`` builds the transport: the pool holds ``max_connections``
connections kept alive ``keepalive_expiry_s``; TLS verifies with httpx's default context
(certifi, or ``SSL_CERT_FILE``); the proxy comes from the environment
(``HTTPS_PROXY`` ..., ``NO_PROXY``) as httpx's own engine takes it, looked up once when
the client starts (aiohttp's ``trust_env`` would redo it, and read ``~/.netrc``, on every
request: 0.7 ms of CPU each). ``.netrc`` credentials are not used: the API key is. The connect timeout bounds the TCP/TLS
connect, the pool timeout the wait for a free connection, the read timeout each read; the
write timeout has no aiohttp counterpart (a body is written within the read timeout's
first wait).

``failure_name(err)`` names a failed try the same way under either engine: the httpx
exception class (``ConnectError``, ``ReadTimeout``, ``RemoteProtocolError`` ...), found
through the aiohttp exception the transport wrapped when there is one (the transport maps
every connection-level aiohttp error to ``ConnectTimeout``, which would call a refused
connection a timeout). A name in ``TIMEOUTS`` was a timeout, for the request metric's
``timeout`` / ``transport_error`` label.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from typing import Literal

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

Engine = Literal["aiohttp", "httpx"]

# aiohttp exception -> the httpx name for the same failure; the first match wins, so the
# more specific classes come first.
_NAMES: tuple[tuple[type[BaseException], str], ...] = (
    (aiohttp.ConnectionTimeoutError, "ConnectTimeout"),
    (aiohttp.ServerTimeoutError, "ReadTimeout"),
    (TimeoutError, "ReadTimeout"),
    (aiohttp.ClientConnectorError, "ConnectError"),
    (aiohttp.ServerDisconnectedError, "RemoteProtocolError"),
    (aiohttp.ClientPayloadError, "ReadError"),
    (aiohttp.ClientOSError, "ReadError"),
    (aiohttp.ClientError, "TransportError"),
)
TIMEOUTS = frozenset({"ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException"})


def aiohttp_transport(base_url: str, *, max_connections: int, keepalive_expiry_s: float) -> httpx.AsyncBaseTransport:
    """An httpx transport sending to ``base_url`` through one aiohttp session (made on first
    use, in the running loop), through the environment's proxy for it, if any."""
    ssl_context = httpx.create_ssl_context()

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=keepalive_expiry_s, ssl=ssl_context)
        # trust_env=False: aiohttp would read the proxy variables and ~/.netrc again for every
        # request (~0.7 ms of CPU each, measured); the proxy is looked up once, below.
        return aiohttp.ClientSession(connector=connector, trust_env=False)

    proxy = environment_proxy(base_url)
    return AiohttpTransport(client=session, proxy=None if proxy is None else httpx.Proxy(proxy))


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``,
    lower or upper case, minus ``NO_PROXY``), as httpx's own engine would take it; else None."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def failure_name(err: BaseException) -> str:
    """The httpx class name of a failed try's error, under either engine (see module doc)."""
    cause = err if isinstance(err, (aiohttp.ClientError, TimeoutError)) else err.__cause__
    if cause is not None:
        for kind, name in _NAMES:
            if isinstance(cause, kind):
                return name
    return type(err).__name__
