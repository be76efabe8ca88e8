"""Guards for untrusted input: file paths, URLs, fetched bytes, and text that tries to give orders.

A server reachable over HTTP must not become a way to read its host's files or probe its network,
so paths are confined to allowed roots (after resolving symlinks) and URLs to public addresses
(checked for every redirect hop, after DNS resolution). Source text is data: instructions inside it
are never followed, and the ones that look like prompt injection are flagged for the reader.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlparse

import httpx


class UnsafeInput(ValueError):
    """Input refused by a guard; the message says why and which setting would allow it."""


# --- paths ------------------------------------------------------------------------------------


def confine_path(path: str | Path, allowed_roots: Sequence[Path], setting: str = "allowed_roots") -> Path:
    """The resolved path if it lies inside one of `allowed_roots` (symlinks resolved), else UnsafeInput."""
    candidate = Path(path).expanduser()
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise UnsafeInput(f"{path} does not exist") from None
    roots = [Path(r).expanduser().resolve() for r in allowed_roots]
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots) or "(none)"
        raise UnsafeInput(f"{path} is outside the allowed folders ({shown}); add its folder to {setting} to allow it")
    return resolved


# --- bytes ------------------------------------------------------------------------------------


def decode_text(data: bytes, name: str = "source") -> str:
    """UTF-8 text, or UnsafeInput naming the problem (binary content, another encoding)."""
    if b"\x00" in data[:8192]:
        raise UnsafeInput(f"{name} looks binary (it contains NUL bytes); only UTF-8 text can be ingested")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeInput(f"{name} is not valid UTF-8 (byte {exc.start}); convert it to UTF-8 first") from None
    return text.removeprefix("\ufeff")


# --- URLs -------------------------------------------------------------------------------------


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved)


def check_url(url: str, allow_private: bool = False, setting: str = "allow_private_urls") -> str:
    """The URL if it is http(s) to a public address (or any address when allowed), else UnsafeInput."""
    _resolve_checked(url, allow_private, setting)
    return url


def _resolve_checked(url: str, allow_private: bool, setting: str) -> str | None:
    """The one address a fetch of `url` may connect to, after checking every address its host resolves to.

    None when private addresses are allowed (then the client resolves as usual). Connecting to the
    checked address, rather than resolving again, is what defeats a rebinding resolver that answers
    the check with a public address and the connection with 127.0.0.1.
    """
    try:
        parsed = urlparse(url)
        host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError as exc:  # a port out of range, an unbalanced bracket
        raise UnsafeInput(f"{url[:200]!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in {"http", "https"} or not host:
        raise UnsafeInput(f"{url[:200]!r} is not an http(s) URL")
    try:
        host.encode("idna")
    except UnicodeError:  # a label over 63 characters, or one IDNA cannot encode
        raise UnsafeInput(f"{host[:100]!r} is not a valid host name") from None
    if allow_private:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeInput(f"cannot resolve {host}: {exc.strerror}") from None
    except UnicodeError:
        raise UnsafeInput(f"{host[:100]!r} is not a valid host name") from None
    for info in infos:
        address = str(info[4][0])
        if not _is_public(address):
            raise UnsafeInput(
                f"{url} resolves to {address}, a loopback or private address; set {setting} = true to allow it"
            )
    return str(infos[0][4][0])


@dataclass(frozen=True)
class Fetched:
    url: str
    content_type: str
    text: str


def _pinned(url: str, address: str | None) -> tuple[str, dict[str, str], dict[str, str]]:
    """(URL to request, extra headers, request extensions) that reach `address` while naming the host."""
    if address is None:
        return url, {}, {}
    parsed = urlparse(url)
    shown = f"[{address}]" if ":" in address else address
    netloc = f"{shown}:{parsed.port}" if parsed.port else shown
    host_header = parsed.netloc.rsplit("@", 1)[-1]
    # TLS still verifies the certificate against the host name (SNI), not the address.
    return parsed._replace(netloc=netloc).geturl(), {"Host": host_header}, {"sni_hostname": parsed.hostname or ""}


def fetch_url(url: str, *, timeout: float, max_bytes: int, allow_private: bool = False, setting: str = "allow_private_urls") -> Fetched:
    """GET a URL as text, checking every redirect hop and stopping at `max_bytes`.

    `timeout` bounds the whole fetch, redirects and a slowly dripping body included, not each read.
    Raises UnsafeInput for refused addresses, oversize or binary bodies, and ConnectionError with a
    readable message when the host cannot be reached, answers with an error status, or runs out of time.
    """
    deadline = time.monotonic() + timeout
    current = url
    address = _resolve_checked(current, allow_private, setting)

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionError(f"{current} did not finish within {timeout:g} s")
        return left

    with httpx.Client(follow_redirects=False, headers={"User-Agent": "hydrabrain/0.1"}) as client:
        for _ in range(6):
            target, headers, extensions = _pinned(current, address)
            try:
                request = client.build_request("GET", target, headers=headers, extensions=extensions, timeout=remaining())
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        current = urljoin(current, location)
                        address = _resolve_checked(current, allow_private, setting)
                        continue
                    if response.status_code >= 400:
                        raise ConnectionError(f"{current} answered HTTP {response.status_code}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > max_bytes:
                        raise UnsafeInput(f"{current} is {declared} bytes, over the {max_bytes}-byte limit")
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise UnsafeInput(f"{current} is over the {max_bytes}-byte limit")
                        remaining()
                    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
                finally:
                    response.close()
            except httpx.TimeoutException:
                raise ConnectionError(f"{current} did not finish within {timeout:g} s") from None
            except httpx.HTTPError as exc:
                raise ConnectionError(f"cannot fetch {current}: {exc}") from None
            except UnicodeError:
                raise UnsafeInput(f"{current[:200]!r} has a host name that is not valid") from None
            text = decode_text(bytes(body), current)
            if content_type in {"text/html", "application/xhtml+xml"} or text.lstrip()[:15].lower().startswith(("<!doctype html", "<html")):
                text = html_to_text(text)
            return Fetched(current, content_type, text)
    raise ConnectionError(f"{url} redirected too many times")


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    _BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article", "pre", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.title: str | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag in self._SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title and self.title is None:
            self.title = data.strip() or None
        if not self.skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Readable text of an HTML page: scripts, styles and markup dropped, paragraphs kept."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n")]
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if parser.title and not body.startswith(parser.title):
        body = f"{parser.title}\n\n{body}"
    return body


# --- prompt injection -------------------------------------------------------------------------

_INJECTION_PATTERNS = [
    (re.compile(r"\b(ignore|disregard|forget)\b[^.\n]{0,40}\b(previous|prior|above|earlier|all|any)\b[^.\n]{0,30}\b(instructions?|prompts?|rules|directions)\b", re.I), "asks to ignore earlier instructions"),
    (re.compile(r"\byou are now\b|\bact as (an?|the) (unrestricted|jailbroken|different)\b|\bpretend (to be|you are)\b", re.I), "tries to change the reader's role"),
    (re.compile(r"\b(system prompt|developer message|hidden instructions?)\b", re.I), "refers to the reader's system prompt"),
    (re.compile(r"<\|?(im_start|im_end|system|endoftext)\|?>|\[/?INST\]|^\s*(system|assistant)\s*:", re.I | re.M), "contains chat-template control text"),
    (re.compile(r"\b(reveal|print|output|exfiltrate|send)\b[^.\n]{0,40}\b(api[ _-]?keys?|secrets?|passwords?|credentials|tokens?|environment variables)\b", re.I), "asks for secrets"),
    (re.compile(r"\b(run|execute)\b[^.\n]{0,30}\b(command|shell|script|curl|rm -rf)\b", re.I), "asks the reader to run commands"),
    (re.compile(r"\bdo not (tell|inform|mention)\b[^.\n]{0,30}\b(user|anyone)\b", re.I), "asks to hide something from the user"),
]


def injection_flags(text: str) -> list[str]:
    """Why `text` looks like it is giving orders to a model reading it (empty when it does not)."""
    return [reason for pattern, reason in _INJECTION_PATTERNS if pattern.search(text)]
