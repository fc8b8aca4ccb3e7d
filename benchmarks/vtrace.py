"""V-trace: time per call of ``lit_impala.core.vtrace.from_importance_weights`` against torchrl's
``vtrace_advantage_estimate`` on the same float32 inputs, after checking that both agree.

    python -m benchmarks.vtrace                 # CPU, and CUDA when present

torchrl is batch-first ``[B, T, 1]`` with a scalar gamma and done flags and uses rho-bar for the
policy-gradient advantages; it is given exactly the inputs that express the same problem (see
tests/test_vtrace.py::test_matches_torchrl). Each side gets its own layout prepared outside the timer.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark as torch_benchmark
from torchrl.objectives.value.functional import vtrace_advantage_estimate

from benchmarks.common import print_table, write_result
from lit_impala.core import vtrace

GAMMA = 0.99


def make_problem(T: int, B: int, device: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    done = torch.rand(T, B, generator=generator) < 0.05
    ours = {
        "log_rhos": torch.randn(T, B, generator=generator) * 0.5,
        "discounts": GAMMA * (~done).float(),
        "rewards": torch.randn(T, B, generator=generator),
        "values": torch.randn(T, B, generator=generator),
        "bootstrap_value": torch.randn(B, generator=generator),
    }

    def batch_first(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).unsqueeze(-1).contiguous()

    next_values = torch.cat([ours["values"][1:], ours["bootstrap_value"][None]])
    theirs = {
        "gamma": GAMMA,
        "log_pi": batch_first(ours["log_rhos"]),
        "log_mu": torch.zeros(B, T, 1),
        "state_value": batch_first(ours["values"]),
        "next_state_value": batch_first(next_values),
        "reward": batch_first(ours["rewards"]),
        "done": batch_first(done),
        "terminated": batch_first(done),
    }
    def move(inputs: dict) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    return {"ours": move(ours), "theirs": move(theirs)}


def run_ours(inputs: dict):
    return vtrace.from_importance_weights(**inputs)


def run_theirs(inputs: dict):
    return vtrace_advantage_estimate(**inputs, rho_thresh=1.0, c_thresh=1.0)


def check_agreement(problem: dict) -> float:
    """Largest absolute difference over vs and advantages (float32 rounding expected, ~1e-5)."""
    ours = run_ours(problem["ours"])
    advantages, vs = run_theirs(problem["theirs"])
    def to_time_major(x):
        return x.squeeze(-1).transpose(0, 1)

    error = max(
        (ours.vs - to_time_major(vs)).abs().max().item(),
        (ours.pg_advantages - to_time_major(advantages)).abs().max().item(),
    )
    scale = max(ours.vs.abs().max().item(), 1.0)
    if error > 1e-4 * scale:
        raise AssertionError(f"lit_impala and torchrl V-trace disagree by {error} (scale {scale})")
    return error


def time_call(fn, inputs: dict, min_run_time: float) -> float:
    """Median seconds per call (torch.utils.benchmark: warm-up, CUDA synchronisation, thread settings)."""
    timer = torch_benchmark.Timer(
        stmt="fn(inputs)", globals={"fn": fn, "inputs": inputs}, num_threads=torch.get_num_threads()
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[20, 80], help="unroll lengths T")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256, 1024], help="batch sizes B")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per cell")
    args = parser.parse_args(argv)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows, records = [], []
    for device in devices:
        for T in args.lengths:
            for B in args.batches:
                problem = make_problem(T, B, device)
                error = check_agreement(problem)
                ours_s = time_call(run_ours, problem["ours"], args.min_run_time)
                theirs_s = time_call(run_theirs, problem["theirs"], args.min_run_time)
                speedup = theirs_s / ours_s
                rows.append([device, T, B, ours_s * 1e6, theirs_s * 1e6, speedup, f"{error:.1e}"])
                records.append(
                    {"device": device, "T": T, "B": B, "ours_us": ours_s * 1e6, "torchrl_us": theirs_s * 1e6,
                     "speedup": speedup, "max_abs_diff": error}
                )
    print_table(
        "V-trace, float32, time per call (median)",
        ["device", "T", "B", "lit_impala us", "torchrl us", "speedup", "max |diff|"],
        rows,
    )
    result = {"rows": records}
    write_result("vtrace", result)
    return result


if __name__ == "__main__":
    main()
