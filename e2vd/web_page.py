"""The browser page of `e2vd web`: one self-contained HTML file (e2vd/web_page.html, with its CSS
and JS inline: no CDN, no external URL, so it works on an offline machine) and the headers it is
served with.

The Content-Security-Policy allows exactly the page's own inline <style> and <script> blocks (by
their SHA-256), requests to its own origin, and blob: URLs for the audio preview and the .npy
download; nothing else loads, and no other site may frame it.
"""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

PAGE_FILE = "web_page.html"
_BLOCK = re.compile(r"<(script|style)>(.*?)</\1>", re.S)


@dataclass(frozen=True)
class Page:
    """The page's bytes and the headers of every answer that carries it."""

    body: bytes
    headers: dict[str, str]


def _hashes(html: str, tag: str) -> str:
    """CSP source expressions ('sha256-...') of the inline `tag` blocks of `html`."""
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"
                    for kind, text in _BLOCK.findall(html) if kind == tag)


def content_security_policy(html: str) -> str:
    """The CSP of `html`: its own inline script and style blocks, same-origin requests, blob:
    media and downloads, no plugins, no framing, no form posts elsewhere."""
    return ("default-src 'none'; "
            f"script-src {_hashes(html, 'script')}; style-src {_hashes(html, 'style')}; "
            "connect-src 'self'; media-src blob:; img-src data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@lru_cache(maxsize=1)
def page() -> Page:
    """The page (read once from the package)."""
    html = resources.files("e2vd").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    return Page(html.encode("utf-8"), {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": content_security_policy(html),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
        "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
    })
