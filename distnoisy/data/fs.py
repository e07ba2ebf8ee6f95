"""Local paths and fsspec URLs behind one small set of functions.

A *location* is a local path or a URL ``scheme://...``: ``s3://``, ``gs://``, ``http(s)://``,
``file://`` or any other protocol fsspec knows. Local paths go through :mod:`pathlib` and
``open`` exactly as before (no fsspec on that path); URLs go through fsspec, which needs the
protocol's backend package (``s3fs``, ``gcsfs``, ...).

Errors say what to do in one line: a missing backend is a :class:`ConfigError` naming the
package to install; a URL that cannot be reached is a :class:`DataError` naming the URL and the
reason. A missing file is a ``FileNotFoundError`` for local paths and URLs alike, so callers
can say what they expected there.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from distnoisy.core.errors import ConfigError, DataError, DistnoisyError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Optional extras of distnoisy (pyproject.toml) that install a backend.
_EXTRAS = {"s3fs": "s3", "gcsfs": "gcs"}
# http(s): read a shard with one streaming GET (block_size=0). fsspec's default random-access
# HTTP file fetches blocks with Range requests, which plain web servers do not all support, and
# a tar stream is read front to back anyway. Object stores keep their defaults (readahead).
_OPEN_OPTIONS: dict[str, dict[str, Any]] = {"http": {"block_size": 0}, "https": {"block_size": 0}}
# Every read() of an fsspec file is a call into its backend (over HTTP a hop to fsspec's
# event-loop thread) and tarfile reads 10 KB at a time: a 1 MB buffer in front took HTTP
# shard reading on loopback from 65 to 730 MB/s.
_READ_BUFFER = 1 << 20


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return bool(_URL.match(str(location)))


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def join(location: str | os.PathLike[str], *names: str) -> str:
    """``location/name/...``; URLs are joined with ``/`` whatever the local OS."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *names])
    return str(Path(location).joinpath(*names))


def basename(location: str | os.PathLike[str]) -> str:
    """The last component of a path or URL (``train-000000.tar``)."""
    if is_url(location):
        return str(location).rstrip("/").rsplit("/", 1)[-1]
    return Path(location).name


def parent(location: str | os.PathLike[str]) -> str:
    """The directory holding ``location``."""
    if is_url(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


def split_list(text: str) -> list[str]:
    """Split ``text`` at the commas outside braces (``a.tar,b-{0,1}.tar`` -> 2 items)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def expand(text: str) -> list[str]:
    """The locations named by a comma-separated list of brace patterns, in order.

    ``s3://b/train-{000000..000002}.tar`` names three shards (webdataset's notation, expanded by
    ``braceexpand``); ``a.tar,b.tar`` two.

    Raises
    ------
    ConfigError
        Unbalanced braces.
    """
    from braceexpand import braceexpand

    try:
        return [x for part in split_list(text) for x in braceexpand(part)]
    except ValueError as exc:  # braceexpand.UnbalancedBracesError
        raise ConfigError(f"{text}: {exc}") from None


def _install_hint(protocol: str, exc: ImportError) -> str:
    from fsspec.registry import known_implementations

    # fsspec re-raises the ModuleNotFoundError of the backend's import with its own message.
    package = getattr(exc.__cause__, "name", None) or exc.name
    if not package:
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
    extra = _EXTRAS.get(package)
    how = f"pip install 'distnoisy[{extra}]'" if extra else f"pip install {package}"
    return f"needs the {package} package: {how}"


def check_backend(location: str | os.PathLike[str], key: str) -> None:
    """Fail early when ``location`` is a URL whose fsspec backend is not installed.

    Raises
    ------
    ConfigError
        ``"{key}=s3://... needs the s3fs package: pip install 'distnoisy[s3]'"``, or an unknown
        protocol.
    """
    if is_url(location):
        _backend(str(location), f"{key}={location}")


def _backend(url: str, what: str) -> type:
    import fsspec

    protocol = _protocol(url)
    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise ConfigError(f"{what} {_install_hint(protocol, exc)}") from None
    except ValueError:
        raise ConfigError(
            f"{what}: {protocol}:// is not a protocol fsspec knows (s3, gs, http, https, file, ...)"
        ) from None


def _filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` (cached by fsspec) and the path within it."""
    import fsspec

    _backend(url, url)
    return fsspec.core.url_to_fs(url)


def describe(exc: BaseException) -> str:
    """One line: the exception's type and first message line (its cause's when more telling)."""
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and cause is not None:
        exc = cause  # fsspec's HTTP backend hides connection errors behind FileNotFoundError
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _unreachable(exc: FileNotFoundError) -> bool:
    # fsspec's HTTP backend reports any failed HEAD/GET as FileNotFoundError; its cause tells a
    # connection failure (an OSError: refused, reset, timeout) or an HTTP error other than
    # "not found" from a missing file.
    cause = exc.__cause__
    status = getattr(cause, "status", None)
    return isinstance(cause, OSError) or (status is not None and status not in (404, 410))


@contextlib.contextmanager
def _reaching(url: str) -> Iterator[None]:
    """Missing -> ``FileNotFoundError(ENOENT, url)``; any other failure -> one-line DataError."""
    try:
        yield
    except DistnoisyError:
        raise
    except FileNotFoundError as exc:
        if _unreachable(exc):
            raise DataError(f"cannot read {url}: {describe(exc)}") from exc
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), url) from None
    except Exception as exc:  # backends raise their own types (aiohttp, botocore, ...)
        raise DataError(f"cannot read {url}: {describe(exc)}") from exc


def open_binary(location: str | os.PathLike[str]) -> BinaryIO:
    """Open ``location`` for sequential binary reading (close it when done).

    Raises
    ------
    FileNotFoundError
        Nothing there.
    DataError
        A URL that cannot be reached (or read).
    ConfigError
        The URL's fsspec backend is not installed.
    """
    if not is_url(location):
        return open(location, "rb")
    url = str(location)
    if _protocol(url) in ("http", "https"):
        # A timeout on every read and bounded retries from where a read stopped
        # (distnoisy.data.remote); what still fails is bad data of the shard.
        from distnoisy.data.remote import RetryingHTTPReader

        reader = RetryingHTTPReader(url)
        try:
            reader.open()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), url) from None
        except OSError as exc:
            raise DataError(f"cannot read {url}: {describe(exc)}") from exc
        return io.BufferedReader(reader, buffer_size=_READ_BUFFER)
    with _reaching(url):
        filesystem, path = _filesystem(url)
        file = filesystem.open(path, "rb", **_OPEN_OPTIONS.get(_protocol(url), {}))
    return io.BufferedReader(file, buffer_size=_READ_BUFFER)


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    """The whole content of a (small) file: a manifest, a label table.

    Raises
    ------
    FileNotFoundError, DataError, ConfigError
        As :func:`open_binary`.
    """
    if not is_url(location):
        return Path(location).read_bytes()
    url = str(location)
    with _reaching(url):
        filesystem, path = _filesystem(url)
        return filesystem.cat_file(path)


def is_file(location: str | os.PathLike[str]) -> bool:
    """Whether a file exists at ``location``.

    Raises
    ------
    DataError, ConfigError
        A URL that cannot be reached; a missing backend.
    """
    if not is_url(location):
        return Path(location).is_file()
    url = str(location)
    try:
        with _reaching(url):
            filesystem, path = _filesystem(url)
            return filesystem.info(path).get("type") == "file"
    except FileNotFoundError:
        return False


def list_names(location: str | os.PathLike[str]) -> set[str]:
    """Names of the entries of a directory, with one listing request for a URL.

    Over HTTP this parses the server's index page: servers that do not list directories give
    an error or an empty set.

    Raises
    ------
    FileNotFoundError, DataError, ConfigError
        As :func:`open_binary`.
    """
    if not is_url(location):
        return {p.name for p in Path(location).iterdir()}
    url = str(location)
    with _reaching(url):
        filesystem, path = _filesystem(url)
        return {basename(p) for p in filesystem.ls(path, detail=False)}
