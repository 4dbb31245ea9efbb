"""The prompts world: prompt files (every format, the public layouts, every bad
input) and the world built on them. Fast, no Ray."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evolve.config import PromptSource, PromptsWorldConfig
from evolve.prompts import FilePrompt, PromptFileError, PromptsWorld, load_prompts
from evolve.seeds import stable_seed
from evolve.shapes.grammar import CATEGORIES
from evolve.shapes.reading import read
from evolve.world import HeldoutPrompt, WorldPrompt
from evolve.worlds import make_world

ROOT = Path(__file__).resolve().parents[1]
SEED_FILE = ROOT / "configs" / "prompts" / "free-text-seed.jsonl"
HELDOUT_FILE = ROOT / "configs" / "prompts" / "free-text-heldout.jsonl"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    return p


def load(path: Path, max_chars: int = 1000, **kw) -> list[FilePrompt]:
    return load_prompts(PromptSource(path=path, **kw), max_chars)


def error(path: Path, max_chars: int = 1000, **kw) -> str:
    with pytest.raises(PromptFileError) as e:
        load(path, max_chars, **kw)
    assert str(path) in str(e.value)  # every message names the file
    return str(e.value)


def jsonl(*objs) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


# --------------------------------------------------------------------------- formats

def test_jsonl_ids_categories_lines_and_blank_lines(tmp_path):
    p = write(tmp_path, "p.jsonl", jsonl({"id": "a", "prompt": "  a red  circle \t", "category": "colors"}, "",
                                         "   ", {"id": 7, "prompt": "two squares"}))
    assert load(p) == [FilePrompt("a", "a red  circle", "colors", 1), FilePrompt("7", "two squares", None, 4)]


def test_csv_drawbench_layout(tmp_path):
    # DrawBench's CSV: header "Prompts,Category", quoted prompts where they hold a comma
    p = write(tmp_path, "drawbench.csv", 'Prompts,Category\r\nA red colored car.,Colors\r\n'
              '"A storefront with \'Hello, World\' written on it.",Text\r\n"A ""quoted""\nsign.",Text\r\n'
              "A black colored dog.,Colors\r\n")
    got = load(p)
    assert [(x.text, x.category, x.line, x.id) for x in got] == [
        ("A red colored car.", "Colors", 2, "2"),
        ("A storefront with 'Hello, World' written on it.", "Text", 3, "3"),
        ('A "quoted"\nsign.', "Text", 4, "4"),          # a quoted field may span lines: it starts on line 4
        ("A black colored dog.", "Colors", 6, "6")]


def test_tsv_partiprompts_layout(tmp_path):
    # PartiPrompts' TSV: no quoting; a prompt that starts with a quote keeps it
    p = write(tmp_path, "PartiPrompts.tsv", "Prompt\tCategory\tChallenge\tNote\n"
              "bond\tAbstract\tBasic\tBiology-inspired concepts with multiple meanings\n"
              "a red cube\tIllustrations\tBasic\t\n"
              '"G I G G L E" painted in thick colorful lettering\tIllustrations\tWriting & Symbols\t\n'
              "flying over the city of Mars. \tWorld Knowledge\tComplex\t\n")
    got = load(p)
    assert [x.text for x in got] == ["bond", "a red cube", '"G I G G L E" painted in thick colorful lettering',
                                     "flying over the city of Mars."]
    assert [x.category for x in got] == ["Abstract", "Illustrations", "Illustrations", "World Knowledge"]
    assert [x.line for x in got] == [2, 3, 4, 5] and [x.id for x in got] == ["2", "3", "4", "5"]


def test_jsonl_geneval_layout(tmp_path):
    p = write(tmp_path, "evaluation_metadata.jsonl", jsonl(
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "counting", "include": [{"class": "clock", "count": 2}],
         "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"}))
    assert load(p) == [FilePrompt("1", "a photo of a bench", "single_object", 1),
                       FilePrompt("2", "a photo of two clocks", "counting", 2)]


def test_txt_comments_blank_lines_line_ids(tmp_path):
    p = write(tmp_path, "p.txt", "# my prompts\n\na circle\n  # indented comment\nThree squares.  \n")
    assert load(p) == [FilePrompt("3", "a circle", None, 3), FilePrompt("5", "Three squares.", None, 5)]


def test_parquet_rows_and_auto_suffixes(tmp_path):
    table = pa.table({"id": [10, 11], "caption": ["a circle", "a square"], "skill": ["single_object", None]})
    for name in ("p.parquet", "p.pq"):
        pq.write_table(table, tmp_path / name)
        assert load(tmp_path / name) == [FilePrompt("10", "a circle", "single_object", 1),
                                         FilePrompt("11", "a square", None, 2)]


def test_json_suffix_is_json_lines_and_format_overrides_suffix(tmp_path):
    assert load(write(tmp_path, "p.json", jsonl({"text": "a circle"})))[0].text == "a circle"
    p = write(tmp_path, "prompts.dat", "prompt,category\na circle,x\n")
    assert load(p, format="csv") == [FilePrompt("2", "a circle", "x", 2)]
    assert load(write(tmp_path, "upper.CSV", "Prompt\nhi\n"))[0].text == "hi"


def test_utf8_bom_and_non_ascii(tmp_path):
    p = write(tmp_path, "p.csv", "\ufeffPrompts,Category\nSalvador Dalí's clock,Arts\n".encode())
    assert load(p) == [FilePrompt("2", "Salvador Dalí's clock", "Arts", 2)]


def test_column_auto_detection_order(tmp_path):
    # prompt before text before caption; category before tag
    p = write(tmp_path, "p.jsonl", jsonl({"caption": "c", "text": "t", "prompt": "p", "tag": "g",
                                         "category": "k"}))
    assert load(p) == [FilePrompt("1", "p", "k", 1)]
    p = write(tmp_path, "p.csv", "caption,text,skill\nc,t,s\n")
    assert load(p) == [FilePrompt("2", "t", "s", 2)]


def test_explicit_columns(tmp_path):
    p = write(tmp_path, "p.csv", "uid,prompt,caption_en,kind\nx1,ignored,a circle,shapes\n")
    assert load(p, prompt_column="caption_en", category_column="kind", id_column="uid") == [
        FilePrompt("x1", "a circle", "shapes", 2)]
    p = write(tmp_path, "p.jsonl", jsonl({"q": "a circle", "group": "g", "key": "k1"}, {"q": "a square"}))
    assert load(p, prompt_column="q", category_column="group", id_column="key") == [
        FilePrompt("k1", "a circle", "g", 1), FilePrompt("2", "a square", None, 2)]


def test_limit_keeps_the_first_and_checks_only_those(tmp_path):
    p = write(tmp_path, "p.jsonl", jsonl({"prompt": "one"}, "", {"prompt": "two"}, "not json", {"prompt": ""}))
    assert [x.text for x in load(p, limit=2)] == ["one", "two"]
    assert "line 4" in error(p, limit=3)
    p = write(tmp_path, "p.txt", b"a\nb\n\xff\n")
    assert [x.text for x in load(p, limit=2)] == ["a", "b"]
    pq.write_table(pa.table({"prompt": ["a", "b", None]}), tmp_path / "p.parquet")
    assert [x.text for x in load(tmp_path / "p.parquet", limit=2)] == ["a", "b"]


# --------------------------------------------------------------------------- bad input

def test_missing_file_and_folder(tmp_path):
    assert "not found" in error(tmp_path / "nope.jsonl")
    (tmp_path / "d.jsonl").mkdir()
    assert "folder" in error(tmp_path / "d.jsonl")


def test_unknown_suffix_names_the_formats(tmp_path):
    msg = error(write(tmp_path, "p.yaml", "a: b\n"))
    assert "'.yaml'" in msg and all(f in msg for f in ("jsonl", "csv", "tsv", "txt", "parquet"))


@pytest.mark.parametrize("name, content, words", [
    ("p.jsonl", "", "is empty"),
    ("p.txt", "\n  \n", "is empty"),
    ("p.csv", "\ufeff", "is empty"),
    ("p.txt", "# only a comment\n\n", "holds no prompts"),
    ("p.csv", "Prompts,Category\n\n", "holds no prompts (only a header row)"),
    ("p.tsv", "Prompt\tCategory\n", "holds no prompts (only a header row)"),
])
def test_empty_files(tmp_path, name, content, words):
    assert words in error(write(tmp_path, name, content))


def test_empty_parquet_table(tmp_path):
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "p.parquet")
    assert "holds no prompts (the table has no rows)" in error(tmp_path / "p.parquet")
    assert "not a readable Parquet file" in error(write(tmp_path, "q.parquet", "not parquet"))


def test_crlf_lines(tmp_path):
    assert load(write(tmp_path, "p.txt", "a\r\n\r\nb\r\n")) == [FilePrompt("1", "a", None, 1),
                                                                FilePrompt("3", "b", None, 3)]


def test_not_utf8_names_the_line(tmp_path):
    latin1 = '{"prompt": "caf\xe9"}\n'.encode("latin-1")
    p = write(tmp_path, "p.jsonl", jsonl({"prompt": "fine"}).encode() + latin1)
    msg = error(p)
    assert "line 2" in msg and "not UTF-8" in msg and "byte 16" in msg
    p = write(tmp_path, "p.csv", "prompt\nok\nok2\n".encode() + "\ufeffx".encode("utf-16"))
    assert "line 4" in error(p)


def test_json_errors(tmp_path):
    msg = error(write(tmp_path, "p.jsonl", jsonl({"prompt": "a"}, '{"prompt": "b",}')))
    assert "line 2" in msg and "not valid JSON" in msg and "column" in msg
    msg = error(write(tmp_path, "p.jsonl", jsonl(["a circle"])))
    assert "line 1" in msg and "an array in JSON, not an object" in msg
    msg = error(write(tmp_path, "p.json", '[{"prompt": "a"},\n {"prompt": "b"}]\n'))
    assert "line 1" in msg and "one object per line" in msg


def test_no_prompt_column_lists_found_and_looked_for(tmp_path):
    msg = error(write(tmp_path, "p.csv", "a circle,colors\nb,c\n"))  # no header row
    assert "line 1" in msg and "'a circle', 'colors'" in msg
    assert "looked for 'prompt', 'Prompt', 'Prompts', 'text', 'caption'" in msg
    msg = error(write(tmp_path, "p.jsonl", jsonl({"prompt": "a"}, {"tag": "x", "include": []})))
    assert "line 2" in msg and "'tag', 'include'" in msg and "'caption'" in msg
    pq.write_table(pa.table({"words": ["a"]}), tmp_path / "p.parquet")
    assert "'words'" in error(tmp_path / "p.parquet")
    msg = error(write(tmp_path, "p.tsv", "Prompt\tCategory\nx\ty\n"), prompt_column="prompt_en")
    assert "'Prompt', 'Category'" in msg and "looked for 'prompt_en'" in msg


def test_explicit_columns_must_exist(tmp_path):
    p = write(tmp_path, "p.csv", "prompt,category\na,b\n")
    assert "no column 'kind' (category_column)" in error(p, category_column="kind")
    assert "no column 'uid' (id_column)" in error(p, id_column="uid")
    assert "has no columns" in error(write(tmp_path, "p.txt", "a\n"), prompt_column="x")


@pytest.mark.parametrize("obj, words", [
    ({"prompt": ""}, "is empty"),
    ({"prompt": "  \t "}, "is empty"),
    ({"prompt": None}, "is missing"),
    ({"prompt": 42}, "is a number, not a string"),
    ({"prompt": ["a"]}, "is an array, not a string"),
    ({"prompt": "a", "category": 3}, "category ('category') is a number, not a string"),
    ({"prompt": "a", "tag": ["x"]}, "category ('tag') is an array"),
    ({"prompt": "a", "id": 1.5}, "not a string or an integer"),
    ({"prompt": "a", "id": True}, "not a string or an integer"),
    ({"prompt": "a", "id": " "}, "id ('id') is empty"),
])
def test_bad_values_name_the_line(tmp_path, obj, words):
    msg = error(write(tmp_path, "p.jsonl", jsonl({"prompt": "fine"}, "", obj)))
    assert "line 3" in msg and words in msg


def test_empty_csv_prompt_cell(tmp_path):
    msg = error(write(tmp_path, "p.csv", "Prompts,Category\nok,x\n,x\n"))
    assert "line 3" in msg and "'Prompts') is empty" in msg


def test_duplicate_ids_name_both_lines(tmp_path):
    msg = error(write(tmp_path, "p.jsonl", jsonl({"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                                                 {"id": "a", "prompt": "z"})))
    assert "line 3" in msg and "duplicate id 'a'" in msg and "lines 1 and 3" in msg
    # an explicit id may collide with a line-number id
    msg = error(write(tmp_path, "p.jsonl", jsonl({"id": "2", "prompt": "x"}, {"prompt": "y"})))
    assert "lines 1 and 2" in msg


def test_too_long_prompt(tmp_path):
    msg = error(write(tmp_path, "p.txt", "short\n" + "x" * 31 + "\n"), max_chars=30)
    assert "line 2" in msg and "31 characters" in msg and "limit of 30" in msg
    assert len(load(write(tmp_path, "q.txt", "x" * 30 + "\n"), max_chars=30)) == 1


def test_csv_structure_errors(tmp_path):
    msg = error(write(tmp_path, "p.csv", "prompt,category\na circle, red,colors\n"))
    assert "line 2" in msg and "3 fields" in msg and "2 columns" in msg and "quotes" in msg
    # empty fields past the header's are fine
    assert len(load(write(tmp_path, "q.csv", "prompt,category\na circle,colors,,\n"))) == 1
    msg = error(write(tmp_path, "p.csv", 'prompt\nok\n"never closed\nmore\n'))
    assert "line 3" in msg and "never closed" in msg
    msg = error(write(tmp_path, "p.csv", 'prompt\n"a"b\n'))
    assert "line 2" in msg and "not valid CSV" in msg


def test_error_is_a_value_error_with_parts(tmp_path):
    p = write(tmp_path, "p.jsonl", jsonl({"prompt": 1}))
    with pytest.raises(ValueError) as e:
        load(p)
    assert e.value.path == p and e.value.line == 1 and "not a string" in e.value.problem


def test_source_from_a_bare_path():
    src = PromptsWorldConfig.model_validate({"seed": "s.jsonl", "heldout": {"path": "h.csv", "limit": 5}})
    assert src.seed.path == Path("s.jsonl") and src.heldout.limit == 5 and src.heldout.format == "auto"


# --------------------------------------------------------------------------- the world

def world(tmp_path: Path, seed: str, held: str, **kw) -> PromptsWorld:
    s, h = write(tmp_path, "seed.jsonl", seed), write(tmp_path, "held.jsonl", held)
    return PromptsWorld(PromptsWorldConfig(seed=PromptSource(path=s), heldout=PromptSource(path=h), **kw))


SEEDS = jsonl({"id": "s1", "prompt": "A Red circle.", "category": "colors"}, {"id": "s2", "prompt": "two squares"},
              {"id": "s3", "prompt": "the moon's light", "category": "misc"})
HELD = jsonl({"id": "h1", "prompt": "a blue square", "category": "colors"},
             {"id": "h2", "prompt": "Three circles"})


def test_world_reads_nothing_until_used(tmp_path):
    w = make_world(PromptsWorldConfig(seed=tmp_path / "none.jsonl", heldout=tmp_path / "none2.jsonl"))
    assert isinstance(w, PromptsWorld) and w.name == "prompts"
    assert w.canonical("  a b ") == "a b"
    with pytest.raises(PromptFileError, match="none.jsonl: not found"):
        w.seed_prompts(np.random.default_rng(0))


def test_world_seed_prompts_heldout_category(tmp_path):
    w = world(tmp_path, SEEDS, HELD)
    w.validate()
    rng = np.random.default_rng(0)
    assert w.seed_prompts(rng) == w.seed_prompts(rng, repeat=True) == [
        WorldPrompt("A Red circle.", "colors"), WorldPrompt("two squares", None),
        WorldPrompt("the moon's light", "misc")]
    assert w.heldout() == [HeldoutPrompt("h1", "a blue square", "colors", stable_seed("heldout", "h1", 0)),
                           HeldoutPrompt("h2", "Three circles", None, stable_seed("heldout", "h2", 0))]
    assert w.category("A Red circle.") == "colors" and w.category("a blue square") == "colors"
    assert w.category("two squares") is None and w.category("a red circle") is None  # exact text only
    assert (w.score(["x"], [b""]), w.replay_rows(1, 32, 0), w.judge_pairs(2, 32, 0)) == (None, None, None)


def test_world_heldout_images_per_prompt(tmp_path):
    got = world(tmp_path, SEEDS, HELD, heldout_images_per_prompt=3).heldout()
    assert [h.id for h in got] == ["h1#0", "h1#1", "h1#2", "h2#0", "h2#1", "h2#2"]
    assert [h.seed for h in got[:3]] == [stable_seed("heldout", "h1", k) for k in range(3)]
    assert len({h.seed for h in got}) == 6 and {h.prompt for h in got[3:]} == {"Three circles"}


def test_world_vocabulary_and_sample(tmp_path):
    w = world(tmp_path, SEEDS, HELD)
    assert w.vocabulary() == ["a", "blue", "circle", "circles", "light", "moon's", "red", "square", "squares",
                              "the", "three", "two"]
    got = w.sample(np.random.default_rng(1), 200)
    assert len(got) == 200 and set(got) == {"A Red circle.", "two squares", "the moon's light"}
    assert w.sample(np.random.default_rng(1), 5) == w.sample(np.random.default_rng(1), 5)


def test_world_heldout_among_seeds_names_both_files_and_lines(tmp_path):
    held = jsonl({"prompt": "a blue square"}, {"prompt": "  red CIRCLE  "}, {"prompt": "The two, squares!"})
    w = world(tmp_path, SEEDS, held)
    for call in (w.validate, w.heldout, lambda: w.seed_prompts(np.random.default_rng(0))):
        with pytest.raises(PromptFileError) as e:
            call()
        msg = str(e.value)
        assert "held.jsonl, line 2" in msg and "seed.jsonl, line 1" in msg and "among the seeds" in msg
        assert "'red CIRCLE'" in msg and "1 more" in msg and "held-out lines 3" in msg


def test_world_bad_file_fails_validation(tmp_path):
    w = world(tmp_path, SEEDS, jsonl({"prompt": "x" * 20}), max_prompt_chars=18)
    with pytest.raises(PromptFileError, match="held.jsonl, line 1: the prompt is 20 characters"):
        w.heldout()


# --------------------------------------------------------------------------- the example files

def example_world() -> PromptsWorld:
    return PromptsWorld(PromptsWorldConfig(seed=SEED_FILE, heldout=HELDOUT_FILE))


@pytest.mark.parametrize("path", [SEED_FILE, HELDOUT_FILE])
def test_example_files_are_shapes_scenes(path):
    prompts = load(path)
    assert len(prompts) == 48 and Counter(p.category for p in prompts) == {c: 8 for c in CATEGORIES}
    for p in prompts:
        assert read(p.text).category == p.category, p
    assert len({p.text for p in prompts}) == 48


def test_example_world_validates_and_heldout_scenes_are_new():
    w = example_world()
    w.validate()
    assert len(w.seed_prompts(np.random.default_rng(0))) == 48 and len(w.heldout()) == 48
    seeds, held = load(SEED_FILE), load(HELDOUT_FILE)
    for cat in ("colors", "counting", "position", "color_attr"):  # enough scenes for both sets: none shared
        assert not {read(p.text).text for p in seeds if p.category == cat} & \
            {read(p.text).text for p in held if p.category == cat}, cat
    assert all(w.category(p.text) == p.category for p in seeds + held)
