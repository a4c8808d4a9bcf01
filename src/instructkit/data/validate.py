"""Row checks and the bad-row report: counts per reason, up to five `file:line: detail` each.

`on_bad_row: error` stops before training with the whole report; `skip` trains on the rest (the
report is kept in the run directory) unless more than `max_bad_fraction` of the rows are bad.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from instructkit.data.formats import Conversation, RowError, detect_format, rename_columns, to_messages
from instructkit.data.preference import PairConversation, to_pair
from instructkit.data.sources import BadRow, Record
from instructkit.errors import user_error

SHOWN_PER_REASON = 5


@dataclass
class BadRowReport:
    rows: int = 0
    bad: list[BadRow] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(b.reason for b in self.bad).most_common())

    def format(self) -> str:
        lines = []
        for reason, count in self.counts().items():
            lines.append(f"  {reason}: {count} row{'s' if count > 1 else ''}")
            shown = [b for b in self.bad if b.reason == reason][:SHOWN_PER_REASON]
            lines += [f"    {b.where}: {b.detail}" for b in shown]
            if count > len(shown):
                lines.append(f"    ... and {count - len(shown)} more")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"rows": self.rows, "bad": len(self.bad), "counts": self.counts(),
                "examples": [{"where": b.where, "reason": b.reason, "detail": b.detail} for b in self.bad[:200]]}


class Converter:
    """Rows -> conversations one at a time (a `PairConversation` for a row of a preference source), keeping
    the format chosen per source index and the valid rows per format. `formats[i]` / `columns[i]` belong to
    source i; an `auto` format is detected from that source's first row."""

    def __init__(self, formats: list[str], columns: list[dict | None]):
        self.formats, self.columns = formats, columns
        self.chosen: dict[int, str] = {}
        self.per_format: Counter = Counter()

    def convert(self, record: Record) -> Conversation | PairConversation | BadRow:
        row = rename_columns(record.data, self.columns[record.source])
        fmt = self.chosen.get(record.source)
        if fmt is None:
            fmt = self.chosen[record.source] = (detect_format(row, record.where)
                                                if self.formats[record.source] == "auto"
                                                else self.formats[record.source])
        try:
            out = to_pair(row, record.where) if fmt == "preference" else Conversation(to_messages(row, fmt),
                                                                                       record.where)
        except RowError as exc:
            return BadRow(record.where, exc.reason, exc.detail)
        self.per_format[fmt] += 1
        return out


def convert_records(records: list[Record], formats: list[str], columns: list[dict | None]
                    ) -> tuple[list[Conversation | PairConversation], list[BadRow], dict[int, str], Counter]:
    """Conversations of the valid rows, the bad rows, the format used per source index, and the valid rows
    per format (see `Converter`)."""
    converter = Converter(formats, columns)
    conversations, bad = [], []
    for record in records:
        out = converter.convert(record)
        (bad if isinstance(out, BadRow) else conversations).append(out)
    return conversations, bad, converter.chosen, converter.per_format


def enforce(report: BadRowReport, on_bad_row: str, max_bad_fraction: float, split: str) -> None:
    """Raise UserError with the whole report when the policy says to stop."""
    if not report.bad:
        return
    share = len(report.bad) / max(report.rows, 1)
    if on_bad_row == "error":
        why, fix = "", ("fix those rows, or set data.on_bad_row: skip to train on the rest "
                        "(the report is kept in the run directory)")
    elif share > max_bad_fraction:
        why, fix = (f", over data.max_bad_fraction={max_bad_fraction}",
                    "check data.format and data.columns, which often explain many bad rows at once")
    else:
        return
    raise user_error(f"{len(report.bad)} of {report.rows} {split} rows are bad ({share:.1%}{why}):\n"
                     f"{report.format()}", None, fix)
