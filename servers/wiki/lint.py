"""Health checks over the whole wiki, as pure functions of its pages and sources."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping

from hydrabrain.servers.wiki.compile import PageInfo, SourceInfo, source_body
from hydrabrain.servers.wiki.markdown import CITE_RE, extract_terms, sentences, strip_markup
from hydrabrain.servers.wiki.models import (
    BrokenLink,
    ClaimValue,
    Contradiction,
    LintReport,
    MissingPage,
    StalePage,
    UncitedClaim,
)

MIN_CLAIM_WORDS = 6
_ENT = r"(?P<entity>[A-Z][\w-]*(?:\s+[A-Z][\w-]*){0,3})"
_ATTR = r"(?P<attr>[a-z][a-z0-9-]*(?:\s+[a-z0-9-]+){0,4}?)"
_VALUE = r"(?P<value>[^.;!?\n]{1,80})"
_CLAIMS = [
    re.compile(rf"\b[Tt]he {_ATTR} (?:of|for) {_ENT} (?:is|are|was|has been|will be) {_VALUE}"),
    re.compile(rf"\b{_ENT}'s {_ATTR} (?:is|are|was|has been) {_VALUE}"),
]
_VALUE_CUT = re.compile(r",|\s+(?:and|but|because|since|which|so|while|unless|until|as of|according)\s", re.I)


def attribute_claims(text: str) -> list[tuple[str, str, str]]:
    """(entity, attribute, value) for sentences shaped like "The X of E is V" or "E's X is V"."""
    found = []
    for sentence in sentences(strip_markup(text)):
        for pattern in _CLAIMS:
            for match in pattern.finditer(sentence):
                entity = match.group("entity").strip()
                attr = " ".join(match.group("attr").split()).lower()
                value = _VALUE_CUT.split(match.group("value"), maxsplit=1)[0]
                value = " ".join(value.split()).strip(" \"'").lower()
                value = re.sub(r"^(?:currently|now|still|only)\s+", "", value)
                if entity and attr and value:
                    found.append((entity, attr, value))
    return found


def _is_claim(sentence: str) -> bool:
    plain = strip_markup(sentence).strip()
    if len(plain.split()) < MIN_CLAIM_WORDS or plain.endswith((":", "?")):
        return False
    return not (plain.startswith(("From ", ">")) or sentence.strip().startswith(("*", "_", ">")) and sentence.strip().endswith(("*", "_")))


def uncited_sentences(body: str) -> list[str]:
    """Claim-like sentences with no citation marker after them."""
    out = []
    # "Claim.[^id] Next." would split with the marker on the wrong side; move markers before the stop.
    body = re.sub(r"([.!?])((?:\s*\[\^[^\]\s]+\])+)", lambda m: m.group(2).replace(" ", "") + m.group(1), body)
    for sentence in sentences(body):
        if _is_claim(sentence) and not CITE_RE.search(sentence):
            out.append(" ".join(strip_markup(sentence).split()))
    return out


def lint(pages: Mapping[str, PageInfo], sources: Mapping[str, SourceInfo], source_texts: Mapping[str, str], min_mentions: int = 2) -> LintReport:
    report = LintReport(pages=len(pages), sources=len(sources))

    incoming: dict[str, set[str]] = defaultdict(set)
    for page in pages.values():
        for target in page.links:
            if target not in pages:
                report.broken_links.append(BrokenLink(page=page.slug, target=target))
            elif target != page.slug:
                incoming[target].add(page.slug)
    report.orphans = sorted(slug for slug, page in pages.items() if not incoming.get(slug) and page.type != "stub")

    # Concepts several pages mention that have no page of their own. A generated page only repeats
    # its sources, so its mentions count once per source; a written page counts as itself.
    mentioned: dict[str, tuple[str, set[str], set[str]]] = {}
    for page in pages.values():
        origins = set(page.sources) if page.generated and page.sources else {f"page:{page.slug}"}
        for term in extract_terms(page.body):
            if term.key == page.slug:
                continue
            name, where, seen = mentioned.setdefault(term.key, (term.name, set(), set()))
            where.add(page.slug)
            seen.update(origins)
    for key, (name, where, seen) in sorted(mentioned.items()):
        if key not in pages and len(where) >= min_mentions and len(seen) >= min_mentions:
            report.missing_pages.append(MissingPage(slug=key, name=name, mentioned_in=sorted(where)))

    for page in pages.values():
        if page.type == "stub":
            continue
        for sentence in uncited_sentences(page.body):
            report.uncited_claims.append(UncitedClaim(page=page.slug, sentence=sentence))

    for page in pages.values():
        newer = [sid for sid in page.sources if sid in sources and page.updated and sources[sid].ingested > page.updated]
        if newer:
            report.stale_pages.append(StalePage(page=page.slug, updated=page.updated, newer_sources=newer))

    report.contradictions = contradictions(pages, sources, source_texts)
    return report


def contradictions(pages: Mapping[str, PageInfo], sources: Mapping[str, SourceInfo], source_texts: Mapping[str, str]) -> list[Contradiction]:
    """Different values for the same attribute of the same entity, across pages and the sources behind them."""
    claims: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)

    def add(entity: str, attr: str, value: str, where: str, dated: str | None) -> None:
        slot = claims[(entity.lower(), attr)].setdefault(value, {"pages": set(), "dated": None, "entity": entity})
        slot["pages"].add(where)
        if dated and (slot["dated"] is None or dated > slot["dated"]):
            slot["dated"] = dated

    for page in pages.values():
        # A generated page repeats its sources' claims, which are dated below; a written page dates itself.
        dated = None if page.generated else (page.updated[:10] or None)
        for entity, attr, value in attribute_claims(page.body):
            add(entity, attr, value, page.slug, dated)
    for sid, text in source_texts.items():
        info = sources.get(sid)
        where = sid if sid in pages else f"source:{sid}"
        for entity, attr, value in attribute_claims(source_body(text)):
            add(entity, attr, value, where, info.dated if info else None)

    found = []
    for (_, attr), values in sorted(claims.items()):
        if len(values) < 2:
            continue
        entity = next(iter(values.values()))["entity"]
        listed = [ClaimValue(value=v, pages=sorted(d["pages"]), dated=d["dated"]) for v, d in sorted(values.items())]
        dates = [c.dated for c in listed if c.dated]
        current = None
        if len(set(dates)) > 1:
            newest = max(dates)
            current = next(c.value for c in listed if c.dated == newest)
        found.append(Contradiction(entity=entity, attribute=attr, values=listed, likely_current=current))
    return found
