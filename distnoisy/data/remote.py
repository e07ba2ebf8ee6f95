"""Shards over HTTP(S) that stall or fail part way: a timeout on every read, retries with
backoff from where the read stopped, then bad data of that shard.

A long epoch streams each shard with one GET. A server that stops sending (a stalled read), a
reset connection, or an overloaded server's 5xx answer must neither hang the run nor lose the
shard to one blip. :class:`RetryingHTTPReader` gives every socket read
:func:`read_timeout_s` seconds; a read that fails is retried up to :func:`read_retries` times,
after ``0.5, 1, 2, ...`` seconds, by a new GET that asks for the rest of the file (a ``Range``
request; a server that ignores ``Range`` sends it all and the bytes already read are skipped).
Each retry is one log line (``remote shard ...: retry k/n``). When the tries are used up the
read raises :class:`RemoteReadError`; the stream records the shard as unreadable and the
samples it did not deliver as lost, which ``data.max_bad_fraction`` counts like any other bad
data.

The tries are counted per shard, not per read: only a failure after at least
:data:`PROGRESS_BYTES` more of the shard arrived since the previous failure starts the count
again (a long stream that meets a blip now and then goes on). A server that sends a little after
every new GET and then stalls again would otherwise hold the read for as many timeouts as it
has bytes to trickle.

The bounds come from the environment, so they reach every worker process:
``DISTNOISY_READ_TIMEOUT_S`` (default 30) and ``DISTNOISY_READ_RETRIES`` (default 4). A shard
that keeps failing without progress therefore costs at most ``(retries + 1) * timeout + 0.5 *
(2**retries - 1)`` seconds (157.5 s with the defaults; a server that answers 503 at once:
7.5 s).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import io
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable

log = logging.getLogger("distnoisy.data")

#: First backoff in seconds; it doubles with every retry.
BACKOFF_S = 0.5
#: Bytes that must arrive between two failed reads for the second to start the tries afresh.
PROGRESS_BYTES = 1 << 20
#: HTTP answers worth another try (the server is busy or its proxy timed out).
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def read_timeout_s() -> float:
    """Seconds one socket read of a shard may wait (``DISTNOISY_READ_TIMEOUT_S``, default 30)."""
    return float(os.environ.get("DISTNOISY_READ_TIMEOUT_S", "30"))


def read_retries() -> int:
    """Retries of a failed shard read (``DISTNOISY_READ_RETRIES``, default 4)."""
    return int(os.environ.get("DISTNOISY_READ_RETRIES", "4"))


class RemoteReadError(OSError):
    """A shard read that failed on every try (the stream records the shard as unreadable)."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in RETRY_STATUS
    return isinstance(exc, OSError | http.client.HTTPException)


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'timed out'}"


class RetryingHTTPReader(io.RawIOBase):
    """A shard at an ``http(s)://`` URL, read front to back with a timeout on every read and
    bounded retries that continue where the failed read stopped (see the module docstring).

    Raises
    ------
    FileNotFoundError
        The server says the shard is not there (404, 410): not retried.
    RemoteReadError
        A read failed on every try.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.name = url.rstrip("/").rsplit("/", 1)[-1]
        self.timeout, self.retries = read_timeout_s(), read_retries()
        self.pos = 0
        self.size: int | None = None
        self._response: http.client.HTTPResponse | None = None
        self.retried = 0
        # failed tries since the last failure that followed PROGRESS_BYTES of progress, and
        # the position of the last failure
        self._failures, self._failed_at = 0, 0

    def readable(self) -> bool:
        return True

    def _open(self) -> http.client.HTTPResponse:
        """A response that sends the file from byte ``self.pos`` on."""
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        request = urllib.request.Request(self.url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):
                raise FileNotFoundError(errno.ENOENT, f"{self.url}: HTTP {e.code}") from None
            if e.code == 416 and self.size is not None and self.pos >= self.size:
                return None  # type: ignore[return-value]  # nothing left to read
            raise
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != self.pos:
                response.close()
                raise http.client.HTTPException(f"unexpected Content-Range for byte {self.pos}")
            if match.group(2) != "*":
                self.size = int(match.group(2))
        else:  # the whole file: skip what was read before
            if self.size is None and response.headers.get("Content-Length"):
                self.size = int(response.headers["Content-Length"])
            left = self.pos
            while left:
                chunk = response.read(min(left, 1 << 20))
                if not chunk:
                    raise http.client.IncompleteRead(b"", left)
                left -= len(chunk)
        return response

    def open(self) -> RetryingHTTPReader:
        """Send the GET now (with the retries), so a missing shard is found when it is opened."""
        self._retrying(lambda: 0)
        return self

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.size is not None and self.pos >= self.size:
            return 0

        def read() -> int:
            assert self._response is not None
            # read1: what one receive brings, so a read that stalls later keeps the bytes
            # before it (a retry continues after them)
            data = self._response.read1(len(buffer))
            n = len(data)
            buffer[:n] = data
            if n == 0 and len(buffer) and self.size is not None and self.pos < self.size:
                # http.client ends a body cut short by the server as if it were complete
                raise http.client.IncompleteRead(b"", self.size - self.pos)
            self.pos += n
            return n

        return self._retrying(read)

    def _retrying(self, action: Callable[[], int]) -> int:
        """``action()`` on an open response, reopened and retried after a failure."""
        while True:
            try:
                if self._response is None:
                    self._response = self._open()
                    if self._response is None:
                        return 0
                return action()
            except FileNotFoundError:
                raise
            except Exception as exc:
                self._close_response()
                if not _retryable(exc):
                    raise RemoteReadError(f"{self.url}: {_why(exc)}") from None
                self._backoff(exc)

    def _backoff(self, exc: Exception) -> None:
        """Count the failed try (see the module docstring), then wait; raises when the tries
        are used up."""
        if self.pos - self._failed_at >= PROGRESS_BYTES:
            self._failures = 0
        self._failed_at = self.pos
        if self._failures == self.retries:
            raise RemoteReadError(
                f"{self.retries + 1} tries failed at byte {self.pos}; last: {_why(exc)}"
            ) from None
        wait = BACKOFF_S * 2**self._failures
        self._failures += 1
        self.retried += 1
        log.info(
            "remote shard %s: read failed at byte %d (%s); retry %d/%d in %.1f s",
            self.name,
            self.pos,
            _why(exc),
            self._failures,
            self.retries,
            wait,
        )
        time.sleep(wait)

    def _close_response(self) -> None:
        if self._response is not None:
            # A broken connection may fail to close; it is dropped either way.
            with contextlib.suppress(Exception):
                self._response.close()
            self._response = None

    def close(self) -> None:
        self._close_response()
        super().close()
