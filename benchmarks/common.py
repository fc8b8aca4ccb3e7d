"""Shared pieces of the benchmarks: machine facts, building a run from a YAML, tables and JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from lit_impala.config import OneLineErrorParser  # noqa: F401  (the benchmarks' parser, from here)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_DIR_VARIABLE = "LIT_IMPALA_BENCHMARK_DIR"  # where results go instead (the tests' smoke runs)


def machine() -> dict:
    """Cores, CPU model, GPU (if any) and library versions: every result is tagged with them."""
    # Not platform.processor(): on Linux it runs `uname -p` as a child process, and a benchmark that only
    # reuses finished results must start none (tests/integration/test_benchmarks.py checks).
    cpu_model = platform.machine() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning
    import tensordict
    import torchrl

    facts = {
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrl": torchrl.__version__,
        "tensordict": tensordict.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return facts


def build_run(config: str, overrides: list[str] | None = None):
    """The trainer, model and data module a ``fit --config config`` run would build, not yet run."""
    from lit_impala.cli import cli_main

    return cli_main(["--config", config, *(overrides or [])], run=False, save_config_callback=None)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
        return str(value)

    cells = [header, *[[fmt(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=False)))
        if i == 0:
            print("  ".join("-" * width for width in widths))


def write_result(name: str, result: dict) -> Path:
    """Write ``result`` (plus the machine facts and a timestamp) to ``benchmarks/results/<name>.json``."""
    results_dir = Path(os.environ.get(RESULTS_DIR_VARIABLE, RESULTS_DIR))
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **result}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)  # never a half-written result
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path
