"""`python -m tests.bench [--quick] [--only FIGURE...] [--out FILE]`: run the benchmark."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tests.bench.harness import FIGURES, FULL, QUICK, TABLE_HEAD, run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description="sessiongate benchmark")
    parser.add_argument("--quick", action="store_true", help="a small run, about two minutes")
    parser.add_argument(
        "--only", nargs="*", choices=[f.__name__ for f in FIGURES], help="run only these figures"
    )
    parser.add_argument("--out", type=Path, help="markdown file to write (default: by scale)")
    opts = parser.parse_args()
    scale = QUICK if opts.quick else FULL
    report = asyncio.run(run(scale, opts.only))
    table = report.markdown()
    out = opts.out or (Path("bench-results/quick.md") if opts.quick else Path("docs/benchmarks.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"# sessiongate benchmark ({scale.name})\n"
    page = out.read_text() if out.exists() else ""
    if opts.only and page.startswith(title) and TABLE_HEAD in page:  # only these figures' rows change
        out.write_text(report.merged_into(page, opts.only))
    else:
        out.write_text(f"{title}\n{table}")
    print()
    print(table)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
