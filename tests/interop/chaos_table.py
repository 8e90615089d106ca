"""Prints the chaos suite's figures (``test-artifacts/chaos.jsonl``, one line per scenario) as the README's
Markdown table.

    python tests/interop/chaos_table.py [test-artifacts/chaos.jsonl]
"""
import json
import sys
from pathlib import Path

COLUMNS = ("scenario", "peer", "fault", "tasks", "lost", "failed", "duplicates", "recovery_s", "health_red")


def main():
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "test-artifacts/chaos.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
