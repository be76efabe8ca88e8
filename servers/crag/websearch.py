"""Web search for the corrective step: query rewriting, a search provider, and page fetching.

Two wire formats: a SearXNG-compatible JSON endpoint (``/search?q=...&format=json`` answering
``{"results": [{"url", "title", "content"}]}``) and the Brave Search API (``/res/v1/web/search``
with an ``X-Subscription-Token`` header, results under ``web.results[]``). Anything the provider
sends back is checked before use; a provider that is down, slow or talking nonsense raises
WebSearchError with a message the caller can put in its trace.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from hydrabrain.shared.config import CragConfig
from hydrabrain.shared.lexical import query_terms
from hydrabrain.shared.safety import UnsafeInput, fetch_url

BRAVE_DEFAULT_URL = "https://api.search.brave.com"
MAX_QUERY_TERMS = 8
# Words that shape a question but would only add noise to a keyword query.
_FILLER = frozenset(
    "does did is are was were which what how many much why who whom whose when where there here "
    "tell explain describe please know find give list show mean means used use using value".split()
)


class WebSearchError(RuntimeError):
    """The web step could not run; the message says why and what to configure."""


@dataclass(frozen=True)
class WebResult:
    url: str
    title: str
    snippet: str


def keyword_query(question: str, max_terms: int = MAX_QUERY_TERMS) -> str:
    """The question cut down to its content words, in order (the plain-mode rewrite).

    Quoted phrases survive intact because a search engine matches them best.
    """
    keep = [f'"{p.strip()}"' for p in re.findall(r'"([^"]+)"', question) if p.strip()]
    rest = re.sub(r'"[^"]+"', " ", question)
    keep += [t for t in query_terms(rest) if t not in _FILLER]
    words = list(dict.fromkeys(keep))[:max_terms]
    return " ".join(words) if words else question.strip()


def provider_status(cfg: CragConfig) -> str | None:
    """Why web search cannot run with this configuration, or None when it can."""
    if cfg.web_search_provider == "searxng" and not cfg.web_search_url:
        return "no web-search provider is configured (set crag.web_search_url or HYDRABRAIN_WEB_SEARCH_URL to a SearXNG-compatible base URL)"
    if cfg.web_search_provider == "brave" and not os.environ.get(cfg.web_search_api_key_env):
        return f"the Brave Search provider needs an API key in ${cfg.web_search_api_key_env}"
    return None


async def search(cfg: CragConfig, query: str, count: int) -> list[WebResult]:
    problem = provider_status(cfg)
    if problem:
        raise WebSearchError(problem)
    if cfg.web_search_provider == "brave":
        base = (cfg.web_search_url or BRAVE_DEFAULT_URL).rstrip("/")
        url = f"{base}/res/v1/web/search"
        params: dict[str, Any] = {"q": query, "count": count}
        headers = {"Accept": "application/json", "X-Subscription-Token": os.environ.get(cfg.web_search_api_key_env, "")}
    else:
        base = str(cfg.web_search_url).rstrip("/")
        url = f"{base}/search"
        params = {"q": query, "format": "json"}
        headers = {"Accept": "application/json"}
    try:
        async with httpx.AsyncClient(timeout=cfg.web_timeout_s, headers={"User-Agent": "hydrabrain/0.1", **headers}) as client:
            response = await client.get(url, params=params)
    except httpx.TimeoutException:
        raise WebSearchError(f"the web-search provider at {base} did not answer within {cfg.web_timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise WebSearchError(f"cannot reach the web-search provider at {base}: {exc}") from None
    if response.status_code >= 400:
        raise WebSearchError(f"the web-search provider at {base} answered HTTP {response.status_code}")
    try:
        data = response.json()
    except ValueError:
        raise WebSearchError(f"the web-search provider at {base} answered something that is not JSON") from None
    raw = _brave_results(data) if cfg.web_search_provider == "brave" else _searxng_results(data)
    if raw is None:
        shape = "Brave Search (web.results[])" if cfg.web_search_provider == "brave" else "SearXNG (results[])"
        raise WebSearchError(f"the web-search provider at {base} answered JSON that is not in the {shape} format")
    results: list[WebResult] = []
    seen: set[str] = set()
    for item in raw:
        if not isinstance(item, dict):
            continue
        link = item.get("url")
        if not isinstance(link, str) or not link.startswith(("http://", "https://")) or link in seen:
            continue
        seen.add(link)
        title = item.get("title") if isinstance(item.get("title"), str) else ""
        snippet = item.get("content", item.get("description", ""))
        results.append(WebResult(link, _strip_tags(title), _strip_tags(snippet if isinstance(snippet, str) else "")))
        if len(results) >= count:
            break
    return results


def _searxng_results(data: Any) -> list[Any] | None:
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        return data["results"]
    return None


def _brave_results(data: Any) -> list[Any] | None:
    if not isinstance(data, dict):
        return None
    web = data.get("web")
    if web is None and data.get("type") == "search":
        return []  # Brave leaves out the web block when nothing matched
    if isinstance(web, dict) and isinstance(web.get("results"), list):
        return web["results"]
    return None


def _strip_tags(text: str) -> str:
    # Brave highlights matches with <strong>; snippets are text.
    return re.sub(r"\s+", " ", re.sub(r"<[^>]{1,40}>", "", text)).strip()


async def fetch_page(cfg: CragConfig, result: WebResult) -> tuple[str, str | None]:
    """The page's cleaned text, or the snippet plus the reason the page could not be used."""
    if not cfg.fetch_pages:
        return result.snippet, None
    try:
        fetched = await anyio.to_thread.run_sync(
            lambda: fetch_url(
                result.url,
                timeout=cfg.web_timeout_s,
                max_bytes=cfg.max_page_bytes,
                allow_private=cfg.allow_private_urls,
                setting="crag.allow_private_urls",
            )
        )
    except (UnsafeInput, ConnectionError) as exc:
        return result.snippet, str(exc)
    text = fetched.text.strip()
    if not text:
        return result.snippet, f"{result.url} has no readable text"
    return text, None
