"""`yapo-fast sae ...`: train and evaluate SAEs (yapo_fast/sae/train.py, yapo_fast/sae/eval.py)."""

from __future__ import annotations


def register(subparsers) -> None:
    from yapo_fast.sae.eval import add_eval_parser
    from yapo_fast.sae.train import add_answers_parser, add_train_parser

    p = subparsers.add_parser("sae", help="train (sae-lens) and evaluate sparse autoencoders")
    sub = p.add_subparsers(dest="sae_command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_answers_parser(sub)
