"""One compact SAE type for every host (hooks, kernels, trainer, vLLM).

It holds plain tensors, in the layout of sae-lens (W_enc: d_in x d_sae, W_dec: d_sae x d_in),
and the three activations YaPO meets in practice:

- ``relu``      z = ReLU(pre)                         (sae-lens "standard")
- ``jumprelu``  z = ReLU(pre) * (pre > threshold_i)   (Gemma Scope; the kind YaPO uses)
- ``topk``      z = ReLU(pre) on the k largest pre-activations of the token, 0 elsewhere

with pre = (h - b_dec) @ W_enc + b_enc (the b_dec centering only where the SAE applies it).
Loading from sae-lens (disk or pretrained release) lives in integrations/sae_lens_loading.py.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from yapo_fast.errors import YapoFastError, check_finite

SAE_KINDS = ("relu", "jumprelu", "topk")


@dataclass(eq=False)
class SAE:
    kind: str
    W_enc: torch.Tensor  # (d_in, d_sae)
    b_enc: torch.Tensor  # (d_sae,)
    W_dec: torch.Tensor  # (d_sae, d_in)
    b_dec: torch.Tensor  # (d_in,)
    threshold: torch.Tensor | None = None  # (d_sae,), jumprelu only
    k: int | None = None  # topk only
    apply_b_dec_to_input: bool = True
    layer: int | None = None  # decoder layer whose output the SAE reads
    model_name: str | None = None
    name: str = "sae"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in SAE_KINDS:
            raise YapoFastError(f"unknown SAE kind {self.kind!r}; use one of {SAE_KINDS}")
        d_in, d_sae = self.W_enc.shape
        expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        if self.kind == "jumprelu":
            if self.threshold is None:
                raise YapoFastError("a jumprelu SAE needs a threshold tensor of shape (d_sae,)")
            expected["threshold"] = (d_sae,)
        if self.kind == "topk" and not (isinstance(self.k, int) and 0 < self.k <= d_sae):
            raise YapoFastError(f"a topk SAE needs an integer k in 1..d_sae={d_sae}, got {self.k!r}")
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise YapoFastError(
                    f"SAE tensor {name} has shape {got}, expected {shape} for W_enc of shape "
                    f"{(d_in, d_sae)}: the SAE's tensors disagree with each other (corrupt file?)"
                )
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            if getattr(self, name) is not None:
                check_finite(f"SAE tensor {name}", getattr(self, name), "The SAE file is corrupt.")
        self._hash: str | None = None

    # ---- shape -----------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # ---- math ------------------------------------------------------------------------------
    def pre_activation(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return torch.relu(pre)
        if self.kind == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        values, indices = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activation(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.dtype) @ self.W_dec + self.b_dec

    # ---- identity --------------------------------------------------------------------------
    def weights_hash(self) -> str:
        """sha256 of the weights (as float32), so a vector can name the exact SAE it was trained for."""
        if self._hash is None:
            digest = hashlib.sha256(f"{self.kind}|{self.k}|{self.apply_b_dec_to_input}".encode())
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
                t = getattr(self, name)
                if t is not None:
                    digest.update(name.encode())
                    digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._hash = digest.hexdigest()[:16]
        return self._hash

    def identity(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "hash": self.weights_hash(),
        }

    def to(self, device=None, dtype=None) -> "SAE":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        out = SAE(
            kind=self.kind,
            W_enc=move(self.W_enc),
            b_enc=move(self.b_enc),
            W_dec=move(self.W_dec),
            b_dec=move(self.b_dec),
            threshold=move(self.threshold),
            k=self.k,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            layer=self.layer,
            model_name=self.model_name,
            name=self.name,
            metadata=dict(self.metadata),
        )
        return out

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        kind: str,
        d_in: int,
        d_sae: int,
        *,
        k: int | None = None,
        layer: int | None = None,
        seed: int = 0,
        dtype=torch.float32,
        name: str = "random-sae",
        model_name: str | None = None,
    ) -> "SAE":
        """A random SAE with the statistics of a trained one (unit-norm decoder rows, tied-ish
        encoder, thresholds that leave a few percent of latents active). For tests and benches."""
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_sae, d_in, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.T.clone() + 0.1 * torch.randn(d_in, d_sae, generator=g) / d_in**0.5
        b_enc = 0.1 * torch.randn(d_sae, generator=g)
        b_dec = 0.1 * torch.randn(d_in, generator=g)
        threshold = (0.5 + 0.5 * torch.rand(d_sae, generator=g)) if kind == "jumprelu" else None
        if kind == "topk" and k is None:
            k = max(1, min(32, d_sae // 8))
        return cls(
            kind=kind,
            W_enc=W_enc.to(dtype),
            b_enc=b_enc.to(dtype),
            W_dec=W_dec.to(dtype),
            b_dec=b_dec.to(dtype),
            threshold=None if threshold is None else threshold.to(dtype),
            k=k,
            layer=layer,
            name=name,
            model_name=model_name,
        )


def layer_from_hook_name(hook_name: str | None) -> int | None:
    """Decoder layer whose output a hook reads: 'blocks.12.hook_resid_post' and
    'model.layers.12' -> 12; 'blocks.12.hook_resid_pre' -> 11 (the input of 12 is the output of 11)."""
    if not hook_name:
        return None
    m = re.search(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name)
    if m:
        return int(m.group(1)) - (1 if m.group(2) == "pre" else 0)
    m = re.search(r"layers\.(\d+)(\.output)?$", hook_name)
    return int(m.group(1)) if m else None


DEFAULT_SAE_DIR = Path(__file__).resolve().parents[1] / "assets" / "saes"


def load_sae(
    source: "str | Path | SAE | None" = None,
    *,
    sae_id: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SAE:
    """Load an SAE.

    - ``None``: the SAE shipped for the embedded default model.
    - a directory in sae-lens's on-disk format (cfg.json + sae_weights.safetensors).
    - a sae-lens pretrained release with ``sae_id`` (machines that reach the Hugging Face Hub).
    - an :class:`SAE` (returned moved to device/dtype).
    """
    from yapo_fast.integrations import sae_lens_loading

    if isinstance(source, SAE):
        return source.to(device=device, dtype=dtype)
    if source is None:
        shipped = (
            sorted(p for p in DEFAULT_SAE_DIR.glob("*") if (p / "cfg.json").exists())
            if DEFAULT_SAE_DIR.exists()
            else []
        )
        default = [p for p in shipped if p.name.startswith("default")] or shipped
        if not default:
            raise YapoFastError(
                "no SAE was named and no default SAE is shipped in this install "
                f"({DEFAULT_SAE_DIR}); pass a sae-lens directory or a release with sae_id"
            )
        source = default[0]
    if sae_id is not None:
        return sae_lens_loading.load_pretrained(str(source), sae_id, device=device, dtype=dtype)
    path = Path(source)
    if path.is_dir():
        return sae_lens_loading.load_from_disk(path, device=device, dtype=dtype)
    raise YapoFastError(
        f"SAE source {str(source)!r} is not a directory in sae-lens format (cfg.json + "
        "sae_weights.safetensors); for a pretrained sae-lens release also pass sae_id=..."
    )
