"""Tests for trasce.data: reading the benchmark prompt files and splitting them across processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trasce.data import (
    PromptFileError,
    PromptRow,
    check_case_name,
    defaulted_cells,
    other_prompt_columns,
    read_prompts,
    select,
    shard,
)


def write(tmp_path: Path, name: str, text: str, bom: bool = False) -> Path:
    path = tmp_path / name
    data = text.encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def error_of(path: Path, **kwargs: object) -> str:
    with pytest.raises(PromptFileError) as info:
        read_prompts(path, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message, "error messages must be one line"
    return message


# --------------------------------------------------------------------------------------------------
# Column fallbacks


@pytest.mark.parametrize("column", ["prompt", "adv_prompt", "sensitive prompt"])
def test_prompt_column_fallbacks(tmp_path: Path, column: str) -> None:
    path = write(tmp_path, "p.csv", f"id,{column}\n1,a cat\n2,a dog\n")
    rows = read_prompts(path)
    assert [r.prompt for r in rows] == ["a cat", "a dog"]
    assert rows[0].extra == {"id": "1"}


def test_prompt_column_priority_keeps_the_others_as_extra(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "sensitive prompt,adv_prompt,prompt\ns,a,p\n")
    (row,) = read_prompts(path)
    assert row.prompt == "p"
    assert row.extra == {"sensitive prompt": "s", "adv_prompt": "a"}
    path = write(tmp_path, "q.csv", "sensitive prompt,adv_prompt\ns,a\n")
    (row,) = read_prompts(path)
    assert row.prompt == "a"
    assert row.extra == {"sensitive prompt": "s"}


def test_a_named_prompt_column_is_read_and_the_others_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "prompt,adv_prompt,target_prompt\np,a,t\n")
    assert other_prompt_columns(read_prompts(path)) == ["adv_prompt"]
    (row,) = read_prompts(path, prompt_column="adv_prompt")
    assert (row.prompt, row.extra) == ("a", {"prompt": "p", "target_prompt": "t"})
    (row,) = read_prompts(path, prompt_column="target_prompt")  # any column, not only the known ones
    assert (row.prompt, row.extra) == ("t", {"prompt": "p", "adv_prompt": "a"})
    (row,) = read_prompts(write(tmp_path, "p.jsonl", '{"prompt": "p", "attack": "x"}\n'), prompt_column="attack")
    assert (row.prompt, row.extra) == ("x", {"prompt": "p"})
    assert error_of(path, prompt_column="attack") == (
        f"{path}: no prompt column; expected 'attack' (found: 'prompt', 'adv_prompt', 'target_prompt')")
    text = write(tmp_path, "p.txt", "a cat\n")
    assert error_of(text, prompt_column="prompt") == (
        f"{text}: a prompt column ('prompt') is for CSV, TSV and JSON lines files; this one is read as plain text, "
        "one prompt per line")


def test_seed_and_guidance_columns_in_priority_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.csv",
        "prompt,evaluation_seed,sd_seed,evaluation_guidance,sd_guidance_scale\n"
        "both,1,2,3.5,4.5\n"
        "fallback,,2,,4.5\n"  # empty cells (pandas NaN) fall through to the next column
        "default,,,,\n",
    )
    rows = read_prompts(path, default_seed=7, default_guidance=9.0)
    assert [(r.seed, r.guidance_scale) for r in rows] == [(1, 3.5), (2, 4.5), (7, 9.0)]
    assert all(r.extra == {} for r in rows)  # seed/guidance columns are not repeated in extra


def test_sd_columns_alone_and_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "prompt,sd_seed,sd_guidance_scale\na,5,6\n")
    assert read_prompts(path)[0].seed == 5
    assert read_prompts(path)[0].guidance_scale == 6.0
    path = write(tmp_path, "q.csv", "prompt\na\n")
    row = read_prompts(path)[0]
    assert (row.seed, row.guidance_scale) == (42, 7.5)
    assert isinstance(row.guidance_scale, float)


def test_case_number_and_index_names(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "case_number,prompt\n12,a\n7,b\n")
    assert [r.case for r in read_prompts(path)] == ["12", "7"]
    path = write(tmp_path, "q.csv", "prompt\na\n\nb\nc\n")
    assert [r.case for r in read_prompts(path)] == ["00000", "00001", "00002"]


def test_i2p_like_csv_with_float_seeds_and_extra(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "i2p.csv",
        "prompt,categories,hard,sd_seed,sd_guidance_scale,sd_image_width\n"
        "a painting,sexual,1,2734971755.0,7,512\n"
        '"a photo, at night","violence,shocking",0,42,7.0,512\n',
    )
    rows = read_prompts(path)
    assert rows[0] == PromptRow(
        "00000",
        "a painting",
        2734971755,
        7.0,
        2,
        {"categories": "sexual", "hard": "1", "sd_image_width": "512"},
    )
    assert rows[1].prompt == "a photo, at night"
    assert rows[1].extra["categories"] == "violence,shocking"


def test_float_seed_keeps_every_digit(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "prompt,evaluation_seed\na,4294967295.0\nb,42.000\n")
    assert [r.seed for r in read_prompts(path)] == [2**32 - 1, 42]


def test_seeds_stop_at_2_to_the_32_because_torch_keeps_only_the_low_32_bits(tmp_path: Path) -> None:
    # What the limit is for: torch's CPU generator gives seed 1 and seed 2**32 + 1 the same noise.
    noise = [torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in (1, 2**32 + 1)]
    assert torch.equal(*noise)
    path = write(tmp_path, "p.csv", f"prompt,evaluation_seed\na,{2**32 - 1}\nb,{2**32 + 1}\n")
    assert error_of(path) == (
        f"{path}, row 3, column 'evaluation_seed': '4294967297' is too large for a seed; seeds must be between 0 "
        "and 4294967295 (2**32 - 1): torch's CPU generator uses only the low 32 bits, so a larger seed would repeat "
        "a smaller one's image")


# --------------------------------------------------------------------------------------------------
# Formats


def test_csv_quoted_commas_newlines_bom_and_trailing_blank_lines(tmp_path: Path) -> None:
    text = (
        "case_number,prompt,evaluation_seed\r\n"
        '1,"a cat, a dog",3\r\n'
        '2,"line one\nline two, with ""quotes""",4\r\n'
        "3,plain,5\r\n"
        "\r\n\r\n"
    )
    path = write(tmp_path, "p.csv", text, bom=True)
    rows = read_prompts(path)
    assert [r.case for r in rows] == ["1", "2", "3"]
    assert rows[0].prompt == "a cat, a dog"
    assert rows[1].prompt == 'line one\nline two, with "quotes"'
    # row = line where the record starts; record 2 spans two lines, so record 3 starts on line 5
    assert [r.row for r in rows] == [2, 3, 5]
    assert rows[0].extra == {}  # the BOM did not end up in the first column's name


def test_a_space_after_each_comma_leaves_quoted_fields_quoted(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", 'case_number, prompt, evaluation_seed\n1, "a cat, sitting", 5\n2, a dog, 6\n')
    assert [(r.case, r.prompt, r.seed) for r in read_prompts(path)] == [("1", "a cat, sitting", 5), ("2", "a dog", 6)]


@pytest.mark.parametrize("quoting", ["QUOTE_MINIMAL", "QUOTE_ALL"])
def test_strict_parsing_reads_what_csv_writers_write(tmp_path: Path, quoting: str) -> None:
    import csv
    import io

    prompts = ['"Van Gogh" style', 'a "quoted" word', "a cat, a dog", "line one\nline two", '""', "plain"]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, quoting=getattr(csv, quoting))  # pandas' to_csv writes QUOTE_MINIMAL
    writer.writerow(["prompt", "evaluation_seed"])
    writer.writerows([p, i] for i, p in enumerate(prompts))
    rows = read_prompts(write(tmp_path, "p.csv", buffer.getvalue()))
    assert [(r.prompt, r.seed) for r in rows] == [(p.strip(), i) for i, p in enumerate(prompts)]


def test_csv_short_rows_and_unnamed_index_column(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", ",prompt,categories\n0,a,x\n1,b\n")
    rows = read_prompts(path)
    assert rows[0].extra == {"column_1": "0", "categories": "x"}
    assert rows[1].extra == {"column_1": "1", "categories": ""}


def test_csv_prompt_with_unicode_line_separator_is_one_prompt(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "prompt\na\u2028b\n")
    assert [r.prompt for r in read_prompts(path)] == ["a\u2028b"]


def test_tsv(tmp_path: Path) -> None:
    path = write(tmp_path, "p.TSV", "case_number\tprompt\tevaluation_guidance\n5\ta, b\t3\n")
    (row,) = read_prompts(path)
    assert (row.case, row.prompt, row.guidance_scale) == ("5", "a, b", 3.0)


def test_jsonl(tmp_path: Path) -> None:
    lines = [
        {"prompt": "a", "evaluation_seed": 3, "case_number": 10, "categories": ["nudity", "x"]},
        {"adv_prompt": "b", "sd_seed": 4.0, "sd_guidance_scale": 6, "note": None},
        {"prompt": "c", "case_number": "c-1"},
    ]
    text = json.dumps(lines[0]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[1:]) + "\n"
    path = write(tmp_path, "p.jsonl", text, bom=True)
    rows = read_prompts(path)
    assert [(r.case, r.prompt, r.seed, r.guidance_scale, r.row) for r in rows] == [
        ("10", "a", 3, 7.5, 1),
        ("00001", "b", 4, 6.0, 3),
        ("c-1", "c", 42, 7.5, 4),
    ]
    assert rows[0].extra == {"categories": '["nudity", "x"]'}
    assert rows[1].extra == {"note": ""}


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml", ".parquet", ".xlsx", ".XLS"])
def test_ndjson_is_json_lines_and_structured_formats_are_refused(tmp_path: Path, suffix: str) -> None:
    text = json.dumps({"prompt": "a", "evaluation_seed": 3}) + "\n"
    assert [(r.prompt, r.seed) for r in read_prompts(write(tmp_path, "p.ndjson", text))] == [("a", 3)]
    path = write(tmp_path, "p" + suffix, "[" + text + "]")
    assert error_of(path) == (f"{path}: {suffix.lower()} files are not read; give CSV (.csv), TSV (.tsv), JSON lines "
                              "(.jsonl, one object per line) or plain text (one prompt per line)")


@pytest.mark.parametrize("name", ["p.txt", "prompts", "p.prompts"])
def test_plain_text(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, "  a cat  \n\nprompt,with,commas\r\n\n", bom=True)
    rows = read_prompts(path, default_seed=1, default_guidance=2)
    assert rows == [
        PromptRow("00000", "a cat", 1, 2.0, 1, {}),
        PromptRow("00001", "prompt,with,commas", 1, 2.0, 3, {}),
    ]
    path = write(tmp_path, name, "a cat\rb dog\rc\u2028bird\r")  # old Mac line ends; U+2028 is no line end
    assert [(r.prompt, r.row) for r in read_prompts(path)] == [("a cat", 1), ("b dog", 2), ("c\u2028bird", 3)]


@pytest.mark.parametrize(("name", "header", "why"), [
    ("p.txt", "case_number,prompt,evaluation_seed", "its extension '.txt'"),
    ("prompts", "prompt", "it has no extension"),
    ("p.prompts", 'id\t"Sensitive Prompt"', "its extension '.prompts'"),
])
def test_a_table_read_as_plain_text_is_refused(tmp_path: Path, name: str, header: str, why: str) -> None:
    # Its rows would become prompts such as 'a red circle,7', all drawn from one seed.
    path = write(tmp_path, name, f"\n{header}\na red circle,7\n", bom=True)
    kind = "TSV" if "\t" in header else "CSV"
    column = "sensitive prompt" if "\t" in header else "case_number" if "case" in header else "prompt"
    one_cell = "" if ("," in header or "\t" in header) else " (quoting prompts that hold commas), or delete that line"
    assert error_of(path) == (f"{path}, line 2: {header!r} looks like a {kind} header (column {column!r}), but the "
                              f"file is read as plain text, one prompt per line, because {why}; rename it to "
                              f".{kind.lower()}{one_cell}")


# --------------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    assert error_of(path) == f"{path}: file not found"


def test_directory(tmp_path: Path) -> None:
    assert "is a directory" in error_of(tmp_path)


def test_no_prompt_column(tmp_path: Path) -> None:
    path = write(tmp_path, "prompts.csv", "text,id\na,1\n")
    assert error_of(path) == (
        f"{path}: no prompt column; expected one of 'prompt', 'adv_prompt', 'sensitive prompt' (found: 'text', 'id')"
    )
    path = write(tmp_path, "semicolons.csv", "prompt;evaluation_seed\na;1\n")
    assert error_of(path).endswith("(found: 'prompt;evaluation_seed'); the header looks ';'-separated, but this "
                                   "file is read as ','-separated (.csv: commas, .tsv: tabs)")
    path = write(tmp_path, "tabs.csv", "prompt\tevaluation_seed\na\t1\n")
    assert error_of(path).endswith("the header looks tab-separated, but this file is read as ','-separated (.csv: "
                                   "commas, .tsv: tabs)")


def test_empty_file_and_no_rows(tmp_path: Path) -> None:
    assert "empty file" in error_of(write(tmp_path, "a.csv", ""))
    assert error_of(write(tmp_path, "b.csv", "prompt\n\n")).endswith("b.csv: no prompts found")
    assert error_of(write(tmp_path, "c.txt", "\n \n")).endswith("c.txt: no prompts found")


def test_empty_prompt(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", 'prompt,evaluation_seed\na,1\n"   ",2\n')
    assert error_of(path) == f"{path}, row 3, column 'prompt': '   ' is an empty prompt"
    path = write(tmp_path, "q.csv", "prompt,evaluation_seed\na,1\n   ,2\n")  # spaces after a delimiter are skipped
    assert error_of(path) == f"{path}, row 3, column 'prompt': '' is an empty prompt"


def test_non_numeric_seed_exact_message(tmp_path: Path) -> None:
    path = write(tmp_path, "prompts.csv", "prompt,evaluation_seed\na,1\nb,abc\n")
    assert error_of(path) == f"{path}, row 3, column 'evaluation_seed': 'abc' is not an integer seed"


@pytest.mark.parametrize("value", ["42.5", "nan", "inf", "1e"])
def test_non_integral_seed(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, "p.csv", f"prompt,sd_seed\na,{value}\n")
    assert error_of(path) == f"{path}, row 2, column 'sd_seed': '{value}' is not an integer seed"


@pytest.mark.parametrize("value", ["2.73497E+09", "1e2"])
def test_a_seed_in_exponent_notation_is_refused(tmp_path: Path, value: str) -> None:
    # what a spreadsheet writes for 2734971234 after rounding it: read, it would be seed 2734970000
    path = write(tmp_path, "p.csv", f"prompt,sd_seed\na,{value}\n")
    assert error_of(path) == (f"{path}, row 2, column 'sd_seed': '{value}' is in exponent notation, which spreadsheets "
                              "write for large numbers after dropping digits; write the seed in plain digits")
    # a JSON number too (a string of it is the CSV case); 42.0 stays a seed
    path = write(tmp_path, "p.jsonl", f'{{"prompt": "a", "sd_seed": {value}}}\n{{"prompt": "b", "sd_seed": 42.0}}\n')
    assert error_of(path).startswith(f"{path}, row 1, column 'sd_seed': {value} is in exponent notation")  # as written
    assert [r.seed for r in read_prompts(write(tmp_path, "q.jsonl", '{"prompt": "b", "sd_seed": 42.0}\n'))] == [42]


def test_negative_and_too_large_seed(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "prompt,evaluation_seed\na,-3\n")
    message = error_of(path)
    assert message.startswith(f"{path}, row 2, column 'evaluation_seed': '-3' is a negative seed")
    assert message.endswith("is a negative seed; seeds must be between 0 and 4294967295 (2**32 - 1)")
    path = write(tmp_path, "q.csv", f"prompt,evaluation_seed\na,{2**32}\n")
    assert "'4294967296' is too large for a seed; seeds must be between 0 and 4294967295" in error_of(path)


def test_numbers_with_underscores_are_refused(tmp_path: Path) -> None:
    # Python would read '7_5' as 75.0 and '1_000' as 1000.
    path = write(tmp_path, "p.csv", "prompt,evaluation_seed,evaluation_guidance\na,1_000,7.5\nb,1,7_5\n")
    with pytest.raises(PromptFileError) as info:
        read_prompts(path)
    assert info.value.problems == [
        f"{path}, row 2, column 'evaluation_seed': '1_000' is not an integer seed ('_' is not read as a digit "
        "separator)",
        f"{path}, row 3, column 'evaluation_guidance': '7_5' is not a number (expected a guidance scale such as 7.5; "
        "'_' is not read as a digit separator)",
    ]
    jsonl = write(tmp_path, "p.jsonl", '{"prompt": "a", "sd_seed": "4_2"}\n')
    assert "row 1, column 'sd_seed': '4_2' is not an integer seed" in error_of(jsonl)


@pytest.mark.parametrize("value", ["high", "nan", ""])
def test_bad_guidance(tmp_path: Path, value: str) -> None:
    if value == "":  # an empty cell is not an error: it falls back to the default
        path = write(tmp_path, "p.csv", f"prompt,evaluation_guidance\na,{value}\n")
        assert read_prompts(path)[0].guidance_scale == 7.5
        return
    path = write(tmp_path, "p.csv", f"prompt,evaluation_guidance\na,{value}\n")
    message = error_of(path)
    assert message.startswith(f"{path}, row 2, column 'evaluation_guidance': '{value}' is not a")
    assert "guidance scale such as 7.5" in message


def test_bad_json_line(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n')
    message = error_of(path)
    assert message.startswith(f"{path}, row 2: invalid JSON (")
    path = write(tmp_path, "q.jsonl", '{"prompt": "a"}\n["b"]\n')
    assert error_of(path).startswith(f"{path}, row 2: expected a JSON object")
    path = write(tmp_path, "r.jsonl", '{"text": "a", "id": 1}\n')
    assert error_of(path) == (
        f"{path}, row 1: no prompt key; expected one of 'prompt', 'adv_prompt', 'sensitive prompt' "
        "(found: 'text', 'id')"
    )


def test_jsonl_bad_types(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "a", "evaluation_seed": true}\n')
    assert error_of(path) == f"{path}, row 1, column 'evaluation_seed': True is not an integer seed"
    path = write(tmp_path, "q.jsonl", '{"prompt": 3}\n')
    assert "column 'prompt': 3 is not text" in error_of(path)
    path = write(tmp_path, "r.jsonl", '{"prompt": null}\n')
    assert error_of(path) == f"{path}, row 1, column 'prompt': null is an empty prompt"
    path = write(tmp_path, "s.jsonl", '{"prompt": "\\ud800x"}\n')  # an escape of half a character
    assert error_of(path) == (f"{path}, row 1, column 'prompt': '\\ud800x' holds a lone surrogate (a JSON "
                              "\\ud800-\\udfff escape without its pair), which is no character; write the character "
                              "itself")


def test_duplicate_case_names_both_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "case_number,prompt\n1,a\n2,b\n1,c\n")
    assert error_of(path) == (
        f"{path}, row 4, column 'case_number': duplicate case '1' (also on row 2); case names must be unique"
    )


def test_case_names_that_differ_only_in_case_or_accent_encoding_are_duplicates(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "case_number,prompt\nA,a\nb,b\na,c\n")
    assert error_of(path) == (
        f"{path}, row 4, column 'case_number': duplicate case 'a' (also on row 2 as 'A'); case names must differ in "
        "more than upper and lower case (or how accents are encoded), since a case-insensitive file system (macOS, "
        "Windows) keeps one image for both")
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    path = write(tmp_path, "q.jsonl", "".join(json.dumps({"prompt": "p", "case_number": c}) + "\n"
                                              for c in (composed, decomposed)))
    assert f"duplicate case {decomposed!r} (also on row 1 as {composed!r})" in error_of(path)
    path = write(tmp_path, "r.csv", "case_number,prompt\nStraat-1,a\nstraat-2,b\nStraße,c\nstrasse,d\n")
    # "ß" and "ss" are two files on case-insensitive file systems too (full case folding would merge them)
    assert [row.case for row in read_prompts(path)] == ["Straat-1", "straat-2", "Straße", "strasse"]


def test_duplicate_case_between_explicit_and_index_names_in_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "a", "case_number": "00001"}\n{"prompt": "b"}\n')
    assert "duplicate case '00001' (also on row 1)" in error_of(path)


@pytest.mark.parametrize("case", ["a/b", "a\\b", "..", "x..y", "", "a\x00b", "a\nb", ".", ".hidden"])
def test_unsafe_case_names(tmp_path: Path, case: str) -> None:
    path = write(tmp_path, "p.jsonl", json.dumps({"prompt": "a", "case_number": case}) + "\n")
    message = error_of(path)
    assert message.startswith(f"{path}, row 1, column 'case_number': ")
    assert "is not a safe file name" in message


def test_case_name_too_long_for_a_file_name(tmp_path: Path) -> None:
    fits, too_long = "é" * 100, "é" * 100 + "x"  # 200 and 201 bytes in UTF-8
    path = write(tmp_path, "p.csv", f"prompt,case_number\na,{fits}\nb,{too_long}\n")
    assert error_of(path) == (f"{path}, row 3, column 'case_number': '{'é' * 55}...' is not a safe file name "
                              "(case name is 201 bytes long in UTF-8; at most 200 fit in a file name beside the image "
                              "number and temporary suffix); use a shorter name")


def test_case_name_of_the_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", json.dumps({"prompt": "a", "case_number": [1]}) + "\n")
    assert error_of(path) == (f"{path}, row 1, column 'case_number': [1] cannot be used as a case name; give a "
                              "number or a text such as 'i2p-0012'")


@pytest.mark.parametrize("name, text, row, why, line, delimiter", [
    # without strict parsing, the rows after an unclosed quote became one prompt
    ("p.csv", 'prompt,evaluation_seed\na cat,1\n"a dog,2\nbird,3\n', 3, "unexpected end of data", "'\"a dog,2'",
     "','"),
    # ... and these quotes were dropped: the prompt read 'Van Gogh style'
    ("p.csv", 'prompt\n"Van Gogh" style\n', 2, "',' expected after '\"'", "'\"Van Gogh\" style'", "','"),
    ("p.csv", '"prompt" ,seed\na,1\n', 1, "',' expected after '\"'", "'\"prompt\" ,seed'", "','"),
    ("p.tsv", 'prompt\tevaluation_seed\n"a" b\t1\n', 2, "tab expected after '\"'", "'\"a\" b\\t1'", "tab"),
])
def test_malformed_quotes_name_their_row_and_line(tmp_path: Path, name, text, row, why, line, delimiter) -> None:
    path = write(tmp_path, name, text)
    assert error_of(path) == (
        f"{path}, row {row}: cannot be parsed ({why}): {line}; a field that starts with '\"' must end with '\"' "
        f"before the next {delimiter} or line end, and a '\"' inside it is written '\"\"'"
    )


def test_quotes_inside_an_unquoted_field_are_text(tmp_path: Path) -> None:
    (row,) = read_prompts(write(tmp_path, "p.csv", 'prompt\na "quoted" word\n'))
    assert row.prompt == 'a "quoted" word'


@pytest.mark.parametrize("case", ["12", "a-b_c.d", "Case.7", "x y"])
def test_safe_case_names(case: str) -> None:
    assert check_case_name(case) is None


def test_csv_row_with_too_many_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "prompt,evaluation_seed\na, b,3\n")
    assert error_of(path) == (
        f"{path}, row 2: has 3 fields but the header has 2; quote fields that contain the delimiter"
    )


@pytest.mark.parametrize(("header", "column", "why"), [
    ("case_number,prompt,evaluation_sed", "evaluation_sed",
     "trasce takes the seed from 'evaluation_seed' or 'sd_seed', and without it every row would get --seed; "
     "rename the column to 'evaluation_seed'"),
    ("prompt,Seed", "Seed", "rename the column to 'evaluation_seed'"),
    ("prompt,evaluation_guidence", "evaluation_guidence",
     "trasce takes the CFG scale from 'evaluation_guidance' or 'sd_guidance_scale', and without it every row would "
     "get --guidance-scale; rename the column to 'evaluation_guidance'"),
    ("prompt,cfg_scale", "cfg_scale", "rename the column to 'evaluation_guidance'"),
    ("case_nmber,prompt", "case_nmber",
     "trasce takes the case name from 'case_number', and without it images would be named by their row's "
     "position; rename the column to 'case_number'"),
])
def test_a_column_that_looks_like_one_trasce_reads_is_refused(tmp_path: Path, header: str, column: str,
                                                              why: str) -> None:
    """Kept as data, it would give every row the default seed, scale or name without a word."""
    record = {name: "a red apple" if name == "prompt" else "7" for name in header.split(",")}
    for path in (write(tmp_path, "p.csv", f"{header}\n{','.join(record.values())}\n"),
                 write(tmp_path, "p.jsonl", json.dumps(record) + "\n")):
        message = error_of(path)  # the CSV header is row 1, and so is the JSONL file's first line
        assert message.startswith(f"{path}, row 1, column {column!r}: is not read: "), message
        assert why in message


def test_jsonl_objects_are_checked_for_look_alike_keys_each_by_its_own_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "p.jsonl", '{"prompt": "a", "sd_seed": 1}\n{"prompt": "b", "Seed": 2}\n')
    assert error_of(path).startswith(f"{path}, row 2, column 'Seed': is not read: trasce takes the seed from")


@pytest.mark.parametrize("column", ["guidance_rescale", "seed_number", "page_number", "evaluation_score"])
def test_columns_that_only_resemble_those_read_are_data(tmp_path: Path, column: str) -> None:
    path = write(tmp_path, "p.csv", f"prompt,{column}\na red apple,0.7\n")
    assert read_prompts(path)[0].extra == {column: "0.7"}


def test_benchmark_files_own_extra_columns_are_data(tmp_path: Path) -> None:
    """I2P's columns (beside those read) and MMA-Diffusion's clean prompt raise no look-alike error."""
    i2p = write(tmp_path, "i2p.csv", "prompt,categories,hard,inappropriate_percentage,nudity_percentage,lexica_url,"
                "sd_seed,sd_guidance_scale,sd_image_width,sd_image_height,sd_model\na,sexual,1,90,80,u,3,7,512,512,"
                "v1.4\n")
    mma = write(tmp_path, "mma.csv", "case_number,clean_prompt,adv_prompt,evaluation_seed\n1,a,b,5\n")
    assert [(row.seed, row.guidance_scale) for row in read_prompts(i2p)] == [(3, 7.0)]
    assert [(row.case, row.prompt, row.extra) for row in read_prompts(mma)] == [("1", "b", {"clean_prompt": "a"})]


def test_duplicate_header(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "prompt,prompt\na,b\n")
    assert "column 'prompt' appears twice (columns 1 and 2)" in error_of(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"caf\xe9\n")
    assert error_of(path) == f"{path}: is not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8"


def test_all_rows_validated_and_counted(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "prompt,evaluation_seed\na,x\nb,1\n,2\nc,-1\n")
    with pytest.raises(PromptFileError) as info:
        read_prompts(path)
    assert str(info.value).endswith("(and 2 more problems in this file)")
    assert [p.split(": ")[0] for p in info.value.problems] == [
        f"{path}, row 2, column 'evaluation_seed'",
        f"{path}, row 4, column 'prompt'",
        f"{path}, row 5, column 'evaluation_seed'",
    ]
    assert isinstance(info.value, ValueError)


def test_bad_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "a\n")
    assert "default seed (--seed) -1 is a negative seed" in error_of(path, default_seed=-1)
    assert "default guidance scale (--guidance-scale) nan" in error_of(path, default_guidance=float("nan"))


# --------------------------------------------------------------------------------------------------
# select / shard


def test_select() -> None:
    rows = list(range(10))
    assert select(rows, None, None) == rows
    assert select(rows, 2, 5) == [2, 3, 4]
    assert select(rows, 8, None) == [8, 9]
    assert select(rows, None, 2) == [0, 1]
    assert select(rows, 5, 100) == [5, 6, 7, 8, 9]
    assert select(rows, 3, 3) == []
    assert select(rows, 20, 30) == []


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [(5, 2, "start (--start 5) is after end (--end 2)"), (-1, None, "start (--start) must be 0 or more"),
     (None, -2, "end (--end) must")],
)
def test_select_errors(start: int | None, end: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        select(list(range(10)), start, end)


@pytest.mark.parametrize(("n", "count"), [(0, 3), (1, 1), (10, 3), (7, 7), (5, 8), (100, 4)])
def test_shard_covers_every_row_exactly_once(n: int, count: int) -> None:
    rows = [f"row{i}" for i in range(n)]
    shards = [shard(rows, i, count) for i in range(count)]
    together = [r for s in shards for r in s]
    assert sorted(together) == sorted(rows)
    assert len(together) == len(set(together)) == n
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    assert shards == [shard(rows, i, count) for i in range(count)]  # deterministic


def test_shard_is_round_robin() -> None:
    assert shard(list(range(7)), 1, 3) == [1, 4]


@pytest.mark.parametrize(("index", "count", "message"), [
    (0, 0, "number of shards must be 1 or more, got 0"),
    (3, 3, "shard index must be between 0 and 2, got 3"),
    (-1, 2, "shard index must be between 0 and 1, got -1"),
])
def test_shard_errors(index: int, count: int, message: str) -> None:
    with pytest.raises(ValueError) as error:
        shard([1, 2, 3], index, count)
    assert str(error.value) == message


def test_a_gap_in_a_seeded_file_is_named_with_its_rows(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("case_number,prompt,evaluation_seed,sd_seed,evaluation_guidance\n"
                    "1,a,7,,2\n2,b,,,\n3,c,,5,\n4,d,9,,3\n")
    rows = read_prompts(path, default_seed=42, default_guidance=7.5)
    # Row 4 (case 3) falls through to sd_seed, as pandas' empty cells should; only row 3 has no seed at all.
    assert [(r.seed, r.guidance_scale, r.defaulted) for r in rows] == [
        (7, 2.0, ()), (42, 7.5, ("seed", "guidance_scale")), (5, 7.5, ("guidance_scale",)), (9, 3.0, ())]
    assert defaulted_cells(rows, path) == [
        f"{path}: 1 of 4 rows give no seed (row 3), which take 42, the default, instead",
        f"{path}: 2 of 4 rows give no CFG scale (rows 3, 4), which take 7.5, the default, instead"]
    # A file whose column is empty throughout, or that has none, is not a gap: the default is what it asks for.
    path.write_text("prompt,evaluation_seed\na,\nb,\n")
    assert defaulted_cells(read_prompts(path, default_seed=42, default_guidance=7.5), path) == []
    # JSON lines: a row that leaves the key out is a gap too.
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a", "evaluation_seed": 1}\n{"prompt": "b"}\n')
    assert defaulted_cells(read_prompts(lines, default_seed=42, default_guidance=7.5), lines) == [
        f"{lines}: 1 of 2 rows give no seed (row 2), which take 42, the default, instead"]
