"""A bounded burst against `yapo-fast serve` on loopback (issue 8, reliability).

    .venv/bin/python bench/load_server.py                      # starts its own server: 500 requests, 32 at a time
    .venv/bin/python bench/load_server.py --base http://127.0.0.1:8000 --requests 100   # an already running one

What it does:
1. sends every DISTINCT valid request once, alone (one at a time): the reference answers;
2. fires the burst: `--requests` chat completions, `--concurrency` in flight, drawn (seeded) from the
   distinct valid requests (several vectors, multipliers, explicitly and implicitly unsteered) and
   from INVALID steering fields (about one in eight);
3. sends every distinct valid request alone again (the server still serves, and serves the same).

Pass criteria (``summary["ok"]``): zero 5xx or transport errors, every valid request 200 with the
text its alone request got (greedy, temperature 0), every invalid request a 4xx naming the
problem. tests/test_vllm_serve.py runs a smaller burst with the same code against its server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from loopback_server import loopback_server  # noqa: E402

PROMPTS = ["Tell me about the moon.", "What should I cook tonight?", "Give me one tip for learning to swim."]

# vllm_xargs of the valid requests (None: no vllm_xargs at all). Names: the vectors the server
# was started with; tests/test_vllm_serve.py has 'yapo' and 'bipo', this script adds 'caa'.
VALID_SPECS = [
    None,
    {"yapo_vector": "none"},
    {"yapo_vector": "yapo"},
    {"yapo_vector": "yapo", "yapo_multiplier": -2.0},
    {"yapo_vector": "bipo"},
    {"yapo_vector": "bipo", "yapo_multiplier": 2.5},
    {"yapo_vector": "bipo", "yapo_multiplier": "-1"},
]

# (what is wrong, request body changes); each must get a 4xx
INVALID = [
    ("unknown vector", {"vllm_xargs": {"yapo_vector": "does-not-exist"}}),
    ("multiplier not a number", {"vllm_xargs": {"yapo_vector": "bipo", "yapo_multiplier": "lots"}}),
    ("multiplier NaN", {"vllm_xargs": {"yapo_vector": "bipo", "yapo_multiplier": "nan"}}),
    ("multiplier inf", {"vllm_xargs": {"yapo_vector": "yapo", "yapo_multiplier": "-inf"}}),
    ("multiplier out of range", {"vllm_xargs": {"yapo_vector": "yapo", "yapo_multiplier": 1e6}}),
    # (a JSON `true` multiplier is not here: vLLM's request schema turns it into 1 before we see it)
    ("multiplier without a vector", {"vllm_xargs": {"yapo_multiplier": 2.0}}),
    ("vector named by a number", {"vllm_xargs": {"yapo_vector": 5}}),
    ("vllm_xargs not an object", {"vllm_xargs": ["yapo", 1.0]}),
]


def body(prompt: str, xargs, max_tokens: int) -> dict:
    out = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if xargs is not None:
        out["vllm_xargs"] = xargs
    return out


async def _send(client, base: str, payload: dict) -> tuple[int, str]:
    import httpx

    try:
        r = await client.post(f"{base}/v1/chat/completions", json=payload, timeout=600)
    except httpx.HTTPError as exc:  # a dropped connection counts as a server error
        return -1, f"{type(exc).__name__}: {exc}"
    if r.status_code == 200:
        return 200, r.json()["choices"][0]["message"]["content"]
    return r.status_code, r.text


async def _run(
    base: str, *, specs, requests: int, concurrency: int, max_tokens: int, seed: int, invalid_share: float
) -> dict:
    import httpx

    distinct = [(p, s) for p in PROMPTS for s in specs]
    rng = random.Random(seed)
    plan = []  # (kind, index)
    for _ in range(requests):
        if rng.random() < invalid_share:
            plan.append(("invalid", rng.randrange(len(INVALID))))
        else:
            plan.append(("valid", rng.randrange(len(distinct))))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        alone = [await _send(client, base, body(p, s, max_tokens)) for p, s in distinct]
        sem = asyncio.Semaphore(concurrency)

        async def one(kind, i):
            payload = (
                body(*distinct[i], max_tokens)
                if kind == "valid"
                else {**body(PROMPTS[0], None, max_tokens), **INVALID[i][1]}
            )
            async with sem:
                return await _send(client, base, payload)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(kind, i) for kind, i in plan))
        burst_s = time.perf_counter() - t0
        after = [await _send(client, base, body(p, s, max_tokens)) for p, s in distinct]

    summary = {
        "distinct_valid": len(distinct),
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "burst_seconds": round(burst_s, 2),
        "requests_per_second": round(requests / burst_s, 2),
        "alone_errors": [(distinct[i][1], a) for i, a in enumerate(alone) if a[0] != 200],
        "valid_sent": 0,
        "valid_200": 0,
        "valid_equal_alone": 0,
        "server_errors": 0,
        "invalid_sent": 0,
        "invalid_4xx": 0,
        "mismatches": [],
        "invalid_not_4xx": [],
        "after_equal_alone": sum(a == b for a, b in zip(alone, after)),
        "after_sent": len(after),
    }
    for (kind, i), (status, text) in zip(plan, results):
        if status == -1 or status >= 500:
            summary["server_errors"] += 1
        if kind == "valid":
            summary["valid_sent"] += 1
            summary["valid_200"] += status == 200
            if status == 200 and (200, text) == alone[i]:
                summary["valid_equal_alone"] += 1
            elif len(summary["mismatches"]) < 5:
                summary["mismatches"].append({"request": distinct[i], "burst": [status, text], "alone": alone[i]})
        else:
            summary["invalid_sent"] += 1
            if 400 <= status < 500:
                summary["invalid_4xx"] += 1
            elif len(summary["invalid_not_4xx"]) < 5:
                summary["invalid_not_4xx"].append({"fault": INVALID[i][0], "status": status, "text": text[:300]})
    summary["ok"] = (
        not summary["alone_errors"]
        and summary["server_errors"] == 0
        and summary["valid_equal_alone"] == summary["valid_sent"]
        and summary["invalid_4xx"] == summary["invalid_sent"]
        and summary["after_equal_alone"] == summary["after_sent"]
    )
    return summary


def burst(
    base: str,
    *,
    specs=VALID_SPECS,
    requests: int = 500,
    concurrency: int = 32,
    max_tokens: int = 16,
    seed: int = 0,
    invalid_share: float = 0.125,
) -> dict:
    """Run the three phases against a running server; return the summary (see the module doc)."""
    return asyncio.run(
        _run(
            base,
            specs=specs,
            requests=requests,
            concurrency=concurrency,
            max_tokens=max_tokens,
            seed=seed,
            invalid_share=invalid_share,
        )
    )


# ---- a server of our own -----------------------------------------------------------------------
def make_vectors(tmp: Path) -> list[str]:
    """A random JumpReLU SAE at layer 10 of the default model, a YaPO vector on it (constant part and
    caps), a BiPO and a CAA-style dense vector: the --vector arguments of `yapo-fast serve`."""
    import torch

    import yapo_fast
    from yapo_fast.integrations.sae_lens_loading import save_sae

    layer = 10
    sae = yapo_fast.SAE.random("jumprelu", 576, 2304, layer=layer, seed=3, name="random-jumprelu-576")
    save_sae(sae, tmp / "sae")
    g = torch.Generator().manual_seed(7)
    latent = torch.zeros(2304)
    ids = torch.randperm(2304, generator=g)[:48]
    latent[ids[:24]] = 3.0 + torch.rand(24, generator=g)
    latent[ids[24:]] = -(0.5 + torch.rand(24, generator=g))
    yapo_fast.SteeringVector.from_latent(latent, layer=layer, sae=sae).save(tmp / "yapo.safetensors")
    yapo_fast.SteeringVector.from_dense(0.6 * torch.randn(576, generator=g), method="bipo", layer=layer).save(
        tmp / "bipo.safetensors"
    )
    yapo_fast.SteeringVector.from_dense(0.4 * torch.randn(576, generator=g), method="caa", layer=layer).save(
        tmp / "caa.safetensors"
    )
    return [
        f"yapo={tmp / 'yapo.safetensors'}@{tmp / 'sae'}",
        f"bipo={tmp / 'bipo.safetensors'}*1.0",
        f"caa={tmp / 'caa.safetensors'}*1.5",
    ]


@contextmanager
def own_server(tmp: Path, *, max_num_seqs: int, start_timeout_s: float = 1200):
    args = ["--max-model-len", "512", "--max-num-seqs", str(max_num_seqs)]
    for v in make_vectors(tmp):
        args += ["--vector", v]
    try:
        with loopback_server(args, tmp, start_timeout_s=start_timeout_s) as base:
            yield base
    except RuntimeError as e:  # the server's own failure, with its log tail
        raise SystemExit(str(e)) from None


def table(s: dict) -> str:
    rows = [
        ("requests in the burst", s["requests"]),
        ("in flight at once", s["concurrency"]),
        ("distinct valid requests (prompt x steering)", s["distinct_valid"]),
        ("valid requests sent", s["valid_sent"]),
        ("valid answered 200", s["valid_200"]),
        ("valid equal to the same request sent alone", s["valid_equal_alone"]),
        ("invalid steering fields sent", s["invalid_sent"]),
        ("invalid answered 4xx", s["invalid_4xx"]),
        ("5xx or dropped connections", s["server_errors"]),
        ("alone again after the burst: equal", f"{s['after_equal_alone']} of {s['after_sent']}"),
        ("burst wall time (s)", s["burst_seconds"]),
        ("requests/s", s["requests_per_second"]),
        ("PASS", s["ok"]),
    ]
    return "\n".join(["| what | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="URL of a running yapo-fast server (default: start one)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args()
    specs = VALID_SPECS + [{"yapo_vector": "caa"}, {"yapo_vector": "caa", "yapo_multiplier": -1.5}]
    kw = dict(requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens, seed=args.seed)
    if args.base:
        summary = burst(args.base, **kw)
    else:
        with (
            tempfile.TemporaryDirectory(prefix="yapo-load-") as tmp,
            own_server(Path(tmp), max_num_seqs=args.concurrency) as base,
        ):
            summary = burst(base, specs=specs, **kw)
    print(table(summary))
    if summary["mismatches"] or summary["invalid_not_4xx"] or summary["alone_errors"]:
        print(json.dumps({k: summary[k] for k in ("mismatches", "invalid_not_4xx", "alone_errors")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
