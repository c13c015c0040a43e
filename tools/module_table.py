"""Passed / failed / skipped per test module, from pytest's JUnit XML (``make test-newer`` prints it).

    python tools/module_table.py out/test-newer.xml [out/test-newer-sdxl.xml ...]

Prints a Markdown table, one row per module (several files: their runs added up), and a total
row. Errors (a fixture that failed) count as failed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

COLUMNS = ("passed", "failed", "skipped")


def module_counts(*xml_paths: Path) -> dict[str, collections.Counter]:
    """``{"tests/test_x.py": Counter(passed=.., failed=.., skipped=..), ...}`` in file order."""
    counts: dict[str, collections.Counter] = {}
    cases = [case for path in xml_paths for case in ET.parse(path).getroot().iter("testcase")]
    for case in cases:
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
    parser.add_argument("xml", type=Path, nargs="+", help="pytest --junitxml output(s)")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.xml if not path.is_file()]
    if missing:
        print(f"{', '.join(missing)}: no such file (did pytest run?)", file=sys.stderr)
        return 1
    print(table(module_counts(*args.xml)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
