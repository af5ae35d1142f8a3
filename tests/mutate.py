"""`make mutate`: mutmut over the session core's modules against their own tests; prints the survivors.

The modules and tests are `[tool.mutmut]` in pyproject.toml; MUTATE_MODULES and MUTATE_TESTS
(space-separated paths) narrow them for one run, e.g.
`make mutate MUTATE_MODULES=server/sessions/lock.py MUTATE_TESTS=tests/test_session_core.py`.
MUTATE_JOBS: parallel mutants (default 2).

mutmut names a mutant after its file's path (src/ stripped), and the tests import the server
as sessiongate.server: so it runs in build/mutate/, a copy of the checkout laid out as the
installed package (src/sessiongate/{server,client,echo,v1}), made afresh each run (mutmut
keeps a file it has already copied, so a stale copy would test yesterday's code).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "build" / "mutate"
PACKAGE = "src/sessiongate/"  # where server/ is in the staged copy


def stage() -> None:
    """build/mutate/: the package as installed, the tests, and pyproject.toml with mutmut's paths
    (and pytest's import path) pointing into src/."""
    shutil.rmtree(STAGE, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "protos" / "sessiongate", STAGE / PACKAGE, ignore=ignore)  # follows the symlinks
    (STAGE / "tests").symlink_to(ROOT / "tests")
    text = (ROOT / "pyproject.toml").read_text()
    text = text.replace('pythonpath = ["protos"]', 'pythonpath = ["src"]')
    text = re.sub(r'"server(/[^"]*)?"', lambda m: f'"{PACKAGE}server{m.group(1) or ""}"', text)
    (STAGE / "pyproject.toml").write_text(text)


def main() -> int:
    stage()
    os.chdir(STAGE)
    from mutmut import configuration  # reads [tool.mutmut] from ./pyproject.toml

    config = configuration.config()
    modules = [PACKAGE + m for m in os.environ.get("MUTATE_MODULES", "").split()]
    tests = os.environ.get("MUTATE_TESTS", "").split()
    if modules:
        unknown = [m for m in modules if m not in config.only_mutate]
        if unknown:
            unknown = [m.removeprefix(PACKAGE) for m in unknown]
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
