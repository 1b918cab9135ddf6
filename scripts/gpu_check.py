"""The GPU check of the graph-safe steering step (run by scripts/gpu_check.sh; see docs/serving.md).

1. capture: a decoder layer of a small random transformers Llama, its output steered by the table
   step (kernels/table_steer.py), captured into a torch.cuda.CUDAGraph; between replays vectors are
   registered, re-weighted and removed and the slot map changes; every replay must equal eager.
   Without CUDA the same sequence runs through torch.compile(fullgraph=True) on the CPU (no graph
   break, one compilation), which is what this part can prove there.
2. bench: the step per decode step at Gemma-2-2B shapes (d_model 2304, d_sae 16384 and 65536, one
   JumpReLU SAE; T = 1..512 tokens over 8 vectors of 64 dependent entries each), in CUDA events, against
   the HBM bound (bytes the step must move / peak bandwidth). GPU only.
Writes one JSON (argv[1], default runs/gpu_check.json).
"""

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}  # peak (SXM) HBM3e / HBM3 bandwidth


def _steerings(sae, n, support, seed):
    from helpers import random_latent

    return [random_latent(sae.d_sae, support, "mixed", seed=seed + i) for i in range(n)]


def _write(table, row, sae, latent, m):
    from yapo_fast.kernels.sparse_steer_prepare import prepare_sparse_steer

    p = prepare_sparse_steer(sae, latent, m)
    table.write(row, const=p.const, prepared=p, group=sae.weights_hash())


def capture_check(device: str) -> dict:
    """A steered decoder layer replayed (CUDA graph) or compiled (CPU) while the steering changes."""
    from helpers import random_sae, tiny_llama

    from yapo_fast.kernels.table_steer import SteerTable, table_steer
    from yapo_fast.kernels.table_steer_reference import table_steer_reference

    torch.manual_seed(0)
    model = tiny_llama(d_model=64, n_layers=2).to(device).eval()
    layer = model.model.layers[1]
    sae = random_sae("jumprelu", d_in=64, d_sae=256, seed=1).to(device=device)
    table = SteerTable(64, rows=9, width=512, device=device)
    T = 16
    h_in = torch.randn(1, T, 64, device=device)
    pos = torch.arange(T, device=device)[None]
    rope = model.model.rotary_emb(h_in, pos)
    slot = torch.zeros(T, dtype=torch.int64, device=device)

    def step(x):
        out = layer(x, position_embeddings=rope, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        return table_steer(out[0], slot, table)

    latents = _steerings(sae, 8, 24, seed=10)
    rows = {}
    changes = []
    with torch.no_grad():
        if device == "cuda":
            static_in = h_in.clone()
            for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs asks
                step(static_in)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = step(static_in)

            def run():
                graph.replay()
                return static_out.clone()
        else:
            from torch._dynamo.testing import CompileCounterWithBackend

            counter = CompileCounterWithBackend("eager")
            compiled = torch.compile(step, fullgraph=True, backend=counter)

            def run():
                return compiled(h_in)

        for change in range(6):
            if change < 4:  # register two vectors per change
                for r in (2 * change + 1, 2 * change + 2):
                    rows[r] = (sae, latents[r - 1], float(change) - 1.5)
                    _write(table, r, *rows[r])
            elif change == 4:  # a new multiplier for one, another removed
                rows[1] = (sae, latents[0], 3.0)
                _write(table, 1, *rows[1])
                table.clear(2)
                rows.pop(2)
            g = torch.Generator().manual_seed(change)
            live = torch.tensor([0, *sorted(rows)])
            slot.copy_(live[torch.randint(0, len(live), (T,), generator=g)].to(device))
            got = run()
            base = layer(h_in, position_embeddings=rope, attention_mask=None)
            base = (base[0] if isinstance(base, tuple) else base)[0]
            want = table_steer_reference(
                base.cpu(), slot.cpu(), {r: (s.to(device="cpu"), v, m) for r, (s, v, m) in rows.items()}
            )
            err = float((got.cpu() - want).abs().max())
            changes.append({"change": change, "vectors": len(rows), "max_abs_err": err})
    out = {"device": device, "mode": "cuda_graph" if device == "cuda" else "torch.compile(fullgraph=True)"}
    out["changes"] = changes
    out["ok"] = all(c["max_abs_err"] < 1e-3 for c in changes)
    if device != "cuda":
        out["compilations"] = counter.frame_count
        out["ok"] = out["ok"] and counter.frame_count == 1
    return out


def bench(device_name: str) -> list[dict]:
    """Median microseconds of the step per decode step against its HBM bound."""
    from helpers import random_sae

    from yapo_fast.kernels.table_steer import SteerTable, table_steer

    bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in device_name), None)
    rows_out = []
    for d_sae in (16384, 65536):
        sae = random_sae("jumprelu", d_in=2304, d_sae=d_sae, seed=2).to(device="cuda")
        table = SteerTable(2304, rows=9, width=8 * 64, device="cuda")
        for r, lat in enumerate(_steerings(sae, 8, 128, seed=3), start=1):  # ~64 negative entries each
            _write(table, r, sae, lat.cuda(), 1.0)
        for T in (1, 8, 64, 256, 512):
            h = torch.randn(T, 2304, device="cuda", dtype=torch.bfloat16)
            slot = torch.randint(0, 9, (T,), device="cuda")
            for _ in range(5):
                table_steer(h, slot, table)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(50):
                start.record()
                table_steer(h, slot, table)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            times.sort()
            w = table.width
            moved = 2 * T * 2304 * 2 + 4 * (2 * 2304 * w + 3 * w) + 4 * T * (w + 2304) + 8 * T
            rows_out.append(
                {
                    "d_sae": d_sae,
                    "T": T,
                    "width": w,
                    "median_us": times[len(times) // 2],
                    "bytes": moved,
                    "hbm_bound_us": None if bw is None else moved / bw * 1e6,
                }
            )
    return rows_out


def main(out: Path) -> dict:
    has_cuda = torch.cuda.is_available()
    device = "cuda" if has_cuda else "cpu"
    name = torch.cuda.get_device_name() if has_cuda else "none (CPU only: the GPU parts did not run)"
    t0 = time.perf_counter()
    res = {"gpu": name, "torch": torch.__version__, "capture": capture_check(device)}
    if has_cuda:
        res["bench"] = bench(name)
    res["seconds"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    result = main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check.json"))
    sys.exit(0 if result["capture"]["ok"] else 1)
