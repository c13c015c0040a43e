"""Passed / failed / skipped per test module, from pytest's JUnit XML (``make test-newer`` prints it).

    python tools/module_table.py out/test-newer.xml

Prints a Markdown table, one row per module, and a total row. Errors (a fixture that failed)
count as failed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

COLUMNS = ("passed", "failed", "skipped")


def module_counts(xml_path: Path) -> dict[str, collections.Counter]:
    """``{"tests/test_x.py": Counter(passed=.., failed=.., skipped=..), ...}`` in file order."""
    counts: dict[str, collections.Counter] = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        # classname is "tests.test_x" or "tests.test_x.TestClass"
        parts = case.get("classname", "").split(".")
        module = "/".join(parts[:2]) + ".py" if len(parts) >= 2 else case.get("classname", "?")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        counts.setdefault(module, collections.Counter())[outcome] += 1
    return counts


def table(counts: dict[str, collections.Counter]) -> str:
    rows = ["| module | " + " | ".join(COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    total: collections.Counter = collections.Counter()
    for module, c in counts.items():
        total.update(c)
        rows.append(f"| {module} | " + " | ".join(str(c[k]) for k in COLUMNS) + " |")
    rows.append("| **total** | " + " | ".join(f"**{total[k]}**" for k in COLUMNS) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xml", type=Path, help="pytest --junitxml output")
    args = parser.parse_args(argv)
    if not args.xml.is_file():
        print(f"{args.xml}: no such file (did pytest run?)", file=sys.stderr)
        return 1
    print(table(module_counts(args.xml)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
