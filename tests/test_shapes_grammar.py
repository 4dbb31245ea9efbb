"""The shapes-world grammar: strict parsing with errors that name the bad word."""

from __future__ import annotations

import numpy as np
import pytest

from evolve.shapes.grammar import (CATEGORIES, COLORS, Prompt, PromptError, all_prompts, format_prompt,
                                   heldout_prompts, parse, sample_prompt, vocabulary)


def test_examples_of_the_spec_parse():
    assert parse("a triangle") == Prompt("a triangle", "single_object", ("triangle",), (None,))
    assert parse("a cyan circle") == Prompt("a cyan circle", "colors", ("circle",), ("cyan",))
    assert parse("a circle and a square").category == "two_object"
    p = parse("three triangles")
    assert (p.category, p.shapes, p.colors, p.n_objects) == ("counting", ("triangle",) * 3, (None,) * 3, 3)
    assert parse("one circle").shapes == ("circle",)
    p = parse("a square left of a circle")
    assert (p.category, p.shapes, p.relation) == ("position", ("square", "circle"), "left of")
    p = parse("a red square and a blue triangle")
    assert (p.category, p.shapes, p.colors) == ("color_attr", ("square", "triangle"), ("red", "blue"))
    assert str(p) == p.text
    assert list(COLORS) == ["red", "yellow", "green", "cyan", "blue", "magenta"]


@pytest.mark.parametrize("text, needle", [
    ("a purple circle", "unknown word 'purple' at position 2"),
    ("a red", "missing word at position 3"),
    ("a circle and a", "missing word at position 5"),
    ("a circle and a circle", "got 'circle' twice"),
    ("a square above a square", "got 'square' twice"),
    ("a red circle and a red square", "got 'red' twice"),
    ("a red circle and a blue circle", "got 'circle' twice"),
    ("a circle.", "'.' in word 'circle.' at position 2"),
    ("a circle!", "'!'"),
    ("A circle", "'A' at position 1"),
    ("a Red circle", "'Red' at position 2"),
    ("a  circle", "double space after word 'a' at position 1"),
    ("a circle ", "trailing whitespace"),
    (" a circle", "leading whitespace"),
    ("two circle", "word 'circle' at position 2"),
    ("one circles", "word 'circles' at position 2"),
    ("five circles", "unknown word 'five' at position 1"),
    ("a circle left a square", "word 'a' at position 4"),
    ("a circle and a red square", "word 'red' at position 5"),
    ("a red circle and a square", "word 'square' at position 6"),
    ("a circle square", "word 'square' at position 3"),
    ("", "empty prompt"),
])
def test_errors_name_the_bad_word(text, needle):
    with pytest.raises(PromptError) as e:
        parse(text)
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)


def test_all_prompts_round_trip_through_format_and_parse():
    prompts = all_prompts()
    assert len(prompts) == 3 + 18 + 6 + 12 + 24 + 180
    assert len({p.text for p in prompts}) == len(prompts)
    for p in prompts:
        assert parse(p.text) == p
        assert format_prompt(p.category, p.shapes, p.colors, p.relation) == p
    assert {p.category for p in prompts} == set(CATEGORIES)


def test_format_prompt_rejects_parts_that_do_not_fit():
    with pytest.raises(PromptError):
        format_prompt("single_object", ("circle",), ("red",))  # colour not in template
    with pytest.raises(PromptError):
        format_prompt("counting", ("circle",) * 5)
    with pytest.raises(PromptError):
        format_prompt("position", ("circle", "square"))  # no relation
    with pytest.raises(PromptError, match="'hexagon'"):
        format_prompt("single_object", ("hexagon",))


def test_sampling_is_deterministic_and_covers_categories():
    a = [sample_prompt(np.random.default_rng(0)) for _ in range(3)]
    b = [sample_prompt(np.random.default_rng(0)) for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(1)
    cats = {sample_prompt(rng).category for _ in range(200)}
    assert cats == set(CATEGORIES)
    assert all(sample_prompt(rng, "counting").category == "counting" for _ in range(20))


def test_heldout_is_balanced_distinct_and_deterministic():
    h = heldout_prompts()
    assert h == heldout_prompts()
    assert len({p.text for p in h}) == len(h)
    by_cat = {c: sum(p.category == c for p in h) for c in CATEGORIES}
    # 16 each, or the whole category where it is smaller
    assert by_cat == {"single_object": 3, "colors": 16, "two_object": 6, "counting": 12,
                      "position": 16, "color_attr": 16}
    # a smaller set is a per-category prefix of a larger one
    for c in CATEGORIES:
        small = [p for p in heldout_prompts(4) if p.category == c]
        assert small == [p for p in h if p.category == c][:4]
    assert heldout_prompts(seed=1) != h


def test_vocabulary_covers_every_prompt():
    v = vocabulary()
    assert v == sorted(set(v))
    assert {"left", "of", "circles", "magenta", "four", "and", "a"} <= set(v)
    assert all(w in v for p in all_prompts() for w in p.text.split())
