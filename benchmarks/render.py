"""Re-render the Markdown table and PNG chart of saved benchmark JSON files.

python benchmarks/render.py benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import chart, markdown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="re-render .md and .png next to benchmark result JSON files")
    p.add_argument("json", nargs="+", type=Path)
    args = p.parse_args(argv)
    for path in args.json:
        res = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(res))
        chart(res, path.with_suffix(".png"))
        print("rendered", path.with_suffix(".md"), path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
