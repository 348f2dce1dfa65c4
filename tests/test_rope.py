"""RoPE frequencies equal transformers' ROPE_INIT_FUNCTIONS bit for bit, every type and option."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from longtrain.model.config import get_flavor
from longtrain.model.hf import config_to_hf
from longtrain.model.rope import RotaryEmbedding, apply_rotary, compute_inv_freq

CASES = {
    "linear": {"type": "linear", "factor": 3.0},
    "dynamic": {"type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "yarn_options": {
        "type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 512,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "truncate": False,
    },
    "yarn_attention_factor": {
        "type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 128,
        "attention_factor": 1.3,
    },
    "llama3": {
        "type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
}


def _cfg(rs, **kw):
    return get_flavor(
        "debug", head_dim=64, rope_theta=500000.0, max_seq_len=2048, rope_scaling=rs, **kw
    )


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_bitwise_equal_to_transformers(name: str) -> None:
    cfg = _cfg(CASES[name])
    hf_cfg = LlamaConfig(**config_to_hf(cfg))
    rope_type = CASES[name]["type"]
    lengths = [None, 100, 1024, 3000] if rope_type == "dynamic" else [None]
    for seq_len in lengths:
        theirs, t_scale = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu", seq_len=seq_len)
        ours, o_scale = compute_inv_freq(cfg, seq_len=seq_len or 0)
        assert torch.equal(ours, theirs), (name, seq_len, (ours - theirs).abs().max())
        assert o_scale == t_scale


def test_dynamic_cos_sin_follow_transformers_forward() -> None:
    """Forward over positions 0..T-1 on a fresh transformers module, T below and above 256."""
    cfg = _cfg(CASES["dynamic"])
    ours = RotaryEmbedding(cfg)
    for T in (200, 1000):
        theirs = LlamaRotaryEmbedding(LlamaConfig(**config_to_hf(cfg)))
        pos = torch.arange(T)[None]
        c1, s1 = ours(pos)
        c2, s2 = theirs(torch.zeros(1, dtype=torch.float32), pos)
        assert torch.equal(c1, c2) and torch.equal(s1, s2), T
    # max_seqlen (the window's longest document) decides the length under sequence parallelism
    c_shard, _ = ours(torch.arange(500, 1000)[None], max_seqlen=1000)
    torch.testing.assert_close(c_shard, ours(torch.arange(1000)[None])[0][:, 500:], rtol=0, atol=0)


def test_scaling_changes_frequencies() -> None:
    """Control: each type really moves the frequencies away from plain RoPE."""
    plain, _ = compute_inv_freq(_cfg(None))
    for name, rs in CASES.items():
        scaled, _ = compute_inv_freq(_cfg(rs), seq_len=4096)
        assert not torch.equal(scaled, plain), name


def test_apply_rotary_is_a_rotation() -> None:
    cfg = _cfg(None)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(10)[None])
    x = torch.randn(1, 10, 3, 64)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # norms kept
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 untouched
    # relative: <R(p) q, R(p') k> depends on p - p' only
    q, k = torch.randn(64), torch.randn(64)
    qs = apply_rotary(q.expand(1, 10, 1, 64), cos, sin)[0, :, 0]
    ks = apply_rotary(k.expand(1, 10, 1, 64), cos, sin)[0, :, 0]
    torch.testing.assert_close(qs[5] @ ks[3], qs[7] @ ks[5], rtol=1e-5, atol=1e-5)
