"""scripts/gpu_check.py's CPU-runnable part (the GPU runs the same sequence under a CUDA graph): a
steered decoder layer compiled once with fullgraph=True stays equal to eager while vectors are
registered, re-weighted and removed and the slot map changes."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def test_capture_sequence_on_cpu_compiles_once_and_equals_eager():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    res = gpu_check.capture_check("cpu")
    assert res["compilations"] == 1 and res["ok"]
    assert [c["vectors"] for c in res["changes"]] == [2, 4, 6, 8, 7, 7]
    assert max(c["max_abs_err"] for c in res["changes"]) < 1e-3
