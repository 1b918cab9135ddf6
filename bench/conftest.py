"""Shared setup for the benchmarks (pytest-benchmark).

- Threads (fixture bench_threads, used by the kernel benchmarks only): YAPO_BENCH_THREADS
  (default 1) for both torch and numba, restored afterwards. On a shared 2-core box a second
  thread mostly measures the neighbours (OpenMP barriers wait on descheduled threads); one
  thread gives stable ratios. Every ratio compares paths measured in the same run.
- numba kernels are compiled (cache=True) and warmed up before any timing.
- At the end, a ratio table (median times) is printed and written to bench/results/<file>.md.
"""

import os
from collections import defaultdict
from pathlib import Path

import numba
import pytest
import torch

THREADS = int(os.environ.get("YAPO_BENCH_THREADS", "1"))
RESULTS: "dict[str, dict[str, dict[str, float]]]" = defaultdict(lambda: defaultdict(dict))


def pytest_collection_modifyitems(config, items):
    from machine_marks import deselect_unrunnable  # tests/ (on the path: pyproject's pythonpath)

    deselect_unrunnable(config, items)  # GPU benchmarks on a CPU machine: left out, with the reason


@pytest.fixture(scope="module")
def bench_threads():
    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(THREADS)
    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    yield THREADS
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


@pytest.fixture(scope="session")
def record():
    """record(module, group, name, benchmark): keep (median, min) of a finished benchmark."""

    def _record(module, group, name, benchmark):
        RESULTS[module][group][name] = (benchmark.stats.stats.median, benchmark.stats.stats.min)

    return _record


def _fmt_ms(s):
    return f"{s * 1e3:.3f}"


def pytest_terminal_summary(terminalreporter):
    from machine_marks import report_left_out

    report_left_out(terminalreporter)
    if not RESULTS:
        return
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    for module, groups in RESULTS.items():
        lines = [
            f"# {module} (ms, median [min]; threads={THREADS}; ratios within one group, same run;",
            "# the min is the steadier estimate on a shared machine: contention only adds time)",
            "",
        ]
        for group, times in groups.items():
            lines.append(f"## {group}")
            base = times.get("reference")
            floor_name = "unavoidable_matmuls" if "unavoidable_matmuls" in times else "torch_matmul_topk"
            floor = times.get(floor_name)
            for name, (med, low) in times.items():
                extra = []
                if base and name != "reference":
                    extra.append(f"{base[0] / med:.1f}x [{base[1] / low:.1f}x] faster than reference")
                if floor and name not in ("reference", floor_name):
                    extra.append(f"{med / floor[0]:.2f}x [{low / floor[1]:.2f}x] the floor")
                dense_vec, dense_add = times.get("op_dense_vector"), times.get("dense_add")
                if dense_vec and name == "op":  # trained vectors: the sparse op against the dense one
                    extra.append(
                        f"{dense_vec[0] / med:.1f}x [{dense_vec[1] / low:.1f}x] faster than on the dense vector"
                    )
                if dense_add and name not in ("dense_add",):
                    extra.append(f"{med / dense_add[0]:.1f}x [{low / dense_add[1]:.1f}x] the dense add")
                lines.append(
                    f"- {name}: {_fmt_ms(med)} [{_fmt_ms(low)}] ms" + (f" ({'; '.join(extra)})" if extra else "")
                )
            lines.append("")
        text = "\n".join(lines)
        terminalreporter.write_line(text)
        tmp = out_dir / f".{module}.md.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / f"{module}.md")
