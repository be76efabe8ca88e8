"""The parts that need no model: strips and their selection, the action rule, the keyword rewrite, the calibration file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hydrabrain.servers.crag.core import evaluator_info
from hydrabrain.servers.crag.evaluator import MiniLMEvaluator, ThresholdsError, decide, load_calibration, shipped_thresholds_path
from hydrabrain.shared.config import Settings
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


def test_a_missing_or_broken_calibration_file_says_how_to_regenerate_it(tmp_path: Path) -> None:
    with pytest.raises(ThresholdsError, match="hydrabrain crag calibrate"):
        load_calibration(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"features": ["maxsim"], "upper": 0.9}')
    with pytest.raises(ThresholdsError, match="other features"):
        load_calibration(broken)
    shipped = load_calibration(shipped_thresholds_path())
    assert 0 < shipped.lower < shipped.upper < 1


def test_thresholds_set_the_wrong_way_round_are_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="lower must not exceed upper"):
        MiniLMEvaluator(object(), load_calibration(), upper=0.3, lower=0.6)  # type: ignore[arg-type]
    settings.crag.upper_threshold = 0.9
    assert evaluator_info(settings).upper_threshold == 0.9
