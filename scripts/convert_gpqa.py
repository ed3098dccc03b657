"""Convert the official GPQA CSV into the JSON Lines file that gcache's `gpqa` task reads.

    python scripts/convert_gpqa.py gpqa_diamond.csv "$GCACHE_DATA_DIR/gpqa/gpqa_diamond.jsonl"

Input: a CSV in the official GPQA release layout (`Question`, `Correct Answer`,
`Incorrect Answer 1..3`, `High-level domain`, `Subdomain`, `Explanation`, `Canary String`,
`Record ID`, and other columns that are ignored). Output: one JSON object per row, in file
order, with the fields `record_id`, `question`, `correct_answer`, `incorrect_answers` (3),
`high_level_domain`, `subdomain`, `explanation` and `canary`. Values are copied verbatim (not
stripped; gcache strips the options when it reads them). No shuffling: gcache orders the
options itself, seeded per question. Standard library only; the same CSV gives the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

FIELDS = {  # JSONL field -> CSV column
    "record_id": "Record ID",
    "question": "Question",
    "correct_answer": "Correct Answer",
    "incorrect_answers": ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
    "high_level_domain": "High-level domain",
    "subdomain": "Subdomain",
    "explanation": "Explanation",
    "canary": "Canary String",
}
COLUMNS = [c for col in FIELDS.values() for c in (col if isinstance(col, tuple) else (col,))]


def convert_row(row: dict[str, str]) -> dict:
    """One CSV row -> one JSONL record."""
    return {
        field: [row[c] for c in column] if isinstance(column, tuple) else row[column]
        for field, column in FIELDS.items()
    }


def convert(src: Path, dst: Path) -> int:
    """Write the records of CSV `src` to `dst` (UTF-8, `\\n` line ends); return how many."""
    with src.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"error: {src} lacks the GPQA columns {missing}")
        records = [convert_row(row) for row in reader]
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("w", encoding="utf-8", newline="\n") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="the official GPQA CSV, e.g. gpqa_diamond.csv")
    parser.add_argument("jsonl", type=Path, help="the output, e.g. $GCACHE_DATA_DIR/gpqa/gpqa_diamond.jsonl")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.csv, args.jsonl)} records to {args.jsonl}")


if __name__ == "__main__":
    main()
