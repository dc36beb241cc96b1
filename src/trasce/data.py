"""Prompt files: the benchmark CSVs (I2P, Ring-A-Bell, MMA-Diffusion, P4D, UnlearnDiffAtk), TSV, JSONL
and plain text, read into one validated list of :class:`PromptRow`.

The whole file is validated before anything is returned, so a generation run never starts on a file
that would fail half-way through (and leave a folder with half the images made under one reading of
the file). Every error is a :class:`PromptFileError` with a one-line message that names the file,
the row, the column and the offending value, and says what would have been accepted.

Column rules (first one present wins):

* prompt: ``prompt``, ``adv_prompt``, ``sensitive prompt``
* seed: ``evaluation_seed``, ``sd_seed``, else ``default_seed``
* CFG scale: ``evaluation_guidance``, ``sd_guidance_scale``, else ``default_guidance``
* case name: ``case_number``, else the row's 0-based position among prompt rows, as ``"00000"``

For the seed and the scale the fallback is per cell: an empty cell (what pandas writes for NaN)
falls through to the next column and finally to the default. A column (or JSONL key) that looks like
one of these (``Evaluation_Seed``, ``evaluation_sed``, ``seed``, ``cfg_scale``, ``case_nmber``) while
none of its kind is present is refused: kept as data, it would leave every row at the default.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "CASE_COLUMN",
    "GUIDANCE_COLUMNS",
    "MAX_SEED",
    "PROMPT_COLUMNS",
    "SEED_COLUMNS",
    "other_prompt_columns",
    "PromptFileError",
    "PromptRow",
    "SEED_RANGE",
    "check_case_name",
    "read_prompts",
    "select",
    "shard",
]

PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "adv_prompt", "sensitive prompt")
SEED_COLUMNS: tuple[str, ...] = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS: tuple[str, ...] = ("evaluation_guidance", "sd_guidance_scale")
CASE_COLUMN = "case_number"
#: Every column the reader takes a value from (the rest of a row goes to ``PromptRow.extra``).
READ_COLUMNS: tuple[str, ...] = (*PROMPT_COLUMNS, *SEED_COLUMNS, *GUIDANCE_COLUMNS, CASE_COLUMN)

# torch.Generator.manual_seed accepts values up to 2**64 - 1, but the CPU generator (a 32-bit Mersenne
# Twister) keeps only the low 32 bits: seeds 1 and 2**32 + 1 give the same noise, so the same image.
# Larger seeds are refused up front, with the other row errors, rather than silently repeating others.
MAX_SEED = 2**32 - 1
SEED_RANGE = f"seeds must be between 0 and {MAX_SEED} (2**32 - 1)"
# Structured formats that would otherwise be read as plain text, a prompt per line.
UNREAD_SUFFIXES = (".json", ".parquet", ".xlsx", ".xls", ".yaml", ".yml")
# File names hold 255 bytes; a case name becomes ``.<case>_<k>.png.<12 hex>.tmp`` while its image is written.
MAX_CASE_BYTES = 200
# Python's number parsers read '_' between digits as a separator ("7_5" is 75.0); in a prompt file it is
# more likely a typo or another locale's habit than a thousands separator, so cells holding one are refused.
_UNDERSCORE = "'_' is not read as a digit separator"
# Values quoted in error messages are cut to this many characters so the message stays one line.
_SHOW_CHARS = 60

T = TypeVar("T")


class PromptFileError(ValueError):
    """A prompt file that cannot be used as it is.

    ``str(error)`` is one line naming the file, row, column and value. When a file has several bad
    rows the message shows the first and counts the rest; all of them are in :attr:`problems`.
    """

    def __init__(self, message: str, problems: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems else [message]


@dataclass(frozen=True)
class PromptRow:
    """One prompt to generate, with everything needed to reproduce it.

    ``row`` is the 1-based line of the file where the record starts (for CSV/TSV the header is line
    1, so the first data record is row 2 unless a quoted field spans lines); it is only for messages.
    ``extra`` holds the row's other columns as strings (e.g. ``categories`` for per-category reports),
    without the prompt, case, seed and guidance columns, whose values are in the fields above.
    ``prompt_column`` is the column (or JSON key) the prompt was read from.
    """

    case: str
    prompt: str
    seed: int
    guidance_scale: float
    row: int
    extra: dict[str, str] = field(default_factory=dict)
    prompt_column: str = "prompt"
    #: ``"seed"`` and/or ``"guidance_scale"`` where the row has no value for it (no column or key, or empty cells),
    #: so that it took the default (see :func:`defaulted_cells`)
    defaulted: tuple[str, ...] = field(default=(), compare=False)


# --------------------------------------------------------------------------------------------------
# Small helpers


def _show(value: object) -> str:
    """``repr`` of a value, shortened so that error messages stay on one line."""
    text = repr(value)
    if len(text) > _SHOW_CHARS:
        text = text[: _SHOW_CHARS - 4] + "...'"
    return text


def _one_of(names: Sequence[str]) -> str:
    """``'prompt'``, or ``one of 'prompt', 'adv_prompt'``: what a prompt file's header must hold."""
    return repr(names[0]) if len(names) == 1 else f"one of {_quoted_list(names)}"


def _quoted_list(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def check_case_name(case: str) -> str | None:
    """Return why ``case`` cannot be used as a file name, or ``None`` when it can.

    Case names become ``images/<case>.png``, so anything that could step out of the folder or hide
    the file is refused. Letters, digits, ``-``, ``_`` and ``.`` are always fine; other printable
    characters (spaces, for instance) are allowed because the file systems we run on accept them.
    """
    if case == "":
        return "case name is empty"
    if "/" in case or "\\" in case:
        return "case name contains a path separator ('/' or '\\')"
    if "\0" in case:
        return "case name contains a NUL character"
    if ".." in case or case == ".":
        return "case name contains '..' or is '.'"
    if case.startswith("."):
        return "case name starts with '.', which would hide its image (and look like a temporary file)"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in case):
        return "case name contains a control character"
    if case != case.strip():
        return "case name starts or ends with whitespace"
    if len(case.encode("utf-8")) > MAX_CASE_BYTES:
        return (f"case name is {len(case.encode('utf-8'))} bytes long in UTF-8; at most {MAX_CASE_BYTES} fit in "
                "a file name beside the image number and temporary suffix")
    return None


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _parse_seed(value: Any) -> tuple[int | None, str | None]:
    """Parse a seed cell into ``(seed, None)`` or ``(None, why_not)``.

    ``Decimal`` is used instead of ``float`` so that "42.0" is accepted (I2P writes seeds that way)
    while a large seed keeps every digit instead of being rounded through a double.
    """
    if isinstance(value, bool):  # JSON true/false are ints to Python; never a seed.
        return None, "is not an integer seed"
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, str) and "_" in value:
        return None, f"is not an integer seed ({_UNDERSCORE})"
    elif re.fullmatch(r"\s*[+-]?[\d.]+[eE][+-]?\d+\s*", value if isinstance(value, str) else
                      getattr(value, "text", "")):  # (a JSON number keeps its text: _JsonFloat)
        return None, ("is in exponent notation, which spreadsheets write for large numbers after dropping "
                      "digits; write the seed in plain digits")
    elif isinstance(value, (float, str)):
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            return None, "is not an integer seed"
    else:
        return None, "is not an integer seed"
    if not number.is_finite() or number != number.to_integral_value():
        return None, "is not an integer seed"
    seed = int(number)
    if seed < 0:
        return None, f"is a negative seed; {SEED_RANGE}"
    if seed > MAX_SEED:
        return None, (f"is too large for a seed; {SEED_RANGE}: torch's CPU generator uses only the low 32 bits, "
                      "so a larger seed would repeat a smaller one's image")
    return seed, None


def _parse_guidance(value: Any) -> tuple[float | None, str | None]:
    """Parse a CFG-scale cell into ``(scale, None)`` or ``(None, why_not)``."""
    if isinstance(value, bool):
        return None, "is not a number (expected a guidance scale such as 7.5)"
    if isinstance(value, str) and "_" in value:
        return None, f"is not a number (expected a guidance scale such as 7.5; {_UNDERSCORE})"
    try:
        scale = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None, "is not a number (expected a guidance scale such as 7.5)"
    if not math.isfinite(scale):
        return None, "is not a finite number (expected a guidance scale such as 7.5)"
    return scale, None


def _cell_text(value: Any) -> str:
    """Text of a JSON value for ``PromptRow.extra`` (lists and objects stay JSON)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _case_text(value: Any) -> str | None:
    """A ``case_number`` value as a string; ``None`` when its type cannot name a file."""
    if isinstance(value, (bool, list, dict)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # JSON written by pandas turns 12 into 12.0
    if value is None:
        return ""
    return str(value).strip()


# --------------------------------------------------------------------------------------------------
# Turning records into rows


class _Collector:
    """Gathers problems across the whole file so that one call reports them all."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.problems: list[str] = []

    def add(self, row: int | None, column: str | None, message: str) -> None:
        where = self.name
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        self.problems.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        first = self.problems[0]
        more = len(self.problems) - 1
        if more:
            first += f" (and {more} more problem{'s' if more > 1 else ''} in this file)"
        raise PromptFileError(first, self.problems)


# Names that people give the columns trasce reads, which it would otherwise keep as data while every
# row got the default: (what the column holds, the names read, other common names, the default).
_READ_ELSEWHERE: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str], ...] = (
    ("seed", SEED_COLUMNS, ("seed", "seeds", "random_seed"), "every row would get --seed"),
    ("CFG scale", GUIDANCE_COLUMNS, ("guidance", "guidance_scale", "cfg", "cfg_scale", "scale"),
     "every row would get --guidance-scale"),
    ("case name", (CASE_COLUMN,), ("case", "case_id"), "images would be named by their row's position"),
)


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _unread_lookalikes(columns: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(column, why)`` for each column that looks like one trasce reads while no column of that kind
    is present: another case or separator (``Evaluation-Seed``), a typo (one edit, two in names of 12
    characters or more: ``evaluation_sed``, ``case_nmber``), or a common name for it (``seed``, ``cfg``)."""
    columns = list(columns)
    for kind, names, aliases, default in _READ_ELSEWHERE:
        if any(name in columns for name in names):
            continue
        for column in columns:
            key = re.sub(r"[\s-]+", "_", column.strip().lower())
            match = next((name for name in names if _edit_distance(key, name) <= (2 if len(name) >= 12 else 1)),
                         names[0] if key in aliases else None)
            if match is not None:
                read = " or ".join(repr(name) for name in names)
                yield column, (f"is not read: trasce takes the {kind} from {read}, and without it {default}; "
                               f"rename the column to {match!r} (or, if it holds something else, to a name unlike "
                               "these)")


def _rows_from_records(
    records: Iterable[tuple[int, Mapping[str, Any]]],
    collector: _Collector,
    default_seed: int,
    default_guidance: float,
    prompt_columns: tuple[str, ...],
) -> list[PromptRow]:
    """Validate ``(row_number, record)`` pairs into prompt rows; problems go to ``collector``.

    The prompt key is chosen per record: CSV records all share the header (already checked to have
    a prompt column), while each JSONL object may name its prompt differently.
    """
    rows: list[PromptRow] = []
    # Keyed by the name as a case-insensitive file system (macOS, Windows) compares it: 'A' and 'a', or é
    # composed and decomposed, would be one file there, the second image overwriting the first.
    first_of_case: dict[str, tuple[int, str]] = {}

    for index, (row_number, record) in enumerate(records):
        prompt_key = next((k for k in prompt_columns if k in record), None)
        if prompt_key is None:
            # Only reachable for JSONL (CSV headers are checked once, before any row).
            collector.add(
                row_number,
                None,
                f"no prompt key; expected {_one_of(prompt_columns)} (found: {_quoted_list(record.keys())})",
            )
            continue
        raw_prompt = record[prompt_key]
        ok = True
        if not isinstance(raw_prompt, str) and raw_prompt is not None:
            collector.add(row_number, prompt_key, f"{_show(raw_prompt)} is not text; prompts must be strings")
            ok = False
            prompt = ""
        else:
            prompt = (raw_prompt or "").strip()
            if not prompt:
                shown = "null" if raw_prompt is None else _show(raw_prompt)
                collector.add(row_number, prompt_key, f"{shown} is an empty prompt")
                ok = False
            elif not _is_unicode(prompt):  # a JSON "\ud800" escape: no tokenizer takes it
                collector.add(row_number, prompt_key, f"{_show(prompt)} holds a lone surrogate (a JSON \\ud800-"
                              "\\udfff escape without its pair), which is no character; write the character itself")
                ok = False

        seed = default_seed
        for column in SEED_COLUMNS:
            if column in record and not _is_empty(record[column]):
                parsed, why = _parse_seed(record[column])
                if why is not None:
                    collector.add(row_number, column, f"{_show(record[column])} {why}")
                    ok = False
                else:
                    assert parsed is not None
                    seed = parsed
                break

        guidance = float(default_guidance)
        for column in GUIDANCE_COLUMNS:
            if column in record and not _is_empty(record[column]):
                parsed_g, why = _parse_guidance(record[column])
                if why is not None:
                    collector.add(row_number, column, f"{_show(record[column])} {why}")
                    ok = False
                else:
                    assert parsed_g is not None
                    guidance = parsed_g
                break

        if CASE_COLUMN in record:
            case = _case_text(record[CASE_COLUMN])
            if case is None:
                collector.add(row_number, CASE_COLUMN, f"{_show(record[CASE_COLUMN])} cannot be used as a case name; "
                                                        "give a number or a text such as 'i2p-0012'")
                ok = False
                case = ""
            else:
                why_unsafe = check_case_name(case)
                if why_unsafe is not None:
                    collector.add(
                        row_number,
                        CASE_COLUMN,
                        f"{_show(case)} is not a safe file name ({why_unsafe}); use "
                        + ("a shorter name" if len(case.encode("utf-8")) > MAX_CASE_BYTES
                           else "letters, digits, '-', '_' and '.'"),
                    )
                    ok = False
        else:
            case = f"{index:05d}"

        if case and check_case_name(case) is None:
            key = unicodedata.normalize("NFC", case.lower())  # lower, not casefold: "ß" and "ss" are two files
            if key in first_of_case:
                first_row, first_case = first_of_case[key]
                why = ("case names must be unique" if first_case == case else
                       "case names must differ in more than upper and lower case (or how accents are encoded), "
                       "since a case-insensitive file system (macOS, Windows) keeps one image for both")
                shown = "" if first_case == case else f" as {first_case!r}"
                collector.add(row_number, CASE_COLUMN,
                              f"duplicate case {case!r} (also on row {first_row}{shown}); {why}")
                ok = False
            else:
                first_of_case[key] = (row_number, case)

        if ok:
            extra = {k: _cell_text(v) for k, v in record.items() if k != prompt_key and k not in READ_COLUMNS}
            # Other prompt-like columns (e.g. 'adv_prompt' next to 'prompt') are data, so keep them.
            extra.update({k: _cell_text(record[k]) for k in PROMPT_COLUMNS if k in record and k != prompt_key})
            defaulted = tuple(name for name, columns in (("seed", SEED_COLUMNS), ("guidance_scale", GUIDANCE_COLUMNS))
                              if all(_is_empty(record.get(c)) for c in columns))
            rows.append(PromptRow(case, prompt, seed, guidance, row_number, extra, prompt_key, defaulted))
    return rows


def defaulted_cells(rows: Sequence[PromptRow], path: str | Path) -> list[str]:
    """One line per kind of value (seed, CFG scale) that some rows of ``path`` left out or empty while others
    gave it (a gap in a seeded file, not a file without seeds), naming the rows and the value they took."""
    lines = []
    for name, shown in (("seed", "seed"), ("guidance_scale", "CFG scale")):
        empty = [row for row in rows if name in row.defaulted]
        if empty and len(empty) < len(rows):
            numbers = ", ".join(str(row.row) for row in empty[:10]) + (", ..." if len(empty) > 10 else "")
            rows_word = "rows" if len(empty) > 1 else "row"
            lines.append(f"{path}: {len(empty)} of {len(rows)} rows give no {shown} ({rows_word} {numbers}), "
                         f"which take {getattr(empty[0], name):g}, the default, instead")
    return lines


# --------------------------------------------------------------------------------------------------
# Formats


def _read_text(path: Path, name: str) -> str:
    """The file's text, with a UTF-8 BOM dropped; I/O and decoding problems become PromptFileError."""
    if not path.exists():
        raise PromptFileError(f"{name}: file not found")
    if path.is_dir():
        raise PromptFileError(f"{name}: is a directory, expected a prompt file (.csv, .tsv, .jsonl, .txt)")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PromptFileError(f"{name}: cannot be read ({error.strerror or error})") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PromptFileError(
            f"{name}: is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); save it as UTF-8"
        ) from error


def _delimited_records(text: str, delimiter: str, collector: _Collector, prompt_columns: tuple[str, ...],
                       every: bool = False) -> Iterator[tuple[int, dict[str, str]]]:
    """Records of a CSV/TSV text as ``(start_line, {column: value})``; blank lines are skipped.

    The header must hold one of ``prompt_columns``, or with ``every`` (a file that is not a prompt file)
    every one of them; only a prompt file's columns are checked for names like the ones trasce reads.
    """
    # StringIO(newline="") splits only on real line ends (str.splitlines would also split on
    # U+2028 and friends inside prompts), which is what the csv module expects.
    # strict: the csv module would otherwise read an unclosed quote to the end of the file, every
    # later row becoming part of one prompt, and drop the quotes of `"a" b` silently. skipinitialspace:
    # `1, "a cat, sitting"` (a space after each comma) quotes its field as `1,"a cat, sitting"` does.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True, skipinitialspace=True)
    try:
        header = next(reader)
    except StopIteration:
        wanted = _quoted_list(prompt_columns) if every else f"one of {_quoted_list(PROMPT_COLUMNS)}"
        raise PromptFileError(f"{collector.name}: empty file; expected a header row with {wanted}") from None
    except csv.Error as error:
        raise PromptFileError(f"{collector.name}, row 1: {_unparsable(error, delimiter, text, 1)}") from None

    # pandas writes its index as an unnamed first column; give such columns a usable name.
    columns = [h.strip() or f"column_{i + 1}" for i, h in enumerate(header)]
    seen: dict[str, int] = {}
    for i, column in enumerate(columns):
        if column in seen:
            raise PromptFileError(
                f"{collector.name}, row 1: column {column!r} appears twice "
                f"(columns {seen[column] + 1} and {i + 1}); column names must be unique"
            )
        seen[column] = i
    missing = [c for c in prompt_columns if c not in seen]
    if every and missing:
        raise PromptFileError(f"{collector.name}: no column {_quoted_list(missing)}; expected "
                              f"{_quoted_list(prompt_columns)} (found: {_quoted_list(columns)})")
    if len(missing) == len(prompt_columns):
        others = [d for d in (",", "\t", ";", "|") if d != delimiter and len(columns) == 1 and d in columns[0]]
        hint = (f"; the header looks {_delimiter_name(others[0])}-separated, but this file is read as "
                f"{_delimiter_name(delimiter)}-separated (.csv: commas, .tsv: tabs)" if others else "")
        raise PromptFileError(
            f"{collector.name}: no prompt column; expected {_one_of(prompt_columns)} (found: {_quoted_list(columns)})"
            + hint
        )
    for column, why in () if every else _unread_lookalikes(columns):
        collector.add(1, column, why)

    line = reader.line_num
    while True:
        start = line + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            collector.add(start, None, _unparsable(error, delimiter, text, start))
            return
        line = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue  # blank line (often trailing)
        if len(cells) > len(columns):
            collector.add(
                start,
                None,
                f"has {len(cells)} fields but the header has {len(columns)}; quote fields that contain the delimiter",
            )
            continue
        # A short row (trailing empty cells dropped by an editor) reads as empty cells.
        cells = cells + [""] * (len(columns) - len(cells))
        yield start, dict(zip(columns, cells, strict=True))


def _delimiter_name(delimiter: str) -> str:
    return "tab" if delimiter == "\t" else repr(delimiter)


def _unparsable(error: csv.Error, delimiter: str, text: str, row: int) -> str:
    """Why a row (counted from 1, the header's) cannot be parsed: the reader's reason, the line, how to quote."""
    name = _delimiter_name(delimiter)
    reason = str(error).replace(f"'{delimiter}'", name)
    line = next((line for number, line in _lines(text) if number == row), "")
    return (f"cannot be parsed ({reason}): {_show(line)}; a field that starts with '\"' must end with '\"' "
            f"before the next {name} or line end, and a '\"' inside it is written '\"\"'")


def _is_unicode(text: str) -> bool:
    """Whether ``text`` is made of characters only (no lone surrogate, which UTF-8 cannot encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` split on ``\r\n``, ``\n`` and a lone ``\r`` (old Mac files) only.

    ``str.splitlines`` is avoided because it also splits on U+2028, U+0085 and other characters that
    JSON strings and prompts may legitimately contain.
    """
    yield from enumerate(re.split(r"\r\n|\r|\n", text), start=1)


class _JsonFloat(float):
    """A JSON number with a fraction or exponent, which keeps the text it was written as (for ``_parse_seed``)."""

    text: str

    def __new__(cls, text: str) -> _JsonFloat:
        number = super().__new__(cls, text)
        number.text = text
        return number

    def __repr__(self) -> str:  # error messages show the number as the file has it (json.dumps uses float's)
        return self.text


def _jsonl_records(text: str, collector: _Collector) -> Iterator[tuple[int, dict[str, Any]]]:
    checked: set[frozenset[str]] = set()  # each object may have its own keys; each set is checked once
    for line_number, line in _lines(text):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_float=_JsonFloat)
        except json.JSONDecodeError as error:
            collector.add(line_number, None, f"invalid JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(record, dict):
            collector.add(line_number, None, f'expected a JSON object such as {{"prompt": ...}}, got {_show(record)}')
            continue
        if frozenset(record) not in checked:
            checked.add(frozenset(record))
            for key, why in _unread_lookalikes(record):
                collector.add(line_number, key, why)
        yield line_number, record


def _text_records(text: str, name: str, suffix: str) -> Iterator[tuple[int, dict[str, str]]]:
    first = True
    for line_number, line in _lines(text):
        if not line.strip():
            continue
        if first:
            _refuse_a_header(line, line_number, name, suffix)
            first = False
        yield line_number, {"prompt": line}


def _refuse_a_header(line: str, line_number: int, name: str, suffix: str) -> None:
    """Refuse a plain-text file whose first line is a table's header: its rows would become prompts."""
    delimiter = "\t" if "\t" in line and "," not in line else ","
    cells = [cell.strip().strip('"').strip().lower() for cell in line.lstrip("\ufeff").split(delimiter)]
    column = next((cell for cell in cells if cell in READ_COLUMNS), None)
    if column is not None:
        kind = "CSV" if delimiter == "," else "TSV"
        extension = f"its extension {suffix!r}" if suffix else "it has no extension"
        raise PromptFileError(
            f"{name}, line {line_number}: {_show(line)} looks like a {kind} header (column {column!r}), but the file "
            f"is read as plain text, one prompt per line, because {extension}; rename it to .{kind.lower()}"
            + ("" if len(cells) > 1 else " (quoting prompts that hold commas), or delete that line"))


def other_prompt_columns(rows: Sequence[PromptRow]) -> list[str]:
    """The prompt columns (``PROMPT_COLUMNS``) that ``rows`` hold besides the one read, kept in ``extra``."""
    return sorted({key for row in rows for key in row.extra if key in PROMPT_COLUMNS})


def read_prompts(path: str | Path, default_seed: int = 42, default_guidance: float = 7.5,
                 prompt_column: str | None = None) -> list[PromptRow]:
    """Read and validate a prompt file.

    ``prompt_column`` names the column (or JSON key) that holds the prompts; by default the first of
    ``PROMPT_COLUMNS`` that a row has. The other prompt columns are kept in each row's ``extra``.

    The format comes from the extension (case-insensitive): ``.csv``, ``.tsv``, ``.jsonl`` (or
    ``.ndjson``); ``UNREAD_SUFFIXES`` (a JSON array, spreadsheets) are refused; anything else is plain
    text with one prompt per non-empty line. Prompts are stripped of surrounding
    whitespace. Raises :class:`PromptFileError` if the file is missing, unreadable, has no prompt
    column, has a column that looks like one trasce reads but is not read, has no prompts at all, or
    has any bad row (every row is checked before raising).
    """
    path = Path(path)
    name = str(path)
    seed_ok, why = _parse_seed(default_seed)
    if why is not None:
        raise PromptFileError(f"default seed (--seed) {_show(default_seed)} {why}")
    assert seed_ok is not None
    _, why = _parse_guidance(default_guidance)
    if why is not None:
        raise PromptFileError(f"default guidance scale (--guidance-scale) {_show(default_guidance)} {why}")

    text = _read_text(path, name)
    collector = _Collector(name)
    suffix = path.suffix.lower()
    columns = PROMPT_COLUMNS if prompt_column is None else (prompt_column,)
    records: Iterable[tuple[int, Mapping[str, Any]]]
    if suffix == ".csv":
        records = _delimited_records(text, ",", collector, columns)
    elif suffix == ".tsv":
        records = _delimited_records(text, "\t", collector, columns)
    elif suffix in (".jsonl", ".ndjson"):
        records = _jsonl_records(text, collector)
    elif suffix in UNREAD_SUFFIXES:
        raise PromptFileError(f"{name}: {suffix} files are not read; give CSV (.csv), TSV (.tsv), JSON lines "
                              "(.jsonl, one object per line) or plain text (one prompt per line)")
    elif prompt_column is not None:
        raise PromptFileError(f"{name}: a prompt column ({prompt_column!r}) is for CSV, TSV and JSON lines files; "
                              "this one is read as plain text, one prompt per line")
    else:
        records = _text_records(text, name, suffix)

    rows = _rows_from_records(records, collector, seed_ok, default_guidance, columns)
    collector.raise_if_any()
    if not rows:
        raise PromptFileError(f"{name}: no prompts found")
    return rows


def read_columns(path: str | Path, columns: tuple[str, ...], what: str) -> list[dict[str, str]]:
    """The rows of the CSV file ``path``, a ``what`` (a file other than a prompt file), as ``{column: text}``
    with every one of ``columns`` filled in (stripped of surrounding whitespace).

    Raises :class:`PromptFileError` naming the file, and the row and column of every problem: a file
    missing, unreadable, not UTF-8 or not ``.csv``, a column missing, a row that cannot be parsed, an empty
    cell, no rows.
    """
    path = Path(path)
    name = str(path)
    if path.suffix.lower() != ".csv":
        raise PromptFileError(f"{name}: a {what} is read as CSV; give a .csv file with columns "
                              f"{_quoted_list(columns)}")
    collector = _Collector(name)
    rows = []
    for line, record in _delimited_records(_read_text(path, name), ",", collector, columns, every=True):
        values = {column: record[column].strip() for column in columns}
        for column in columns:
            if not values[column]:
                collector.add(line, column, f"empty; every row of a {what} fills {_quoted_list(columns)}")
        rows.append(values)
    collector.raise_if_any()
    if not rows:
        raise PromptFileError(f"{name}: no rows")
    return rows


# --------------------------------------------------------------------------------------------------
# Choosing which rows a process works on


def select(rows: Sequence[T], start: int | None = None, end: int | None = None) -> list[T]:
    """Rows ``start`` (inclusive) to ``end`` (exclusive) by position; ``None`` means the file's edge.

    An ``end`` past the last row is clamped, so ``--end 1000000`` means "to the end". Negative
    values are refused rather than counted from the end, because on the command line they are far
    more likely to be typos than requests for Python slicing.
    """
    if start is not None and start < 0:
        raise ValueError(f"start (--start) must be 0 or more, got {start}")
    if end is not None and end < 0:
        raise ValueError(f"end (--end) must be 0 or more, got {end}")
    if start is not None and end is not None and start > end:
        raise ValueError(f"start (--start {start}) is after end (--end {end}); start is inclusive and end exclusive")
    return list(rows[start:end])


def shard(rows: Sequence[T], index: int, count: int) -> list[T]:
    """The rows process ``index`` of ``count`` should handle: every ``count``-th row from ``index``.

    Round-robin rather than contiguous blocks, so that processes finish at about the same time even
    when prompt difficulty (or length) drifts along the file. Every row is in exactly one shard.
    """
    if count < 1:
        raise ValueError(f"number of shards must be 1 or more, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"shard index must be between 0 and {count - 1}, got {index}")
    return list(rows[index::count])
