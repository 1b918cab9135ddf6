"""Rebuild the on-policy preference data of the added behaviours (yapo_fast/data/behaviours.py):

    .venv/bin/python scripts/build_behaviours.py [spanish positive-tone]

Samples the embedded default model through vLLM (seeded), so the files are reproducible on the
same versions; writes yapo_fast/assets/data/behaviours/<name>/{train,test}.jsonl.
"""

import json
import sys
import time

# prompts per split and samples per prompt (and system prompt): one vLLM batch each, ~70 output
# tokens/s on 2 cores; the persona behaviour samples under two system prompts
SIZES = {"spanish": (240, 4), "positive-tone": (160, 2)}

if __name__ == "__main__":  # vLLM spawns workers
    from yapo_fast.data.behaviours import SOURCES, build
    from yapo_fast.model import default_model_dir

    for name in sys.argv[1:] or sorted(SOURCES):
        t0 = time.perf_counter()
        limit, n = SIZES[name]
        counts = build(name, str(default_model_dir()), limit=limit, n=n)
        print(json.dumps({"behaviour": name, **counts, "seconds": round(time.perf_counter() - t0, 1)}))
