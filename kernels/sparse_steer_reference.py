"""THE reference of the YaPO op, written exactly as the paper's formula. Every faster path
(kernels, trainer, vLLM) is tested against this function; keep it literal, not fast.

    z  = Enc(h)
    h' = h + Dec(ReLU(z + m*v)) - Dec(z)

The SAE's reconstruction error h - Dec(z) is kept: only the code moves. Computed in float32.
"""

import torch


def sparse_steer_reference(h: torch.Tensor, sae, v: torch.Tensor, multiplier: float) -> torch.Tensor:
    """h: (..., d_in); sae: anything with encode/decode (yapo_fast.SAE); v: (d_sae,) dense latent vector."""
    sae32 = sae.to(dtype=torch.float32) if sae.dtype != torch.float32 else sae
    h32 = h.to(torch.float32)
    z = sae32.encode(h32)
    steered = torch.relu(z + multiplier * v.to(torch.float32))
    return (h32 + sae32.decode(steered) - sae32.decode(z)).to(h.dtype)


def dense_steer_reference(h: torch.Tensor, v: torch.Tensor, multiplier: float) -> torch.Tensor:
    """BiPO / CAA: h' = h + m*v at every position."""
    return (h.to(torch.float32) + multiplier * v.to(torch.float32)).to(h.dtype)
