"""Sparse autoencoders: the SAE object and its loading (autoencoder), training one on the default
model (train) and measuring it (eval)."""

from yapo_fast.sae.autoencoder import SAE, load_sae

__all__ = ["SAE", "load_sae"]
