"""Reading an uploaded TSV file: strictly, within bounds, every refusal one sentence.

The file comes from anyone who is logged in, so nothing in it is trusted: its size, its
encoding, its line count and its cell lengths are all bounded before it is kept, and
what is refused says why (line and column) so the uploader can fix the file.

TSV here is the plain IANA text/tab-separated-values format: one record per line, fields
split by TAB, no quoting. The first line names the columns; every other line has as
many fields as it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

MAX_BYTES = 512 * 1024
MAX_ROWS = 5000
MAX_COLUMNS = 50
MAX_CELL_CHARS = 500
MAX_FILENAME_CHARS = 100
# Unicode's control characters (category Cc). TAB never reaches a field: it splits them.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class TsvError(ValueError):
    """The file is not a TSV file we keep; the message says why, for the uploader."""


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


def parse_tsv(raw: bytes, max_bytes: int = MAX_BYTES) -> Table:
    """The table in ``raw``, or TsvError saying what is wrong with it."""
    if len(raw) > max_bytes:
        raise TsvError(f"the file is larger than {max_bytes // 1024} KiB")
    if not raw.strip():
        raise TsvError("the file is empty")
    if b"\x00" in raw:
        raise TsvError("this is a binary file (it contains NUL bytes), not TSV text")
    try:
        text = raw.decode("utf-8-sig")  # a BOM from a spreadsheet's export is not a column name
    except UnicodeDecodeError as exc:
        raise TsvError(f"not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    # Only "\n" ends a line (with an optional "\r" before it): str.splitlines() would also
    # split on form feeds and U+2028 inside a cell, moving fields between rows.
    lines = text.split("\n")
    while lines and not lines[-1].strip("\r"):
        lines.pop()
    if len(lines) - 1 > MAX_ROWS:
        raise TsvError(f"more than {MAX_ROWS} rows")
    table: list[list[str]] = []
    for number, line in enumerate(lines, start=1):
        fields = line[:-1].split("\t") if line.endswith("\r") else line.split("\t")
        if number == 1:
            if len(fields) > MAX_COLUMNS:
                raise TsvError(f"line 1: {len(fields)} columns, at most {MAX_COLUMNS} are kept")
            if not any(field.strip() for field in fields):
                raise TsvError("line 1: the header names no column")
        elif len(fields) != len(table[0]):
            raise TsvError(f"line {number}: {len(fields)} fields, the header has {len(table[0])}"
                           " (fields are separated by TAB characters)")
        for column, field in enumerate(fields, start=1):
            _check_cell(field, number, column)
        table.append(fields)
    if len(table) < 2:
        raise TsvError("the file has a header line but no rows")
    return Table(header=table[0], rows=table[1:])


def _check_cell(field: str, line: int, column: int) -> None:
    if len(field) > MAX_CELL_CHARS:
        raise TsvError(f"line {line}, column {column}: longer than {MAX_CELL_CHARS} characters")
    # Control characters (a stray "\r", ESC, a form feed) mean a file that is not plain
    # text; shown in a table they would be invisible, so say where they are.
    control = _CONTROL.search(field)
    if control:
        raise TsvError(f"line {line}, column {column}: control character U+{ord(control.group()):04X}")


def display_filename(name: str | None) -> str:
    """The uploaded file's name as we show it: its last path part, bounded, never empty."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(char for char in base if unicodedata.category(char)[0] != "C").strip()
    return base[:MAX_FILENAME_CHARS] or "upload.tsv"
