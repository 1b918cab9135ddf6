"""`yapo-fast train`: a YaPO, BiPO or CAA vector from preference pairs (the lean trainer)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

# TrainConfig fields with a CLI of their own (layer, method: declared below with the data options)
_OWN_FLAGS = {"method", "layer", "cache_memory_bytes"}


def _config_settings(args) -> dict:
    from yapo_fast.train import TrainConfig

    settings = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in _OWN_FLAGS}
    settings["layer"] = args.layer
    if args.cache_memory_gb is not None:
        settings["cache_memory_bytes"] = int(args.cache_memory_gb * 2**30)
    return settings


def cmd_train(args) -> None:
    from yapo_fast.data.pairs import behaviour_path, load_pairs, report_skipped
    from yapo_fast.train import train

    data = Path(args.data) if args.data else behaviour_path(args.behaviour)
    pairs = load_pairs(data, limit=args.pairs, skip_bad_rows=args.skip_bad_rows)
    report_skipped(pairs, data)
    sae = args.sae
    if args.method == "yapo" and args.sae_id:
        from yapo_fast.sae.autoencoder import load_sae

        sae = load_sae(args.sae, sae_id=args.sae_id)
    result = train(
        args.method, pairs, model=args.model, sae=sae, out=args.out, resume=not args.no_resume, **_config_settings(args)
    )
    vec = result.vector
    last = result.losses[-1]["loss"] if result.losses else float("nan")
    size = f"{vec.values.numel()} non-zero latents of {vec.d_sae}" if vec.is_sparse else f"|v|={vec.values.norm():.4f}"
    print(
        f"wrote {result.out} ({vec.method}, layer {vec.layer}, {size}; {result.steps} steps, "
        f"final loss {last:.4f}, {result.seconds:.1f}s)"
    )
    if result.log_path is not None:
        print(f"loss log: {result.log_path}")


def _add_config_arguments(p) -> None:
    """One flag per TrainConfig field (--batch-size for batch_size), its default and help from there."""
    from yapo_fast.train import TrainConfig

    for f in fields(TrainConfig):
        if f.name in _OWN_FLAGS:
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kind = {"int": int, "float": float, "str": str}[str(f.type).split(" |")[0].strip("'\"")]
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        p.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f.metadata["help"], **extra)


def register(subparsers) -> None:
    from yapo_fast.train import TrainConfig

    defaults = {f.name: f for f in fields(TrainConfig)}
    p = subparsers.add_parser("train", help="train a steering vector (yapo, bipo or caa) from preference pairs")
    p.add_argument("--method", choices=defaults["method"].metadata["choices"], default=defaults["method"].default)
    p.add_argument(
        "--data",
        default=None,
        help="BiPO CSV (question, matching, not_matching) or JSONL "
        "(prompt, chosen, rejected); default: the shipped --behaviour",
    )
    p.add_argument(
        "--behaviour",
        default="hallucination",
        help="shipped behaviour when --data is not given (BiPO's, spanish, positive-tone)",
    )
    p.add_argument("--pairs", type=int, default=None, help="use the first N pairs")
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="leave out malformed data rows (reported with their count) instead of stopping at the first",
    )
    p.add_argument("--model", default=None, help="transformers model path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sae", default=None, help="SAE directory in sae-lens format (default: the shipped SAE)")
    p.add_argument("--sae-id", default=None, help="with --sae naming a sae-lens release: the SAE id in it")
    p.add_argument("--layer", type=int, default=None, help=defaults["layer"].metadata["help"])
    _add_config_arguments(p)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument(
        "--cache-memory-gb",
        type=float,
        default=None,
        help="bound on the in-memory layer-L cache; the rest is spilled to disk",
    )
    p.add_argument("--out", required=True, help="vector file (.safetensors); the loss log and checkpoint go beside it")
    p.set_defaults(func=cmd_train)
