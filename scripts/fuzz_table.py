"""Merges the rows of one `scripts/fuzz.sh` run into the executions table of a markdown file (between the
`fuzz-run` markers): the targets run this time get their new row, the others keep the row of their last run, so
hour-long runs made one target at a time (on different days) add up to one table.

    python scripts/fuzz_table.py FILE ROWS_FILE      (ROWS_FILE: one markdown row per target, as fuzz.sh writes)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mdtable  # noqa: E402

BEGIN, END = "<!-- fuzz-run:begin -->", "<!-- fuzz-run:end -->"
HEADER = [
    "One row per target, its latest `scripts/fuzz.sh SECONDS TARGET` run (one process, 2 cores shared with other "
    "work; a run stops at SECONDS or at `EDGEPACK_FUZZ_RUNS` executions):",
    "",
    "| target | seconds | date | result | executions | per second | edges covered | corpus files |",
    "|---|---:|---|---|---:|---:|---:|---:|",
]


def target_of(row):
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    return cells[0].strip("`") if cells else ""


def merge(path, new_rows):
    text = open(path).read() if os.path.exists(path) else ""
    old = []
    if BEGIN in text and END in text:
        body = text.split(BEGIN, 1)[1].split(END, 1)[0]
        # Only rows of the current layout (eight cells) are kept; a table of the older layout is replaced.
        old = [line for line in body.splitlines() if line.startswith("| `") and line.count("|") == 9]
    rows = {target_of(r): r for r in old}
    for r in new_rows:
        rows[target_of(r)] = r
    mdtable.replace_between(path, BEGIN, END, "\n".join(HEADER + [rows[t] for t in sorted(rows)]))


if __name__ == "__main__":
    merge(sys.argv[1], [line for line in open(sys.argv[2]).read().splitlines() if line.startswith("|")])
