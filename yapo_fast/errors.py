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
