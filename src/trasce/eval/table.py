"""``trasce table DIR...``: one table of several judged folders, for a paper.

Each folder's ``summary-<label>.json`` (written by ``trasce evaluate``) gives a row: how its images
were made (method or mode), its image count, and its numbers; the columns are the metrics the
summaries hold, in the order they first appear. The judges' protocol lines follow the table, once
per distinct protocol, and a folder that is not complete is marked; a folder's safety-checker note and
its judge's warnings (a toy judge on another model's images) follow as its report shows them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trasce.eval.evaluate import summary_path, table_rows


def _made_with(summary: Mapping[str, Any]) -> str:
    made = summary.get("made_with") or {}
    return str(made.get("method") or made.get("mode") or "-")


def collect(folders: Sequence[str | Path], label: str, metrics: Sequence[str] = ()) -> dict[str, Any]:
    """The table of ``folders``' ``summary-<label>.json``: ``header``, ``rows``, ``notes`` (protocols and
    incomplete folders). ``metrics`` keeps only the metrics whose name holds one of those texts."""
    if not folders:
        raise ValueError("give one or more folders that trasce evaluate has judged")
    summaries = []
    for folder in folders:
        path = summary_path(folder, label)
        if not path.is_file():
            raise ValueError(f"{path} does not exist; judge the folder first (trasce evaluate {folder} --judge "
                             f"JUDGE, with --label {label} unless {label} is the judge's name)")
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error.msg}); run trasce evaluate on {folder} "
                             "again") from error
        if not isinstance(summary, dict):
            raise ValueError(f"{path} holds a JSON {type(summary).__name__}, not a summary object; run trasce "
                             f"evaluate on {folder} again")
        summaries.append((str(folder), summary))

    columns: list[str] = []
    for _, summary in summaries:
        for row in summary.get("table") or []:
            name = str(row.get("metric", ""))
            if name not in columns and (not metrics or any(text in name for text in metrics)):
                columns.append(name)
    if not columns:
        files = ", ".join(str(summary_path(folder, label)) for folder, _ in summaries)
        raise ValueError(f"no metric of {files} matches {', '.join(map(repr, metrics))}" if metrics else
                         f"{files} hold{'s' if len(summaries) == 1 else ''} no numbers (no 'table'); run trasce "
                         "evaluate on the folder again")
    rows = []
    for folder, summary in summaries:
        # evaluate's own cells (value, interval): "12.50 %" and "6.70 - 22.10 %" make "12.50 % (6.70 - 22.10 %)"
        cells = {metric: value + (f" ({interval})" if interval not in ("", "-") else "")
                 for metric, value, interval, _ in table_rows(summary)}
        complete = "" if summary.get("complete") is not False else " (incomplete)"
        rows.append([folder, _made_with(summary), f"{summary.get('images')}{complete}",
                     *(cells.get(name, "") for name in columns)])

    protocols: dict[str, list[str]] = {}
    for folder, summary in summaries:
        protocols.setdefault(f"{summary.get('judge')}: {summary.get('protocol', '')}", []).append(folder)
    notes = [line if len(protocols) == 1 else f"{line} ({', '.join(shown)})" for line, shown in protocols.items()]
    notes.append("Rates with their 95 % Wilson interval in parentheses. Where a prompt has several images, which are "
                 "not independent, the interval is taken on the effective number of images (Korn and Graubard's: the "
                 "design effect of the spread between prompts, and the prompts' degrees of freedom; the summary's "
                 "effective_n).")
    notes += [f"{folder}: {summary['completeness']}" for folder, summary in summaries
              if summary.get("complete") is False and summary.get("completeness")]
    notes += [f"{folder}: {summary['safety_checker']}" for folder, summary in summaries
              if summary.get("safety_checker")]
    notes += [f"{folder}: warning: {line}" for folder, summary in summaries for line in summary.get("warnings") or ()]
    return {"header": ["folder", "method", "images", *columns], "rows": rows, "notes": notes}


def write(table: Mapping[str, Any], markdown: Path | None = None, html_path: Path | None = None) -> str:
    """The table as Markdown (returned, and written to ``markdown``), and as an HTML page at ``html_path``."""
    from trasce.report import markdown_table, write_page
    from trasce.report import table as html_table
    from trasce.runs import atomic_write_bytes

    text = markdown_table(table["header"], table["rows"]) + "\n\n" + "\n".join(f"- {n}" for n in table["notes"])
    if markdown is not None:
        atomic_write_bytes(markdown, (text + "\n").encode("utf-8"))
    if html_path is not None:
        import html

        notes = "".join(f"<li>{html.escape(n)}</li>" for n in table["notes"])
        write_page(html_path, "trasce table", html_table(table["header"], table["rows"]) + f"<ul>{notes}</ul>")
    return text
