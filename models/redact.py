"""Credentials out of URLs before a URL is logged, stored or shown.

A server's ``base_url`` may carry a key: user-info (``https://user:key@host/v1``) or a query
parameter (``?api-key=...``, Azure-style). `redact_url` replaces both with ``***`` and leaves the
rest (scheme, host, port, path, other parameters) as it was, so a redacted URL still says which
server it was; a URL without credentials comes back unchanged. `redact_urls` does the same to every
URL inside a longer text (an error message), and to credential parameters of a bare path
(``/v1/?api-key=...``).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query parameters that carry a credential: api-key, api_key, x-api-key, subscription-key, key,
# token, access_token, secret, password, sig (signed URLs), auth, code ...; "max_tokens",
# "keyword" or "api-version" are ordinary settings.
_SECRET_PARAM = re.compile(
    r"^(?:(?:x|access|refresh|auth|client|session|id|bearer|private|subscription|ocp-apim-subscription)[-_]?)?"
    r"(?:api[-_]?key|key|token|secret|password|passwd|pwd|sig|signature|auth|authorization|credential|code)s?$",
    re.IGNORECASE,
)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
# a credential parameter in a bare path or query ("no route /v1/?api-key=..."), URL or not
_PARAM_IN_TEXT = re.compile(r"(?<=[?&])([\w.-]+)=([^&\s'\"<>#]+)")


def redact_url(url: str) -> str:
    """``url`` with its user-info and credential-like query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL (an unmatched '['): nothing can be told apart
        return MASK if "@" in url or "?" in url else url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.match(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_PARAM.match(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls(text: str) -> str:
    """Every URL in ``text`` redacted (`redact_url`); the rest of the text as it was."""
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return _PARAM_IN_TEXT.sub(lambda m: f"{m.group(1)}={MASK}" if _SECRET_PARAM.match(m.group(1)) else m.group(0), text)
