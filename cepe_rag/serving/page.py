"""The chat page at `/`: one static HTML file, static/chat.html, with its CSS and JavaScript inline and nothing
fetched from another host, that talks to the app's own /v1 routes (docs/serving.md, "The chat page").

The page itself needs no API key (the Gate only guards /v1/ paths); when the server has one, the key is typed into
the page and sent only in the Authorization header. The Content-Security-Policy allows exactly the page's own script
and style (by hash) and connections to this server, so the page can neither load nor send anything elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse


def chat_page_html() -> str:
    return resources.files("cepe_rag.serving").joinpath("static", "chat.html").read_text(encoding="utf-8")


def content_security_policy(html: str) -> str:
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_chat_page(app: FastAPI) -> None:
    """GET / answers the chat page (read once, here)."""
    html = chat_page_html()
    headers = {"Content-Security-Policy": content_security_policy(html), "Referrer-Policy": "no-referrer",
               "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)
