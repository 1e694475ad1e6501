"""Rewrite an ``openset.json`` written before it became the list of rows DESIGN.md names (an object with
``settings``, ``rows``, ``anchors``, ``command``, ``environment``) into ``openset.json`` (the rows, unchanged) and
``openset_run.json`` (the rest), and note it in ``openset.md``. The max-softmax rows of such runs have no
global-threshold figures (null): those runs did not calibrate a threshold on the probabilities.

    .venv/bin/python tools/openset_layout.py results/openset/fashion-mnist [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from logitsep.core.files import write_json, write_text


def main(folders: list[str]) -> int:
    for folder in map(Path, folders):
        doc = json.loads((folder / "openset.json").read_text())
        if isinstance(doc, list):
            print(f"{folder}: already a list of rows")
            continue
        write_json(folder / "openset_run.json", {k: v for k, v in doc.items() if k != "rows"})
        write_json(folder / "openset.json", doc["rows"])
        md = (folder / "openset.md").read_text()
        note = ("openset.json rewritten as the list of rows by `tools/openset_layout.py` after the run (numbers "
                "unchanged); in this run the max-softmax row has no global-threshold figures.")
        if note not in md:
            write_text(folder / "openset.md", md.rstrip("\n") + "\n\n" + note + "\n")
        print(f"{folder}: rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
