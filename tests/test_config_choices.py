"""A config value outside its closed set (a ``Literal`` field) is refused where the config is
built, from YAML or in code, naming the field by its dotted path with the nearest spelling;
before this a trainer read ``value_loss: bc`` as MSE and the loop started hours of work with
``rm.train.loss: listwse``."""

from __future__ import annotations

import pytest

from tirforge.agent.pipelines.loop_config import LoopConfig
from tirforge.training.config import build
from tirforge.training.dpo import DPOTrainConfig
from tirforge.training.grpo import GRPOTrainConfig
from tirforge.training.rm import RMTrainConfig
from tirforge.training.sft import SFTTrainConfig
from tirforge.training.value import ValueTrainConfig


@pytest.mark.parametrize("cls, field, bad, near", [
    (ValueTrainConfig, "value_loss", "bc", "bce"),
    (ValueTrainConfig, "conservative_source", "bth", "both"),
    (ValueTrainConfig, "rollout_executor", "dockr", "docker"),
    (RMTrainConfig, "loss", "listwse", "listwise"),
    (RMTrainConfig, "listwise_mode", "softmx", "softmax"),
    (GRPOTrainConfig, "vllm_mode", "colocated", "colocate"),
    (SFTTrainConfig, "style", "fencd", "fenced"),
    (DPOTrainConfig, "style", "tools", "tool"),
])
def test_a_value_outside_its_choices_is_refused(cls, field, bad, near):
    msg = rf"{cls.__name__}\.{field} must be one of .*not {bad} \(did you mean {near}\?\)"
    with pytest.raises(ValueError, match=msg):
        build(cls, {field: bad})  # as read from YAML
    with pytest.raises(ValueError, match=msg):
        cls(**{field: bad})  # built in code
    assert getattr(cls(**{field: near}), field) == near


def test_every_bad_value_is_named_at_once():
    with pytest.raises(ValueError) as e:
        build(ValueTrainConfig, {"value_loss": "nope", "rollout_mix": 3})
    assert "value_loss" in str(e.value) and "rollout_mix must be one of pool, rollouts, not 3" \
        in str(e.value)


def test_an_unknown_key_suggests_its_spelling_and_lists_fields_only_without_one():
    with pytest.raises(ValueError, match=r"lossx \(did you mean loss\?\)$"):
        build(RMTrainConfig, {"lossx": "pairwise"})
    with pytest.raises(ValueError, match=r"zzz; known: \["):
        build(RMTrainConfig, {"zzz": 1})


@pytest.mark.parametrize("data, path", [
    ({"rm": {"train": {"loss": "listwse"}}}, r"LoopConfig\.rm\.train\.loss"),
    ({"executor": {"backend": "lcoal"}}, r"LoopConfig\.executor\.backend"),
    ({"rl": {"grpo": {"vllm_mode": "srv"}}}, r"LoopConfig\.rl\.grpo\.vllm_mode"),
])
def test_the_loop_refuses_a_bad_choice_in_a_section_before_any_work(data, path):
    with pytest.raises(ValueError, match=path + " must be one of"):
        LoopConfig.from_dict(data)
