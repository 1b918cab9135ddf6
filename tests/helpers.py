"""Shared fixtures: small random models and SAEs with the shapes of real ones."""

import torch

from yapo_fast import SAE

SAE_KINDS = ("relu", "jumprelu", "topk")


def tiny_llama(d_model: int = 64, n_layers: int = 4, vocab: int = 128, seed: int = 0, arch: str = "llama"):
    """A random decoder (Llama-, Mistral- or Gemma-style) small enough to run in milliseconds."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    elif arch == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, head_dim=d_model // 4))
    else:
        raise ValueError(arch)
    return model.eval().requires_grad_(False)


def random_sae(kind: str, d_in: int = 64, d_sae: int = 96, seed: int = 0, layer: int | None = 2, **kw) -> SAE:
    return SAE.random(kind, d_in, d_sae, seed=seed, layer=layer, **kw)


def random_latent(d_sae: int, support: int, sign: str, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    """A latent vector with `support` non-zeros; sign in {'pos', 'neg', 'mixed'}."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(d_sae, generator=g)[:support]
    vals = scale * (0.25 + torch.rand(support, generator=g))
    if sign == "neg":
        vals = -vals
    elif sign == "mixed":
        vals[::2] = -vals[::2]
    v = torch.zeros(d_sae)
    v[idx] = vals
    return v


TRITON_KERNEL_MODULES = (
    "yapo_fast.kernels.sparse_steer_triton",
    "yapo_fast.kernels.sparse_steer_triton_backward",
    "yapo_fast.kernels.topk_threshold_triton",
)


def import_triton_kernels(*, always_interpret: bool = False) -> None:
    """Import the Triton kernel modules under TRITON_INTERPRET=1 (Triton's CPU interpreter) when no
    CUDA GPU exists, or always, then restore the variable. triton.jit reads it when decorating, so
    a test module calls this before anything else imports the kernels; other tests are unaffected."""
    import importlib
    import os

    previous = os.environ.get("TRITON_INTERPRET")
    if always_interpret or not torch.cuda.is_available():  # with a GPU the kernels compile
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in TRITON_KERNEL_MODULES:
            importlib.import_module(name)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
