"""The `yapo-fast` command line."""

from __future__ import annotations

import argparse
import sys

from yapo_fast.errors import YapoFastError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="transformers model id or path (default: embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument("--sae", default=None, help="SAE directory in sae-lens format (default: the shipped SAE)")
    p.add_argument("--sae-id", default=None, help="with --sae naming a sae-lens release: the SAE id in it")


def cmd_steer(args) -> None:
    """Generate for a prompt with and without a vector, side by side."""
    from yapo_fast import load_model, load_sae, load_vector, steer
    from yapo_fast.eval.generate import generate_text
    from yapo_fast.steering import Steering

    vector = load_vector(args.vector)
    sae = load_sae(args.sae, sae_id=args.sae_id) if vector.is_sparse else None  # dense vectors read none
    steering = Steering.of(vector, args.multiplier, sae=sae)  # checked before the model loads
    model, tok = load_model(args.model)
    plain = generate_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens)
    with steer(model, steering):
        steered = generate_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens)
    for prompt, a, b in zip(args.prompt, plain, steered):
        print(
            f"## {prompt}\n-- unsteered:\n{a}\n-- steered ({vector.method}, layer {vector.layer}, "
            f"m={steering.multiplier:g}):\n{b}\n"
        )


# Feature modules that add their own subcommands: each has register(subparsers), which adds
# parsers whose `func` takes the parsed args. Add a module here to add its commands.
COMMAND_MODULES: list[str] = ["explain", "train", "eval", "sae", "vllm"]  # yapo_fast.cli.<name>


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="yapo-fast", description="Fast, exact sparse activation steering (YaPO).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"yapo_fast.cli.{name}").register(sub)

    p = sub.add_parser("steer", help="generate for prompts with and without a steering vector")
    _add_model_args(p)
    p.add_argument("--vector", required=True, help="steering vector (.safetensors)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--multiplier", type=float, default=None, help="default: the vector's own")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_steer)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except YapoFastError as exc:
        print(f"yapo-fast: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
