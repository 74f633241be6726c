"""Methods register themselves once, and every config's ``method:`` is checked against them."""

import pytest

from mend.errors import ConfigError
from mend.methods import MethodConfig, get_method, method_names, register_method
from mend.recipes.finetune import RECIPES, recipe_for


def test_every_method_registers_itself_once():
    assert method_names() == ("zero_shot", "icl", "kv_compress", "prompt_tuning", "mend",
                              "hypertuning")
    assert [get_method(n).needs for n in method_names()] == [
        "llm", "llm", "llm", "checkpoint", "checkpoint", "checkpoint"]
    with pytest.raises(ValueError, match="registered twice"):
        register_method("icl", load=lambda cfg, device: None, needs="llm")


def test_an_unknown_method_is_a_config_error_listing_the_registered_ones():
    with pytest.raises(ConfigError, match="Unknown method `icl2`; choose from zero_shot, icl, "
                                          "kv_compress, prompt_tuning, mend, hypertuning"):
        MethodConfig("icl2", llm="x")
    with pytest.raises(ConfigError, match="`pbft` is a baseline with its own command: mend nli "
                                          "pbft"):
        recipe_for({"method": "pbft"})
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        MethodConfig("hypertuning")


def test_finetune_finds_a_methods_stage_two_recipe_in_its_own_table():
    assert recipe_for({}) is RECIPES["mend"]
    assert recipe_for({"method": "prompt_tuning"}) is RECIPES["prompt_tuning"]
    with pytest.raises(ConfigError, match="icl is not trained by mend finetune; it trains "
                                          "mend, prompt_tuning"):
        recipe_for({"method": "icl"})
