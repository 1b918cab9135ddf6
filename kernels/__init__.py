"""yapo_fast.kernels: each op as a pure-torch reference, a numba CPU kernel and a Triton GPU kernel,
behind one dispatch point per op. Installed as ``yapo_fast.kernels`` (never as ``kernels``)."""

if __name__ == "kernels":
    # This source folder is importable as top-level `kernels` only when a checkout's root is on
    # sys.path (python -c from the repo root). transformers probes for the Hugging Face `kernels`
    # package by importing that name; without __file__ the probe reads us as "not installed".
    del __file__
