"""A small web-search server on 127.0.0.1 speaking SearXNG's JSON API and the Brave Search API shape.

It indexes a folder of HTML pages (the "web" corpus), answers searches by counting query words in
each page, and serves the pages themselves so fetch-and-clean runs for real. The first path segment
picks how it behaves, so one server covers every failure a provider can show:

    /search                 SearXNG JSON: {"results": [{"url", "title", "content"}]}
    /slow/search            sleeps past any sensible timeout
    /error/search           HTTP 500
    /garbage/search         200 with a body that is not JSON
    /wrongshape/search      200 with JSON that has no results list
    /res/v1/web/search      Brave: needs X-Subscription-Token, answers {"web": {"results": [{"url", "title", "description"}]}}
    /pages/<name>.html      the pages

Run it alone with `python tests/crag/searx_server.py FOLDER [PORT]`.
"""

from __future__ import annotations

import html
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an and are as at be by for from how in is it of on or the to what which with does do".split())
BRAVE_TOKEN = "test-brave-token"


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def _text_of(page_html: str) -> str:
    body = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", page_html, flags=re.S | re.I)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))).strip()


class Page:
    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.html = source
        match = re.search(r"<title>(.*?)</title>", source, re.S | re.I)
        self.title = html.unescape(match.group(1).strip()) if match else name
        self.text = _text_of(source)
        self.words = _words(self.text)


class SearchServer:
    """Serves `pages` (name -> HTML) and searches them; use as a context manager."""

    def __init__(self, pages: dict[str, str], port: int = 0, slow_s: float = 5.0, results: int = 5) -> None:
        self.pages = {name: Page(name, source) for name, source in pages.items()}
        self.slow_s = slow_s
        self.results = results
        self.extra_results: list[dict[str, str]] = []  # appended to every /search answer, e.g. results with odd URLs
        self.queries: list[str] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @classmethod
    def from_folder(cls, folder: Path, **kwargs: object) -> SearchServer:
        pages = {p.stem: p.read_text(encoding="utf-8") for p in sorted(Path(folder).glob("*.html"))}
        return cls(pages, **kwargs)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> SearchServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def search(self, query: str) -> list[Page]:
        terms = _words(query.replace('"', " "))
        scored = []
        for page in self.pages.values():
            hits = len(terms & page.words) + len(terms & _words(page.title))
            if hits:
                scored.append((hits, page.name, page))
        scored.sort(key=lambda t: (-t[0], t[1]))
        return [page for _, _, page in scored[: self.results]]

    def snippet(self, page: Page, query: str) -> str:
        terms = _words(query)
        for sentence in re.split(r"(?<=[.!?])\s+", page.text):
            if terms & _words(sentence):
                return sentence[:240]
        return page.text[:240]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, data: object) -> None:
                self._send(200, json.dumps(data).encode(), "application/json")

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                parsed = urlparse(self.path)
                query = parse_qs(parsed.query).get("q", [""])[0]
                path = parsed.path
                if path.startswith("/pages/"):
                    page = server.pages.get(path.removeprefix("/pages/").removesuffix(".html"))
                    if page is None:
                        self._send(404, b"not found", "text/plain")
                    else:
                        self._send(200, page.html.encode(), "text/html; charset=utf-8")
                    return
                if path.endswith("/search"):
                    server.queries.append(query)
                mode = path.removesuffix("/search").strip("/")
                if path == "/search":
                    if parse_qs(parsed.query).get("format", [""])[0] != "json":
                        self._send(403, b"format must be json", "text/plain")
                        return
                    self._json({"query": query, "results": [
                        {"url": f"{server.url}/pages/{p.name}.html", "title": p.title, "content": server.snippet(p, query), "engine": "loopback"}
                        for p in server.search(query)
                    ] + server.extra_results})
                elif mode == "slow":
                    time.sleep(server.slow_s)
                    self._json({"results": []})
                elif mode == "error":
                    self._send(500, b"<html>upstream engines failed</html>", "text/html")
                elif mode == "garbage":
                    self._send(200, b"\x89PNG not json at all {", "application/json")
                elif mode == "wrongshape":
                    self._json({"answers": ["42"], "results": "none"})
                elif path == "/res/v1/web/search":
                    if self.headers.get("X-Subscription-Token") != BRAVE_TOKEN:
                        self._send(401, b'{"error": "invalid token"}', "application/json")
                        return
                    self._json({"type": "search", "web": {"type": "search", "results": [
                        {"url": f"{server.url}/pages/{p.name}.html", "title": p.title, "description": f"<strong>{server.snippet(p, query)}</strong>"}
                        for p in server.search(query)
                    ]}})
                else:
                    self._send(404, b"not found", "text/plain")

        return Handler


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 8888
    with SearchServer.from_folder(folder, port=port) as running:
        print(f"serving {len(running.pages)} pages at {running.url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
