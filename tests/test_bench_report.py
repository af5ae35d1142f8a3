"""`make bench ARGS="--only FIGURE"` re-measures some figures of a whole run: the page keeps the
other figures' rows and notes, and says what was re-measured when."""

from __future__ import annotations

from tests.bench.harness import FULL, Report, Row


def report(*rows: Row) -> Report:
    made = Report(FULL)
    made.rows.extend(rows)
    return made


def test_a_partial_run_replaces_only_its_figures_rows_and_notes_and_says_so() -> None:
    page = (
        "# sessiongate benchmark (full)\n\n"
        + report(
            Row("first figure", "ms", 1.0, 2.0, "<= 3", True, "old note: one"),
            Row("second figure: with a colon", "ms", 1.0, 5.0, "<= 3", False, "old note two"),
            Row("third figure", "µs", 2.0, 1.0, "<= 3", True, "old note three"),
        ).markdown()
    )
    again = report(
        Row("second figure: with a colon", "ms", 1.0, 2.5, "<= 3", True, "new note two"),
        Row("a new figure", "ev/s", 1.0, 4.0, ">= 1", True, "new note four"),
    )

    merged = again.merged_into(page, ["second_figure", "new_figure"])

    lines = merged.splitlines()
    assert lines[0] == "# sessiongate benchmark (full)"
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert rows == [
        "| first figure | 1.00 ms | 2.00 ms | 2.00 | <= 3 | yes |",
        "| second figure: with a colon | 1.00 ms | 2.50 ms | 2.50 | <= 3 | yes |",
        "| third figure | 2.00 µs | 1.00 µs | 0.50 | <= 3 | yes |",
        "| a new figure | 1.00 ev/s | 4.00 ev/s | 4.00 | >= 1 | yes |",
    ]
    assert "" not in lines[lines.index("- first figure: old note: one") :]  # one list of notes
    notes = [line for line in lines if line.startswith("- ")]
    assert notes == [
        "- first figure: old note: one",
        "- second figure: with a colon: new note two",
        "- third figure: old note three",
        "- a new figure: new note four",
    ]
    said = lines.index("| figure | baseline | sessiongate | ratio | target | met |") - 2
    assert lines[said].startswith("Re-measured ") and "`--only second_figure new_figure`" in lines[said]
    assert lines[2].startswith("Run: `make bench` (full)")  # the whole run's line stays


def test_the_first_notes_go_below_the_table() -> None:
    page = (
        "# sessiongate benchmark (full)\n\n" + report(Row("first", "ms", 1.0, 2.0, "<= 3", True)).markdown()
    )

    lines = (
        report(Row("second", "ms", 1.0, 2.0, "<= 3", True, "a note")).merged_into(page, ["b"]).splitlines()
    )

    assert lines[-3:] == ["| second | 1.00 ms | 2.00 ms | 2.00 | <= 3 | yes |", "", "- second: a note"]
