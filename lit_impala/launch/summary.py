"""A sweep's summary: one row per run (setting, seed, how it ended, final return, env frames, wall seconds), printed
as a markdown table and written to ``<out>/summary.json`` and ``<out>/summary.md``."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from lit_impala.launch.runs import RunResult, format_return, write_json

HEADER = ("setting", "seed", "status", "final return", "env frames", "wall s")
# What "final return" is, under the table: the fit's own figure at its end.
FOOTNOTE = ("final return: the mean return of the last 100 training episodes (episode_stats.return_window) at the "
            "end of each fit, as the fit printed it")


def table_rows(results: list[RunResult]) -> list[tuple[str, ...]]:
    """Each run's row of cells, in order."""
    return [(result.setting, str(result.seed), result.status, format_return(result),
             "-" if result.env_frames is None else f"{result.env_frames:,}",
             "-" if result.wall_s is None else f"{result.wall_s:.0f}")
            for result in results]


def markdown_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = HEADER) -> str:
    """``rows`` under ``header`` as a markdown table, columns padded to line up in a terminal too (numbers to the
    right)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = [i > 0 and all(row[i].replace(",", "").replace(".", "").lstrip("-").isdigit() or row[i] == "-"
                             for row in rows) for i in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(cell.rjust(width) if right else cell.ljust(width)
                                 for cell, width, right in zip(cells, widths, numeric, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 1) + ":" if right else "-" * (width + 2)
                          for width, right in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def exit_status(results: list[RunResult]) -> int:
    """The launcher's exit code: 0 when every run exited 0 (now or in an earlier sitting), else 1."""
    return 0 if all(result.reused or result.exit_code == 0 for result in results) else 1


def write_summary(out: Path, results: list[RunResult], command: list[str]) -> tuple[Path, Path]:
    """``<out>/summary.json`` (the command and every result) and ``<out>/summary.md`` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out / "summary.json", out / "summary.md"
    write_json(json_path, {"command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "runs": [{**asdict(result), "status": result.status} for result in results]})
    markdown_path.write_text(markdown_table(table_rows(results)) + f"\n\n{FOOTNOTE}\n")
    return json_path, markdown_path
