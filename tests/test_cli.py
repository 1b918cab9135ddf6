"""The yapo-fast command line on a tiny saved model."""

import subprocess
import sys
from pathlib import Path

import torch
from helpers import tiny_llama

from yapo_fast import SteeringVector, model_identity
from yapo_fast.cli import main

BIN = Path(sys.executable).parent / "yapo-fast"


def test_help_lists_subcommands():
    out = subprocess.run([str(BIN), "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("steer", "train", "main"):
        assert cmd in out


def save_tiny(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama()
    vocab = {f"w{i}": i for i in range(128)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w1", pad_token="w1")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return model


def test_steer_prints_both_and_errors_cleanly(tmp_path, capsys):
    model = save_tiny(tmp_path)
    vec = SteeringVector.from_dense(10 * torch.randn(64), method="bipo", layer=1, model=model_identity(model))
    vec.save(tmp_path / "v.safetensors")
    rc = main(
        [
            "steer",
            "--model",
            str(tmp_path / "m"),
            "--vector",
            str(tmp_path / "v.safetensors"),
            "--prompt",
            "w5 w6 w7",
            "--max-new-tokens",
            "5",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "-- unsteered" in out and "-- steered (bipo, layer 1" in out
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    rc = main(["steer", "--model", str(tmp_path / "m"), "--vector", str(tmp_path / "bad.safetensors"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "corrupt or truncated" in err and "Traceback" not in err
    far = SteeringVector.from_dense(torch.randn(64), method="bipo", layer=9)
    far.save(tmp_path / "far.safetensors")
    rc = main(["steer", "--model", str(tmp_path / "m"), "--vector", str(tmp_path / "far.safetensors"), "--prompt", "x"])
    assert rc == 2 and "out of range" in capsys.readouterr().err
    rc = main(
        ["steer", "--model", str(tmp_path / "nowhere"), "--vector", str(tmp_path / "v.safetensors"), "--prompt", "x"]
    )
    assert rc == 2 and "could not load model" in capsys.readouterr().err
