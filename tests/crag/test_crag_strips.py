"""Decompose-then-recompose without a model: sentence splitting, strips and the budgeted selection."""

from __future__ import annotations

from hydrabrain.servers.crag.evaluator import decide
from hydrabrain.servers.crag.strips import decompose, select, split_sentences, windows
from hydrabrain.servers.crag.websearch import keyword_query


def test_sentences_split_at_ends_but_not_after_abbreviations_and_headings_become_context() -> None:
    text = "# Setup\n\nInstall it, e.g. with pip. Then run it! Does it work?\n\n- first item\n- second item"
    pairs = split_sentences(text)
    assert pairs == [
        ("Setup", "Install it, e.g. with pip."),
        ("Setup", "Then run it!"),
        ("Setup", "Does it work?"),
        ("Setup", "first item"),
        ("Setup", "second item"),
    ]


def test_strips_group_sentences_and_never_cross_a_section() -> None:
    text = "# A\n\nOne. Two. Three.\n\n# B\n\nFour."
    strips = decompose(text, doc_index=3, sentences_per_strip=2)
    assert [(s.heading, s.text, s.position, s.doc_index) for s in strips] == [
        ("A", "One. Two.", 0, 3),
        ("A", "Three.", 1, 3),
        ("B", "Four.", 2, 3),
    ]


def test_selection_keeps_the_best_strips_within_budget_in_reading_order() -> None:
    strips = decompose("S0. S1. S2. S3.", sentences_per_strip=1)
    scores = [0.2, 0.9, 0.05, 0.8]
    chosen = select(strips, scores, costs=[5, 5, 5, 5], budget=10, floor=0.1)
    assert chosen == [1, 3]  # the two best, back in document order
    assert select(strips, scores, costs=[5, 5, 5, 5], budget=100, floor=0.1, relative=0.5) == [1, 3]
    assert select(strips, scores, costs=[5, 5, 5, 5], budget=100, floor=0.1) == [0, 1, 3]
    assert select(strips, scores, costs=[5, 20, 5, 5], budget=10, floor=0.0) == [0, 3]  # the best does not fit


def test_long_text_is_cut_into_windows_at_sentence_ends() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    parts = windows(text, lambda t: len(t.split()), max_tokens=50)
    assert len(parts) > 1
    assert all(len(p.split()) <= 50 for p in parts)
    assert " ".join(parts) == text


def test_the_papers_rule_maps_scores_to_actions() -> None:
    assert decide([0.1, 0.9], upper=0.7, lower=0.3) == "correct"
    assert decide([0.1, 0.2], upper=0.7, lower=0.3) == "incorrect"
    assert decide([0.1, 0.5], upper=0.7, lower=0.3) == "ambiguous"
    assert decide([], upper=0.7, lower=0.3) == "incorrect"


def test_keyword_rewrite_keeps_content_words_and_quoted_phrases() -> None:
    assert keyword_query("How often does Heron DB compact its log?") == "often heron db compact log"
    assert keyword_query('What does the "max retries" option of Quartz do?') == '"max retries" option quartz'
