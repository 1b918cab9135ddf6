"""`yapo-fast train`: a YaPO, BiPO or CAA vector from preference pairs (the lean trainer)."""

from __future__ import annotations

from pathlib import Path


def cmd_train(args) -> None:
    from .data import behaviour_path, load_pairs, report_skipped
    from .train import train

    data = Path(args.data) if args.data else behaviour_path(args.behaviour)
    pairs = load_pairs(data, limit=args.pairs, skip_bad_rows=args.skip_bad_rows)
    report_skipped(pairs, data)
    sae = args.sae
    if args.method == "yapo" and args.sae_id:
        from .sae import load_sae

        sae = load_sae(args.sae, sae_id=args.sae_id)
    result = train(
        args.method,
        pairs,
        model=args.model,
        sae=sae,
        layer=args.layer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        beta=args.beta,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        seed=args.seed,
        system=args.system,
        out=args.out,
        resume=not args.no_resume,
        checkpoint_every=args.checkpoint_every,
        caa_reduce=args.reduce,
        multiplier=args.multiplier,
        holdout=args.holdout,
        patience=args.patience,
        support=args.support,
        l1=args.l1,
        cache_memory_bytes=None if args.cache_memory_gb is None else int(args.cache_memory_gb * 2**30),
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


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a steering vector (yapo, bipo or caa) from preference pairs")
    p.add_argument("--method", choices=("yapo", "bipo", "caa"), default="yapo")
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
    p.add_argument("--layer", type=int, default=None, help="decoder layer to steer (default: the SAE's layer)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt for the chat template")
    p.add_argument("--multiplier", type=float, default=1.0, help="the vector's default multiplier")
    p.add_argument("--reduce", choices=("mean", "last"), default="mean", help="caa: mean or last response token")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--holdout", type=float, default=0.0, help="fraction of pairs held out (evaluated per epoch)")
    p.add_argument("--patience", type=int, default=None, help="with --holdout: stop after N epochs without improvement")
    p.add_argument(
        "--support",
        type=int,
        default=None,
        help="yapo: keep at most K non-zero latents (top-k by effect after every step)",
    )
    p.add_argument("--l1", type=float, default=0.0, help="yapo: L1 strength (soft threshold lr*l1 after every step)")
    p.add_argument(
        "--cache-memory-gb",
        type=float,
        default=None,
        help="bound on the in-memory layer-L cache; the rest is spilled to disk",
    )
    p.add_argument("--out", required=True, help="vector file (.safetensors); the loss log and checkpoint go beside it")
    p.set_defaults(func=cmd_train)
