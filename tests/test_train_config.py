"""The training config: presets validate, overrides are typed, errors name the key, DeepSpeed JSON stays lean."""

from __future__ import annotations

import json

import pytest

from sparsebert.train.config import ConfigError, describe, load_config, presets
from sparsebert.train.distributed import deepspeed_config, guards_steps


@pytest.mark.parametrize("name", presets())
def test_every_preset_validates_with_its_deepspeed_config(name):
    config = load_config(name)
    ds = deepspeed_config(config)
    assert ds["train_micro_batch_size_per_gpu"] == config.train.micro_batch_size
    assert ds["gradient_accumulation_steps"] == config.train.grad_accum_steps
    # At ZeRO stage 0 (no fp16) the trainer's GuardedSteps clips, keeping the norm; elsewhere DeepSpeed clips.
    expected = 0.0 if guards_steps(ds) else config.train.grad_clip
    assert ds["gradient_clipping"] == expected


def test_overrides_are_yaml_typed():
    config = load_config(
        "tiny_cpu",
        ["model.attention_pattern={name: longformer, window: 4}", "train.lr=3e-4", "train.max_steps=100"],
    )
    assert config.model.attention_pattern == {"name": "longformer", "window": 4}
    assert config.train.lr == pytest.approx(3e-4) and config.train.max_steps == 100
    assert config.train.warmup_steps == 100  # from the preset
    assert config.search_steps == 0  # a fixed pattern: nothing to search


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=3", "unknown config key 'train.max_step'"),
        ("modle.size=base", "unknown config key 'modle'"),
        ("train.micro_batch_size=2.5", "'train.micro_batch_size' must be int"),
        ("data.nsp=maybe", "'data.nsp' must be bool"),
        ("train.optimizer=sgd", "'train.optimizer' must be one of lamb, adamw"),
        ("dam.search_steps=5000", "'dam.search_steps' must be between 1 and"),
        ("dam.tau_start=2.0", "'dam.tau_start' and 'dam.tau_end' must be set together"),
        ("no_equals_sign", "not of the form dotted.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", [override])


def test_missing_config_file_names_it_and_lists_presets():
    with pytest.raises(ConfigError, match=r"'nope.yaml' not found \(presets: .*tiny_cpu"):
        load_config("nope.yaml")


def test_deepspeed_json_must_not_repeat_training_values(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 0}}))
    with pytest.raises(ConfigError, match="sets 'train_micro_batch_size_per_gpu'"):
        deepspeed_config(load_config("tiny_cpu", [f"deepspeed_config={path}"]))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(load_config("tiny_cpu", [f"deepspeed_config={path}"]))


def test_lamb_is_refused_under_zero_partitioning():
    with pytest.raises(ConfigError, match="'lamb' needs ZeRO stage 0"):
        deepspeed_config(
            load_config("tiny_cpu", ["deepspeed_config=ds_configs/cpu_zero2.json", "train.optimizer=lamb"])
        )


def test_help_lists_every_key_with_its_default():
    text = describe()
    for key in (
        "output_dir",
        "model.attention_pattern",
        "train.max_steps",
        "dam.search_steps",
        "checkpoint.resume",
    ):
        assert f"{key} = " in text


def test_every_entry_point_offers_every_attention_backend():
    """The pre-training config and the evaluation CLI accept exactly the backends the model knows."""
    from eval.run import check_backend
    from sparsebert.choices import ATTENTION_BACKENDS

    load_config("tiny_cpu", ["model.attention_backend=block_sparse"])
    with pytest.raises(ConfigError, match=r"model\.attention_backend"):
        load_config("tiny_cpu", ["model.attention_backend=fast"])
    for name in ATTENTION_BACKENDS:
        assert check_backend(name) == name
    with pytest.raises(ValueError, match="--attention-backend"):
        check_backend("fast")


def test_a_corpus_longer_than_the_models_positions_is_refused_in_one_line():
    """Found at set-up, naming the corpus and the key, not as a shape error in the first forward pass."""
    from sparsebert.train.setup import _check_positions

    config = load_config(None, ["model.max_position_embeddings=32"])
    with pytest.raises(
        ConfigError, match=r"^the corpus data/x holds 64-token samples, more than model\.max_pos"
    ):
        _check_positions(config, 64, "data/x")
    _check_positions(config, 32, "data/x")  # a corpus that fits
