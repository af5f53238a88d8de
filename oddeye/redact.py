"""Credentials out of URLs, camera ids and messages before they reach logs, metric labels or Kafka keys.

Cameras and webhooks carry secrets in many places of a URL: the userinfo
(``rtsp://admin:pw@cam``), the query (``?password=x``, ``?user=u&pass=p``, ``?token=``,
``?auth=``) and, on many cameras, the path itself (``/user=admin_password=x_channel=1``).
Every value whose key looks like a secret is replaced by ``***`` wherever it appears;
usernames are kept, since they help to tell cameras apart and grant nothing alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["MASK", "redact_path", "redact_text", "redact_url", "url_origin"]

MASK = "***"

# A key naming a secret: the word may sit inside a longer key (api_key, X-Auth-Token, admin_password),
# so the key is matched from the secret word on; values end at the next separator.
_SECRET_WORD = r"(?:pass(?:word|wd|phrase)?|pwd|secret|token|api-?key|key|auth|sig(?:nature)?|credentials?)"
# key=value or key:value inside a path or query. Values stop at & ; / ? # whitespace, or at an
# underscore that starts the next ``name=`` (the separator of ``/user=admin_password=x_channel=1``).
_KEY_VALUE = re.compile(
    r"(?P<key>[A-Za-z0-9-]*" + _SECRET_WORD + r"[A-Za-z0-9-]*=)"
    r"(?P<value>(?:(?!_[A-Za-z][A-Za-z0-9]*=)[^&;/?#\s])*)",
    re.IGNORECASE,
)
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _mask_pairs(text: str) -> str:
    return _KEY_VALUE.sub(lambda m: m.group("key") + (MASK if m.group("value") else ""), text)


def redact_path(path: str) -> str:
    """A URL path (or a camera id made from one) with secret ``key=value`` pairs masked."""
    return _mask_pairs(path)


def redact_url(url: str) -> str:
    """The URL with its password and every secret-looking path or query value replaced by ``***``.

    ``rtsp://admin:pw@cam-1:554/user=admin_password=x_channel=1?token=y``
    → ``rtsp://admin:***@cam-1:554/user=admin_password=***_channel=1?token=***``. The fragment is dropped.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    if parts.username is not None or parts.password is not None:
        user = quote(parts.username or "", safe="")
        netloc = f"{user}:{MASK}@{netloc}" if parts.password is not None else f"{user}@{netloc}"
    return urlunsplit((parts.scheme, netloc, _mask_pairs(parts.path), _mask_pairs(parts.query), ""))


def url_origin(url: str) -> str:
    """Only the scheme, host and port of a URL (``https://hooks.example.com``): for URLs whose path is the secret."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return f"{parts.scheme}://{netloc}"


def redact_text(text: str, urls: Iterable[str] = ()) -> str:
    """A message (an exception's text, a decoder's log line) with URLs and secrets masked.

    The given ``urls`` are replaced by their redacted form, and so is their password wherever it
    appears on its own; any other URL in the text is redacted too, and so are bare ``password=...``
    pairs outside URLs.
    """
    for url in urls:
        text = text.replace(url, redact_url(url))
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            text = text.replace(password, MASK)
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)) if "://" in m.group(0) else m.group(0), text)
    return _mask_pairs(text)
