"""`make mutate`: mutmut over the session core's modules against their own tests; prints the survivors.

The modules and tests are `[tool.mutmut]` in pyproject.toml; MUTATE_MODULES and MUTATE_TESTS
(space-separated paths) narrow them for one run, e.g.
`make mutate MUTATE_MODULES=server/sessions/lock.py MUTATE_TESTS=tests/test_session_core.py`.
MUTATE_JOBS: parallel mutants (default 2). mutants/ is made afresh each run: mutmut keeps a
file it has already copied, so a stale copy would test yesterday's code.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def main() -> int:
    shutil.rmtree("mutants", ignore_errors=True)
    from mutmut import configuration  # reads [tool.mutmut] from ./pyproject.toml

    config = configuration.config()
    modules = os.environ.get("MUTATE_MODULES", "").split()
    tests = os.environ.get("MUTATE_TESTS", "").split()
    if modules:
        unknown = [m for m in modules if m not in config.only_mutate]
        if unknown:
            print(f"not a core module in [tool.mutmut] only_mutate: {unknown}", file=sys.stderr)
            return 2
        config.only_mutate = modules
    if tests:
        config.pytest_add_cli_args_test_selection = tests
    print(f"mutating {' '.join(config.only_mutate)}")
    print(f"against {' '.join(config.pytest_add_cli_args_test_selection)}")

    from mutmut.__main__ import cli  # after the config is set: forked workers inherit it

    jobs = os.environ.get("MUTATE_JOBS", "2")
    try:
        cli(["run", "--max-children", jobs], standalone_mode=False)
    except SystemExit as exit_:
        if exit_.code:
            return int(exit_.code) if isinstance(exit_.code, int) else 1
    return survivors()


def survivors() -> int:
    """Print every mutant the tests did not kill, with its diff; 0 when there is none."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    found = 0
    print("\nSurvivors (mutants no test caught):")
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=Path(path))
        data.load()
        for name, code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[code]
            if status in ("killed", "caught by type check"):
                continue
            found += 1
            print(f"\n# {name}: {status}")
            print(get_diff_for_mutant(name, path=data.path))
    print(f"\n{found} survivor(s)" if found else "none: every mutant was killed")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
