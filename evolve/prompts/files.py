"""Prompt files: the seed and held-out prompts a user brings, read and checked.

`load_prompts(src, max_chars)` reads one file (JSON Lines, CSV, TSV, plain text
or Parquet) into `FilePrompt`s, each with the line it came from. Anything wrong
with the file is one `PromptFileError` naming the file, the line and the
problem, raised before the run buys a single image.

Formats, as the common public prompt sets publish them:
- jsonl: one object per line (GenEval's evaluation_metadata.jsonl); blank lines skipped;
- csv: a header row, then RFC 4180 rows, quotes allowed (DrawBench);
- tsv: a header row, then tab-separated rows without quoting (PartiPrompts: a
  prompt may begin with a quote, `"G I G G L E" painted ...`, and keeps it);
- txt: one prompt a line, no header; blank lines and lines starting with `#` skipped;
- parquet: a table; its "line" is the row number (1-based).
"""

from __future__ import annotations

import codecs
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from evolve.config import PromptSource

PROMPT_COLUMNS = ("prompt", "Prompt", "Prompts", "text", "caption")
CATEGORY_COLUMNS = ("category", "Category", "tag", "skill")
ID_COLUMNS = ("id",)
FORMATS = ("jsonl", "csv", "tsv", "txt", "parquet")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "txt",
            ".parquet": "parquet", ".pq": "parquet"}


class PromptFileError(ValueError):
    """A prompt file that cannot be used: `path`, `line` (1-based, or None for the
    whole file) and `problem`, in one message."""

    def __init__(self, path: Path | str, line: int | None, problem: str) -> None:
        self.path, self.line, self.problem = Path(path), line, problem
        super().__init__(f"prompt file {path}" + (f", line {line}" if line else "") + f": {problem}")


@dataclass(frozen=True)
class FilePrompt:
    """One prompt of a file: its id (the file's, else the line number), the text
    (stripped), its category where the file gives one, and the 1-based line or
    row it is on (a CSV/TSV header counts as line 1) so a user can find it."""

    id: str
    text: str
    category: str | None
    line: int


def load_prompts(src: PromptSource, max_chars: int) -> list[FilePrompt]:
    """The prompts of `src.path` in file order (the first `src.limit` of them, if
    set; only those are checked). PromptFileError for a file that is missing,
    empty, not UTF-8, malformed, without a prompt column, or with a bad prompt,
    category or id, or a duplicate id."""
    path = Path(src.path)
    if not path.exists():
        raise PromptFileError(path, None, f"not found (a relative path is read from {Path.cwd()})")
    if path.is_dir():
        raise PromptFileError(path, None, "is a folder, not a file")
    fmt = _format(path, src.format)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PromptFileError(path, None, f"cannot be read ({e.strerror or e})") from None
    if not data.removeprefix(codecs.BOM_UTF8).strip():
        raise PromptFileError(path, None, "is empty")
    if fmt == "txt" and (src.prompt_column or src.category_column or src.id_column):
        raise PromptFileError(path, None, "a plain-text prompt file has no columns; prompt_column, "
                              "category_column and id_column apply to jsonl, csv, tsv and parquet files")

    rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "tsv": _csv_rows, "txt": _txt_rows,
            "parquet": _parquet_rows}[fmt](path, data, src, fmt)
    out: list[FilePrompt] = []
    lines: dict[str, int] = {}  # id -> the line it was first seen on
    for line, row, cols in rows:
        p = _prompt(path, line, row, cols, max_chars)
        if p.id in lines:
            raise PromptFileError(path, line, f"duplicate id {p.id!r}: lines {lines[p.id]} and {line} "
                                  "both have it")
        lines[p.id] = line
        out.append(p)
        if src.limit is not None and len(out) >= src.limit:
            break
    if not out:
        why = {"csv": "only a header row", "tsv": "only a header row", "parquet": "the table has no rows"}
        raise PromptFileError(path, None, f"holds no prompts ({why.get(fmt, 'only blank lines and comments')})")
    return out


# --------------------------------------------------------------------------- formats
# Each yields (line, row, columns): the row's fields by name and the names of
# the columns a prompt, category and id are read from (None where absent).

Cols = tuple[str, "str | None", "str | None"]


def _format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        known = ", ".join(f"{s} ({f})" for s, f in SUFFIXES.items())
        raise PromptFileError(path, None, f"cannot tell the format from the suffix {suffix or '(none)'!r}; "
                              f"auto knows {known}; otherwise set format to one of {', '.join(FORMATS)}")
    return SUFFIXES[suffix]


def _lines(path: Path, data: bytes) -> Iterator[str]:
    """The file's lines, ends kept, decoded as UTF-8 one at a time (so a decoding
    error names its line, and one past a `limit` is never reached); a BOM goes."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    for n, raw in enumerate(data.splitlines(keepends=True), 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = raw[e.start:e.start + 1]
            raise PromptFileError(path, n, f"is not UTF-8 text: byte {e.start + 1} of the line ({bad!r}) is "
                                  f"{e.reason}; save the file as UTF-8") from None


def _pick(given: str | None, names, candidates: tuple[str, ...]) -> str | None:
    """The column `given` names, else the first of `candidates` among `names`."""
    if given is not None:
        return given if given in names else None
    return next((c for c in candidates if c in names), None)


def _missing_prompt(path: Path, line: int | None, src: PromptSource, names, what: str) -> PromptFileError:
    found = ", ".join(repr(n) for n in names) or "none"
    looked = repr(src.prompt_column) if src.prompt_column else ", ".join(map(repr, PROMPT_COLUMNS))
    hint = "" if src.prompt_column else "; set prompt_column to name it"
    return PromptFileError(path, line, f"no prompt column: {what} {found}; looked for {looked}{hint}")


def _jsonl_rows(path: Path, data: bytes, src: PromptSource, fmt: str):
    # Objects need not share keys, so each one's columns are found on its own.
    for line, text in enumerate(_lines(path, data), 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(path, line, f"not valid JSON ({e.msg} at column {e.colno}); "
                                  "a JSON Lines file holds one object per line") from None
        if not isinstance(obj, dict):
            raise PromptFileError(path, line, f"holds {_json_type(obj)} in JSON, not an object; "
                                  "a JSON Lines file holds one object per line")
        prompt = _pick(src.prompt_column, obj, PROMPT_COLUMNS)
        if prompt is None:
            raise _missing_prompt(path, line, src, list(obj), "the object has keys")
        yield line, obj, (prompt, _pick(src.category_column, obj, CATEGORY_COLUMNS),
                          _pick(src.id_column, obj, ID_COLUMNS))


def _csv_rows(path: Path, data: bytes, src: PromptSource, fmt: str):
    # TSV as IANA defines it has no quoting: a field is everything between tabs.
    # CSV is strict: a stray quote is an error here, not a prompt silently cut.
    opts = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {"strict": True}
    reader = csv.reader(_lines(path, data), **opts)
    header: list[str] | None = None
    cols: Cols | None = None
    header_line = 0
    done = 0  # lines the reader had consumed before the current row
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            hint = ": a quote opened in this row is never closed" if "end of data" in str(e) else ""
            raise PromptFileError(path, done + 1, f"not valid {fmt.upper()} ({e}{hint})") from None
        line, done = done + 1, reader.line_num  # a quoted field may span lines: the row starts at done + 1
        if not any(f.strip() for f in fields):
            continue
        if header is None:
            header, header_line = [f.strip() for f in fields], line
            cols = _tabular_columns(path, line, src, header, "the first row, read as the header, has columns")
            continue
        if len(fields) > len(header) and any(f.strip() for f in fields[len(header):]):
            hint = "; a prompt that holds a comma needs quotes" if fmt == "csv" else ""
            raise PromptFileError(path, line, f"{len(fields)} fields, but the header (line {header_line}) has "
                                  f"{len(header)} columns{hint}")
        yield line, dict(zip(header, fields)), cols


def _tabular_columns(path: Path, line: int | None, src: PromptSource, names: list[str], what: str) -> Cols:
    """The (prompt, category, id) columns of a header; a column named in `src`
    must be there."""
    prompt = _pick(src.prompt_column, names, PROMPT_COLUMNS)
    if prompt is None:
        raise _missing_prompt(path, line, src, names, what)
    out: list[str | None] = [prompt]
    for given, candidates, key in ((src.category_column, CATEGORY_COLUMNS, "category_column"),
                                   (src.id_column, ID_COLUMNS, "id_column")):
        col = _pick(given, names, candidates)
        if given is not None and col is None:
            raise PromptFileError(path, line, f"no column {given!r} ({key}): {what} "
                                  + ", ".join(repr(n) for n in names))
        out.append(col)
    return out[0], out[1], out[2]


def _txt_rows(path: Path, data: bytes, src: PromptSource, fmt: str):
    for line, text in enumerate(_lines(path, data), 1):
        if text.strip() and not text.lstrip().startswith("#"):
            yield line, {"prompt": text}, ("prompt", None, None)


def _parquet_rows(path: Path, data: bytes, src: PromptSource, fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise PromptFileError(path, None, f"not a readable Parquet file ({e})") from None
    cols = _tabular_columns(path, None, src, table.column_names, "the table has columns")
    if src.limit is not None:
        table = table.slice(0, src.limit)  # every row is a prompt or an error: no more are needed
    for i, row in enumerate(table.to_pylist()):
        yield i + 1, row, cols


# --------------------------------------------------------------------------- one prompt

def _prompt(path: Path, line: int, row: dict[str, Any], cols: Cols, max_chars: int) -> FilePrompt:
    pcol, ccol, icol = cols
    text = row.get(pcol)
    if text is None:
        raise PromptFileError(path, line, f"the prompt ({pcol!r}) is missing")
    if not isinstance(text, str):
        raise PromptFileError(path, line, f"the prompt ({pcol!r}) is {_json_type(text)}, "
                              f"not a string: {text!r}")
    text = text.strip()
    if not text:
        raise PromptFileError(path, line, f"the prompt ({pcol!r}) is empty")
    if len(text) > max_chars:
        raise PromptFileError(path, line, f"the prompt is {len(text)} characters long, over the limit of "
                              f"{max_chars} (max_prompt_chars)")

    category = row.get(ccol) if ccol is not None else None
    if category is not None and not isinstance(category, str):
        raise PromptFileError(path, line, f"the category ({ccol!r}) is {_json_type(category)}, "
                              f"not a string: {category!r}")
    category = (category or "").strip() or None  # an empty CSV cell is no category

    if icol is None or icol not in row:
        pid = str(line)
    else:
        raw = row[icol]
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise PromptFileError(path, line, f"the id ({icol!r}) is {_json_type(raw)}, "
                                  f"not a string or an integer: {raw!r}")
        pid = str(raw).strip()
        if not pid:
            raise PromptFileError(path, line, f"the id ({icol!r}) is empty")
    return FilePrompt(pid, text, category, line)


def _json_type(v: Any) -> str:
    """A value's type in JSON's words (what a user wrote), else Python's."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(v), f"a {type(v).__name__}")
