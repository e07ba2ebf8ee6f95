"""Is the tracking server there? Asked once before a run starts, answered in seconds.

MLflow's own HTTP client retries a refused connection 7 times with exponential backoff
(about four minutes) before it raises; a run started against a server that is not up would
print a urllib3 ``Retrying`` line each time and then a traceback. :func:`check_server` asks
the server's ``/health`` once, with a short timeout, before the run directory exists, so a
missing server is one line naming the URI and the fix.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

from distnoisy.core.errors import ConfigError

#: Seconds the start-up check waits for the server to answer.
CHECK_TIMEOUT_S = 5.0


class TrackingUnreachable(ConfigError):
    """The tracking server named by ``tracking.uri`` does not answer."""


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names a tracking server over HTTP(S) (not a local SQLite or file store)."""
    return urllib.parse.urlsplit(uri).scheme in ("http", "https")


def server_answers(uri: str, timeout: float = CHECK_TIMEOUT_S) -> str | None:
    """None when the server at ``uri`` answers HTTP (any status: a proxy in front of it may
    not serve ``/health``), else why not (``connection refused``, ``timed out``, ...)."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except urllib.error.URLError as e:
        reason = e.reason
        return getattr(reason, "strerror", None) or str(reason)
    except (OSError, ValueError) as e:  # a timeout while reading, a malformed URL
        return getattr(e, "strerror", None) or str(e) or type(e).__name__


def check_server(uri: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise :class:`TrackingUnreachable` when ``uri`` is an HTTP(S) tracking server that does
    not answer within ``timeout`` seconds (a local store needs no check).

    Raises
    ------
    TrackingUnreachable
        Naming the URI, why it failed and the two ways on: start the server, or run untracked.
    """
    if not is_remote(uri):
        return
    why = server_answers(uri, timeout)
    if why is None:
        return
    parts = urllib.parse.urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    raise TrackingUnreachable(
        f"the MLflow tracking server tracking.uri={uri} does not answer ({why.lower()}); start it "
        f"(e.g. mlflow server --host {parts.hostname} --port {port}) or run without tracking: "
        "tracking.enabled=false"
    )
