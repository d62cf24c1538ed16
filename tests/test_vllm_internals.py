"""The vLLM internals the plugin relies on (service/vllm_plugin/internals.py) exist in the installed vLLM."""

import vllm

from alignlens.service.vllm_plugin.internals import VERIFIED_ON, missing_internals


def test_every_listed_internal_exists():
    assert missing_internals() == [], f"vLLM {vllm.__version__} lacks internals verified on {VERIFIED_ON}"


def test_installed_vllm_is_the_verified_version():
    # pyproject.toml pins vLLM because of these internals; a new version needs the list re-verified
    assert vllm.__version__.split("+")[0] == VERIFIED_ON
