"""Plant each bug of ``tools/planted_bugs.json`` by hand, one at a time, run the tests named with it, and report
whether they caught it (failed); the source file is restored after each run.

    .venv/bin/python tools/plant_bugs.py [NAME ...]

Each entry: ``name``, ``file`` (relative to the repository), ``old`` (text that must occur exactly once),
``new`` (the planted bug) and ``tests`` (pytest arguments). The list holds the bugs of issue 15 that the suite
once missed, and a few the redesign could bring back (an upward import, a cycle, ties broken the wrong way).
A pattern no longer found once is reported as such: the code moved, and the entry must follow it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(only: list[str]) -> int:
    specs = json.loads((ROOT / "tools" / "planted_bugs.json").read_text(encoding="utf-8"))
    missed = 0
    for spec in specs:
        if only and spec["name"] not in only:
            continue
        path = ROOT / spec["file"]
        original = path.read_text(encoding="utf-8")
        if original.count(spec["old"]) != 1:
            print(f"{spec['name']:48s} PATTERN FOUND {original.count(spec['old'])} TIMES in {spec['file']}")
            missed += 1
            continue
        path.write_text(original.replace(spec["old"], spec["new"]), encoding="utf-8")
        try:
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *spec["tests"]],
                                 cwd=ROOT, capture_output=True, text=True, timeout=1800)
        finally:
            path.write_text(original, encoding="utf-8")
        failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
        if run.returncode != 0:
            print(f"{spec['name']:48s} caught: {failed[0] if failed else run.stdout.strip().splitlines()[-1]}")
        else:
            missed += 1
            print(f"{spec['name']:48s} MISSED")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
