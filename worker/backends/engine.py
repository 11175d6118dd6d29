"""The HTTP engine under the remote backends, and what its failures are called.

``MODWORKER_HTTP__ENGINE=aiohttp`` (the default) posts through one ``aiohttp.ClientSession``
directly (``AiohttpClient``): the same requests, timeouts and pool bound as httpx's API,
without its request and response objects, URL merging, auth and redirect layers, which
cost as much CPU per request as aiohttp itself (a py-spy profile of the worker: per call of
64 texts ~0.7 ms under httpx over aiohttp, about half of it httpx's). That cost is per
batch, so it matters most for small batches. ``httpx`` keeps httpx's own engine, httpcore
(~4x the CPU per request; ``python worker/offline/bench/http_engine.py``). A test that hands
``RemoteApi`` an httpx transport gets an ``httpx.AsyncClient`` on it.

``AiohttpClient`` is a pool that holds ``max_connections``
connections kept alive ``keepalive_expiry_s``; TLS verifies with httpx's default context
(certifi, or ``SSL_CERT_FILE``); the proxy comes from the environment
(``HTTPS_PROXY`` ..., ``NO_PROXY``) as httpx's own engine takes it, looked up once when
the client starts (aiohttp's ``trust_env`` would redo it, and read ``~/.netrc``, on every
request: 0.7 ms of CPU each). ``.netrc`` credentials are not used: the API key is. The connect timeout bounds the TCP/TLS
connect, the pool timeout the wait for a free connection, the read timeout each read; the
write timeout has no aiohttp counterpart (a body is written within the read timeout's
first wait). Bodies are decompressed by aiohttp (gzip, deflate).

``failure_name(err)`` names a failed try the same way under either engine: the httpx
exception class (``ConnectError``, ``ReadTimeout``, ``RemoteProtocolError`` ...), found
through the aiohttp exception the transport wrapped when there is one (the transport maps
every connection-level aiohttp error to ``ConnectTimeout``, which would call a refused
connection a timeout). A name in ``TIMEOUTS`` was a timeout, for the request metric's
``timeout`` / ``transport_error`` label.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import aiohttp
import certifi
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

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


class Answer(Protocol):
    """What the remote backends read of an HTTP answer: ``httpx.Response`` has it, and so
    has ``AiohttpAnswer``."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content(self) -> bytes: ...
    @property
    def text(self) -> str: ...
    @property
    def reason_phrase(self) -> str: ...
    def json(self) -> Any: ...


class Poster(Protocol):
    """What ``RemoteApi`` needs of a client: ``httpx.AsyncClient`` has it, and so has
    ``AiohttpClient``."""

    async def post(self, url: str, *, content: bytes, headers: Mapping[str, str]) -> Answer: ...
    async def aclose(self) -> None: ...


class AiohttpAnswer:
    """An answer read whole: status, headers (case-insensitive), body."""

    __slots__ = ("_charset", "content", "headers", "reason_phrase", "status_code")

    def __init__(
        self, status: int, reason: str | None, headers: CIMultiDictProxy[str], body: bytes, charset: str | None
    ) -> None:
        self.status_code = status
        self.reason_phrase = reason or ""
        self.headers = headers
        self.content = body
        self._charset = charset

    @property
    def text(self) -> str:
        return self.content.decode(self._charset or "utf-8", errors="replace")

    def json(self) -> Any:
        """The body's JSON; raises ``ValueError`` when it is not JSON."""
        return orjson.loads(self.content)


class AiohttpClient:
    """POSTs to ``base_url`` + a path through one aiohttp session (made on first use, in
    the running loop), through the environment's proxy for it, if any."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        max_connections: int,
        keepalive_expiry_s: float,
        connect_timeout_s: float,
        read_timeout_s: float,
        pool_timeout_s: float,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = dict(headers)
        self._max_connections = max_connections
        self._keepalive_expiry_s = keepalive_expiry_s
        # As httpx-aiohttp maps httpx's timeouts: connect bounds the TCP/TLS connect, the
        # pool timeout aiohttp's "connect" (waiting for a pooled connection, and connecting).
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s, connect=pool_timeout_s
        )
        proxy = environment_proxy(self._base_url)
        self._proxy = proxy
        self._proxy_auth = None if proxy is None else aiohttp.BasicAuth.from_url(URL(proxy))
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, keepalive_timeout=self._keepalive_expiry_s, ssl=tls_context()
        )
        # trust_env=False: aiohttp would read the proxy variables and ~/.netrc again for every
        # request (~0.7 ms of CPU each, measured); the proxy is looked up once, in __init__.
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, timeout=self._timeout, trust_env=False
        )
        return self._session

    async def post(self, url: str, *, content: bytes, headers: Mapping[str, str]) -> AiohttpAnswer:
        """POST ``content`` to the base URL + ``url`` (a path); raises aiohttp's errors and
        ``TimeoutError`` (``failure_name`` names them as httpx would)."""
        session = self._session or self._open()
        async with session.post(
            self._base_url + url,
            data=content,
            headers=headers,
            allow_redirects=False,
            proxy=self._proxy,
            proxy_auth=self._proxy_auth,
        ) as response:
            body = await response.read()
            return AiohttpAnswer(response.status, response.reason, response.headers, body, response.charset)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def tls_context() -> ssl.SSLContext:
    """The context httpx's default verifies TLS with (``httpx.create_ssl_context()``):
    ``SSL_CERT_FILE``, else ``SSL_CERT_DIR``, else certifi's bundle. Written out so the
    default engine does not import httpx (~3 MB of resident memory with its imports)."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    return ssl.create_default_context(cafile=certifi.where())


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
