"""Credentials never leave the process: every URL that bnnctl prints, renders or logs goes through
:func:`mask_url` (one URL) or :func:`mask_text` (a message that may contain URLs)."""
from __future__ import annotations

import re

#: ``scheme://user:password@host`` -> the password part (any scheme: postgresql+psycopg, http, s3, ...)
_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*:)(?P<secret>[^\s@'\"]+)(?P<at>@)")
MASK = "***"
#: a query parameter that carries a credential (signed URLs: ``X-Amz-Signature=``, ``sig=``, ``token=``)
_SECRET_QUERY = re.compile(r"(?P<head>[?&][^=&#\s]*(?:token|secret|signature|sig|password|credential)[^=&#\s]*=)"
                           r"(?P<secret>[^&#\s'\"]+)", re.IGNORECASE)


def mask_url(url: str | None) -> str | None:
    """``url`` with its password replaced by ``***`` (unchanged when it has none)."""
    return None if url is None else mask_text(url)


def mask_text(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` with the password masked, and every query
    value that carries a credential (``?X-Amz-Signature=...``, ``&token=...``)."""
    text = _CREDENTIALS.sub(lambda m: f"{m['head']}{MASK}{m['at']}", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['head']}{MASK}", text)
