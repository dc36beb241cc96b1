"""Pictures and HTML for people: labelled image grids and a self-contained report page."""

from __future__ import annotations

import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from trasce.runs import atomic_write_bytes


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def grid(rows: Sequence[Sequence[Image.Image | None]], row_labels: Sequence[str] = (),
         column_labels: Sequence[str] = (), cell: int = 128, label_width: int = 220) -> Image.Image:
    """A labelled grid: ``rows[i][j]`` is shown at ``cell`` px (nearest-neighbour for small images).

    ``None`` leaves a cell blank. Row labels are wrapped to fit ``label_width``.
    """
    font = _font(13)
    n_cols = max((len(r) for r in rows), default=0)
    top = 24 if column_labels else 0
    left = label_width if row_labels else 0
    canvas = Image.new("RGB", (left + n_cols * (cell + 4), top + len(rows) * (cell + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(column_labels):
        draw.text((left + j * (cell + 4) + 4, 5), str(label), fill="black", font=font)
    for i, row in enumerate(rows):
        y = top + i * (cell + 4)
        if row_labels:
            words, lines, line = str(row_labels[i]).split(), [], ""
            for word in words:
                if draw.textlength(f"{line} {word}".strip(), font=font) > label_width - 10 and line:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}".strip()
            lines.append(line)
            draw.multiline_text((4, y + 4), "\n".join(lines[:7]), fill="black", font=font)
        for j, image in enumerate(row):
            if image is None:
                continue
            resample = Image.NEAREST if image.width < cell else Image.LANCZOS
            canvas.paste(image.convert("RGB").resize((cell, cell), resample), (left + j * (cell + 4), y))
    return canvas


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


class Html(str):
    """Text that is already HTML: :func:`table` puts it in as it is, and escapes every other cell."""


def image_tag(path: Path, relative_to: Path, width: int | None = None) -> Html:
    """An ``<img>`` pointing at ``path`` relative to the report's folder (URL-quoted: a case name
    may hold ``#``, ``%`` or ``?``)."""
    # relpath, not resolve: an images/ folder that links elsewhere is still shown through the link
    src = html.escape(quote(Path(os.path.relpath(path, relative_to)).as_posix()))
    size = f' width="{width}"' if width else ""
    return Html(f'<img src="{src}"{size} style="image-rendering: pixelated">')


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; cells are escaped unless they are :class:`Html`."""
    def cell(value: object) -> str:
        return value if isinstance(value, Html) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The same table as Markdown, for READMEs and papers (a ``|`` or line break in a cell escaped, so that
    it stays one cell)."""
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(" ".join(str(cell).split("\n")).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def page(title: str, body: str) -> str:
    """A complete HTML page with a small stylesheet."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: middle; }}
th {{ background: #f3f3f3; }}
.bad {{ color: #b00; font-weight: bold; }} .good {{ color: #070; }}
code {{ background: #f5f5f5; padding: 1px 3px; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


def write_page(path: Path, title: str, body: str) -> Path:
    """Write an HTML report atomically."""
    atomic_write_bytes(path, page(title, body).encode())
    return path
