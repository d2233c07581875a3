"""Metrics on hand-checked completions."""

from __future__ import annotations

import pytest

from refact_lab.scoreboard.metrics import aggregate, edit_similarity, identifier_f1, score


def test_edit_similarity_is_one_minus_normalised_levenshtein():
    assert edit_similarity("return x", "return x") == 1.0
    assert edit_similarity("abc", "abd") == pytest.approx(2 / 3)           # one substitution over 3
    assert edit_similarity("self.close()", "self.clo") == pytest.approx(8 / 12)  # four deletions over 12
    assert edit_similarity("", "x = 1") == 0.0
    assert edit_similarity("", "") == 1.0


def test_identifier_f1_counts_repeated_names():
    # got {self:1, close:1}, want {self:1, open:1}: precision 1/2, recall 1/2
    assert identifier_f1("self.close()", "self.open()") == pytest.approx(0.5)
    # got {a:2, b:1}, want {a:1, b:1}: common 2, precision 2/3, recall 1 -> 0.8
    assert identifier_f1("a + a * b", "a * b") == pytest.approx(0.8)
    assert identifier_f1("()", "[]") == 1.0 and identifier_f1("x", "()") == 0.0


def test_a_completion_repeating_the_indentation_is_not_an_exact_match():
    s = score("        self.close()", "self.close()", single_line=True)
    assert s["exact_match"] == 0.0 and s["edit_similarity"] == pytest.approx(12 / 20)
    s = score("self.close()\n        x = 1", "self.close()", single_line=True)
    assert s["exact_match"] == 1.0 and s["edit_similarity"] == 1.0 and s["degenerate"] == 0.0


def test_multi_line_compares_as_many_lines_as_expected():
    s = score("a = 1\nb = 2\nc = 3\nd = 4", "a = 1\nb = 2", single_line=False)
    assert s["exact_match"] == 1.0 and s["edit_similarity"] == 1.0
    s = score("a = 1\nb = 3", "a = 1\nb = 2", single_line=False)
    assert s["exact_match"] == 1.0 and s["edit_similarity"] == pytest.approx(1 - 1 / 11)


def test_degenerate_completions():
    assert score("   ", "x = 1", single_line=True)["degenerate"] == 1.0
    assert score("foo(bar", "foo(bar)", single_line=True, finish_reason="length")["degenerate"] == 1.0
    assert score("None, None, None, None, ", "None)", single_line=True)["degenerate"] == 1.0
    # the code around the cursor repeats that piece: a table row, not a loop
    assert score("0, 0, 0, 0, ", "0, 0)", single_line=True, context="[0, 0, 0, 0, 0]")["degenerate"] == 0.0


def test_aggregate_means_and_median_latency():
    rows = [{"exact_match": 1.0, "edit_similarity": 1.0, "identifier_f1": 1.0, "named_right": 1.0, "degenerate": 0.0,
             "ms": 10.0},
            {"exact_match": 0.0, "edit_similarity": 0.5, "identifier_f1": 0.0, "named_right": 1.0, "degenerate": 1.0,
             "ms": 30.0},
            {"exact_match": 0.0, "edit_similarity": 0.25, "identifier_f1": 0.5, "named_right": 0.0, "degenerate": 0.0,
             "ms": 20.0}]
    assert aggregate(rows) == {"exact_match": 0.3333, "edit_similarity": 0.5833, "identifier_f1": 0.5,
                               "named_right": 0.6667, "degenerate": 0.3333, "p50_ms": 20.0, "n": 3}
    assert aggregate([])["n"] == 0


def test_named_right_compares_the_first_identifier_only():
    want = "convert_with_kestrel_rate(total)"
    assert score("convert_with_kestrel_rate(amount)", want, single_line=True)["named_right"] == 1.0
    assert score("convert_with_rate(total)", want, single_line=True)["named_right"] == 0.0
    assert score("", want, single_line=True)["named_right"] == 0.0


def test_names_in_any_script_are_identifiers():
    # ASCII-only, both sides had no identifier: F1 1.0 and "named right" for any two such completions
    assert identifier_f1("größe(x)", "länge(x)") == 0.5
    assert score("计算(x)", "合计(x)", single_line=True)["named_right"] == 0.0
    assert score("größe(x)", "größe(y)", single_line=True)["named_right"] == 1.0
