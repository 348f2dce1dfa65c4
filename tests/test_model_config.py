"""ModelConfig: validation messages, serialisation, flavor sizes and FLOPs."""

import pytest

from longtrain.model.config import FLAVORS, ModelConfig, RopeScaling, get_flavor
from longtrain.model.errors import LongtrainError


def test_flavor_sizes_match_published_shapes() -> None:
    # Llama-3-8B and -70B parameter counts as published by Meta.
    assert get_flavor("8b").num_params() == 8_030_261_248
    assert get_flavor("70b").num_params() == 70_553_706_496
    assert 0.8e6 < get_flavor("debug").num_params() < 1.3e6
    assert 6e6 < get_flavor("tiny").num_params() < 8e6
    assert set(FLAVORS) == {"debug", "tiny", "125m", "1b", "8b", "70b"}


def test_round_trip_dict() -> None:
    cfg = get_flavor(
        "debug",
        head_dim=48,
        tie_embeddings=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    )
    assert isinstance(cfg.rope_scaling, RopeScaling)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["rope_scaling"]["type"] == "yarn"


def test_flops_per_token() -> None:
    cfg = get_flavor("8b")
    n = cfg.num_params() - cfg.vocab_size * cfg.dim  # the input embedding is a lookup
    attn_full = 12 * 32 * 32 * 128 * 8192
    assert cfg.flops_per_token(8192, causal=False) == 6 * n + attn_full
    assert cfg.flops_per_token(8192) == 6 * n + attn_full / 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_heads=8, n_kv_heads=3), "n_kv_heads"),
        (dict(dim=250, n_heads=8, head_dim=None), "n_heads"),
        (dict(head_dim=31), "head_dim"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(rope_scaling={"type": "ntk", "factor": 2.0}), "rope_scaling.type"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), "rope_scaling.factor"),
        (
            dict(
                rope_scaling={
                    "type": "llama3",
                    "factor": 8.0,
                    "original_max_position_embeddings": 8,
                }
            ),
            "low_freq_factor",
        ),
        (dict(rope_scaling={"type": "yarn", "factor": 8.0}), "original_max_position_embeddings"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_bad_config_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(LongtrainError, match=field.replace(".", r"\.")) as e:
        ModelConfig.from_dict({**get_flavor("tiny").to_dict(), **kwargs})
    assert "\n" not in str(e.value)


def test_unknown_flavor() -> None:
    with pytest.raises(LongtrainError, match="unknown flavor 'huge'.*debug"):
        get_flavor("huge")
