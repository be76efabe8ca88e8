"""The wiki's pure text handling: slugs, front matter, sentences, terms, claims and citations."""

from __future__ import annotations

import pytest

from hydrabrain.servers.wiki.compile import source_date, source_links, source_title
from hydrabrain.servers.wiki.lint import attribute_claims, uncited_sentences
from hydrabrain.servers.wiki.markdown import (
    SlugError,
    check_slug,
    chunk_text,
    extract_terms,
    links,
    render_front_matter,
    sentences,
    slugify,
    split_front_matter,
)


def test_titles_become_plain_slugs_and_only_plain_slugs_pass() -> None:
    assert slugify("Postmortem: 2025 Ledger Outage!") == "postmortem-2025-ledger-outage"
    assert slugify("Café Ünïcode") == "cafe-unicode"
    assert check_slug("ledger-service") == "ledger-service"
    for bad in ("../x", "x/y", "/abs", "-lead", "UPPER", "a" * 81, "with space"):
        with pytest.raises(SlugError):
            check_slug(bad)


def test_front_matter_round_trips_and_stays_valid_yaml() -> None:
    import yaml

    meta = {"title": 'Quotes "and" colons: yes', "type": "note", "sources": ["a", "b"], "updated": "2026-01-01T00:00:00.000Z", "generated": False}
    text = render_front_matter(meta) + "\n# Body\n"
    parsed, body = split_front_matter(text)
    assert parsed == meta and body.strip() == "# Body"
    assert yaml.safe_load(text.split("---\n")[1]) == meta


def test_sentences_skip_headings_tables_and_footnote_definitions() -> None:
    body = "# Title\n\nFirst claim here, e.g. this one. Second claim.\n\n| a | b |\n|---|---|\n\n- A listed claim\n\n[^x]: Footnote\n"
    assert sentences(body) == ["First claim here, e.g. this one.", "Second claim.", "A listed claim"]


def test_long_text_is_chunked_at_paragraphs_under_the_word_budget() -> None:
    text = "\n\n".join(f"Paragraph {i} " + "word " * 50 for i in range(6))
    chunks = chunk_text(text, max_words=120)
    assert len(chunks) == 3 and all(len(c.split()) <= 120 for c in chunks)


def test_names_and_bold_concepts_are_found_but_sentence_openers_and_codes_are_not() -> None:
    text = "Bring Terraform plans to Marta Silva. The **error budget** is shared. A retry fails with LED-4021 at Kestrel Labs."
    names = {t.name: t.kind for t in extract_terms(text)}
    assert names["Terraform"] == "entity" and names["Marta Silva"] == "entity" and names["Kestrel Labs"] == "entity"
    assert names["error budget"] == "concept"
    assert "Bring Terraform" not in names and "LED" not in names


def test_attribute_claims_are_read_from_both_sentence_shapes() -> None:
    text = "Ledger's primary database is PostgreSQL 16, upgraded in January. The on-call rotation of Team Falcon is two weeks."
    assert attribute_claims(text) == [("Ledger", "primary database", "postgresql 16"), ("Team Falcon", "on-call rotation", "two weeks")]


def test_a_sentence_counts_as_cited_when_its_marker_follows_the_full_stop() -> None:
    body = "Ledger records every charge.[^ledger] Checkout calls it for every single order. Short one."
    assert uncited_sentences(body) == ["Checkout calls it for every single order."]


def test_sources_declare_their_title_date_and_links() -> None:
    text = "---\ntitle: \"Given Title\"\n---\n# Heading\n\nUpdated: 2025-06-30\n\nSee [[Other Doc]] and [the guide](../guides/kafka-guide.md) and [site](https://x.org/a.md)."
    assert source_title(text, "fallback") == "Given Title"
    assert source_title("# Heading\n\ntext", "fallback") == "Heading"
    assert source_date(text) == "2025-06-30"
    assert source_links(text) == ["other-doc", "kafka-guide"]
    assert links("[[alpha]] [[Beta Page|label]] [[alpha]]") == ["alpha", "beta-page"]
