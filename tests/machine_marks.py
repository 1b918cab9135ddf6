"""Tests and benchmarks that cannot run on this machine are left out of the run (deselected, counted
and named in the summary), not collected and then skipped: a GPU machine runs the compiled-Triton
tests (marked gpu) and leaves out the interpreter-only ones, a CPU machine the other way round.
Used by tests/conftest.py and bench/conftest.py."""

import importlib.util

import torch

HAS_CUDA = torch.cuda.is_available()
NOT_HERE = (
    {
        "gpu": "no CUDA GPU on this machine (the compiled Triton path needs one; its logic runs under "
        "TRITON_INTERPRET in tests/)"
    }
    if not HAS_CUDA
    else {"interpreter_only": "a CUDA GPU is present, so the Triton kernels are compiled, not interpreted"}
)
if importlib.util.find_spec("vllm") is None:
    NOT_HERE["vllm"] = "vLLM is not installed (it installs on CPU machines only: scripts/env.sh)"
_left_out: dict[str, int] = {}


def deselect_unrunnable(config, items) -> None:
    keep, drop = [], []
    for item in items:
        marker = next((m for m in NOT_HERE if item.get_closest_marker(m)), None)
        (drop if marker else keep).append(item)
        if marker:
            _left_out[marker] = _left_out.get(marker, 0) + 1
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def report_left_out(terminalreporter) -> None:
    for marker, n in _left_out.items():
        terminalreporter.write_line(f"{n} tests marked {marker} deselected: {NOT_HERE[marker]}")
