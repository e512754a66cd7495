"""Secrets out of what is printed: every URL that goes into a log line, health or an alert passes through
``redact_url`` first.

A camera's ``rtsp://admin:pass@10.0.0.7/stream``, an access point behind a proxy with basic auth, a
PostgreSQL URI with its password: the user name is kept (it says which account is configured), the
password becomes ``***``, and so does the value of any query parameter whose name says it holds a secret
(some cameras take ``?password=`` or ``?token=`` instead of the userinfo). Anything that does not parse
as a URL with a scheme (a device path, a file) is returned as it is.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_SECRET_PARAM = re.compile(r"(?i)(pass|pwd|secret|token|key|auth|sig|credential)")


def redact_url(url: object) -> str:
    text = str(url)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError on a malformed port, like any broken netloc
    except ValueError:
        return _redact_unparsed(text)
    if not parts.scheme or not parts.netloc:
        return text
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}{':' + MASK if sep else ''}@{hostport}"
    query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_param(param: str) -> str:
    name, sep, _value = param.partition("=")
    return f"{name}={MASK}" if sep and _SECRET_PARAM.search(name) else param


def _redact_unparsed(text: str) -> str:
    """A string urlsplit refuses (e.g. a password with a bare '[' in it): mask everything between the
    scheme and the last '@', where a password would be."""
    scheme, sep, rest = text.partition("://")
    if not sep or "@" not in rest:
        return text
    return f"{scheme}://{MASK}@{rest.rpartition('@')[2]}"
