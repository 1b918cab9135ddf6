"""The one exception type users see: a message that names the problem and the fix."""


class YapoFastError(ValueError):
    """Bad input to yapo-fast (shapes, files, layers, vectors). The message says what to do."""


class VectorMismatchError(YapoFastError):
    """A steering vector was trained for another model or SAE than the one it is applied to."""


def check_finite(name: str, tensor, fix: str = "") -> None:
    """Refuse NaN or inf early: they would otherwise spread silently through every later layer."""
    import torch

    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise YapoFastError(f"{name} contains {bad} NaN or inf value(s). {fix}".strip())


# Largest width (d_model, d_sae) a file may declare: 2^28 latents of float32 are 1 GiB per row of
# W_dec already. A header claiming more is corrupt or hostile, and is refused before anything is
# allocated from it.
MAX_WIDTH = 1 << 28

# The documented multiplier range (docs/reliability.md): |m| <= MAX_ABS_MULTIPLIER. Useful
# multipliers are of order 1 (the paper and our curves use |m| <= 2); far larger ones only drive
# activations towards overflow (bf16/fp16 hosts) and garbage text, so they are refused everywhere
# a multiplier enters: steer/patch, per-request vLLM arguments, the server's vector list, train.
MAX_ABS_MULTIPLIER = 100.0


def check_multiplier(multiplier, what: str = "multiplier") -> float:
    """A finite number with |m| <= MAX_ABS_MULTIPLIER, as float; anything else is refused."""
    import math

    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier):
        raise YapoFastError(f"{what} must be a finite number, got {multiplier!r}")
    if abs(multiplier) > MAX_ABS_MULTIPLIER:
        raise YapoFastError(
            f"{what} {multiplier!r} is outside the supported range [-{MAX_ABS_MULTIPLIER:g}, "
            f"{MAX_ABS_MULTIPLIER:g}]: useful multipliers are of order 1"
        )
    return float(multiplier)
