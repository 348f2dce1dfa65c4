"""HF conversion: logits parity with transformers' LlamaForCausalLM, round trip, CLI errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from longtrain.launch.cli import main
from longtrain.model.config import get_flavor
from longtrain.model.hf import config_from_hf, config_to_hf, state_dict_to_hf
from longtrain.model.transformer import Transformer
from longtrain.train.artifacts import open_artifact
from longtrain.train.export import save_hf, save_model_dir

ORIG = 256  # "pretraining" context of the rope-scaling cases; they are evaluated at 4x that
ROPE = {
    "linear": {"type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 4.0, "original_max_position_embeddings": ORIG},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG},
    "llama3": {
        "type": "llama3",
        "factor": 4.0,
        "original_max_position_embeddings": ORIG,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
}


def _cfg(**kw):
    base = dict(
        vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=1024
    )
    return get_flavor("debug", **{**base, **kw})


def _model(cfg) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(cfg, attention="sdpa")
    with torch.no_grad():  # bigger than init so every path moves the logits visibly
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            else:
                p.uniform_(0.5, 1.5)
    return m.eval()


def _hf_from_dir(path) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _max_diff(m: Transformer, hf: LlamaForCausalLM, T: int) -> float:
    x = torch.randint(0, m.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (m(x) - hf(x).logits).abs().max().item()


CASES = {
    "mha": dict(n_kv_heads=4),
    "gqa": dict(n_kv_heads=2),
    "mqa_tied": dict(n_kv_heads=1, tie_embeddings=True),
    "head_dim_24": dict(head_dim=24),
    **{f"rope_{k}": dict(rope_scaling=v) for k, v in ROPE.items()},
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str, tmp_path) -> None:
    cfg = _cfg(**CASES[case])
    m = _model(cfg)
    save_hf(m, tmp_path, dtype="fp32")
    hf = _hf_from_dir(tmp_path)
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    T = 4 * ORIG if cfg.rope_scaling else 64  # beyond the original context for scaled RoPE
    diff = _max_diff(m, hf, T)
    assert diff <= 1e-4, f"{case}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("rope", list(ROPE))
def test_negative_control_dropped_rope_scaling(rope: str) -> None:
    """The parity check sees a config that loses its rope scaling."""
    cfg = _cfg(rope_scaling=ROPE[rope])
    m = _model(cfg)
    hf_cfg = config_to_hf(cfg)
    hf_cfg["rope_scaling"] = None
    hf_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    hf = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
    hf.load_state_dict(state_dict_to_hf(m.state_dict(), cfg))
    assert _max_diff(m, hf, 4 * ORIG) > 1e-2


def _parity_from_rope_parameters(m: Transformer, path: Path, corrupt: bool = False) -> float:
    """Export, drop the legacy ``rope_scaling`` from config.json so that transformers 5 must
    read ``rope_parameters``, load, compare logits beyond the original context.

    ``corrupt`` (the negative control) halves the factor in ``rope_parameters``: the same
    harness must then see the wrong angles.
    """
    save_hf(m, path, dtype="fp32")
    cfg_file = path / "config.json"
    d = json.loads(cfg_file.read_text())
    assert d.pop("rope_scaling") is not None
    if corrupt:
        d["rope_parameters"]["factor"] /= 2
    cfg_file.write_text(json.dumps(d))
    hf = _hf_from_dir(path)
    assert hf.config.rope_parameters == d["rope_parameters"]  # what transformers went by
    return _max_diff(m, hf, 4 * ORIG)


@pytest.mark.parametrize("rope", list(ROPE))
def test_logits_match_transformers_from_rope_parameters_alone(rope: str, tmp_path) -> None:
    m = _model(_cfg(rope_scaling=ROPE[rope]))
    diff = _parity_from_rope_parameters(m, tmp_path / "ok")
    assert diff <= 1e-4, f"{rope}: max |diff| {diff:.2e}"
    bad = _parity_from_rope_parameters(m, tmp_path / "bad", corrupt=True)
    assert bad > 1e-2, f"{rope}: a halved factor in rope_parameters went unseen ({bad:.2e})"


def test_negative_control_swapped_qk() -> None:
    cfg = _cfg(n_kv_heads=4)
    m = _model(cfg)
    sd = state_dict_to_hf(m.state_dict(), cfg)
    q, k = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    sd[q], sd[k] = sd[k], sd[q]
    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(cfg))).eval()
    hf.load_state_dict(sd)
    assert _max_diff(m, hf, 64) > 1e-2


def test_packed_documents_match_transformers_per_document(tmp_path) -> None:
    cfg = _cfg(rope_scaling=ROPE["yarn"])
    m = _model(cfg)
    save_hf(m, tmp_path, dtype="fp32")
    hf = _hf_from_dir(tmp_path)
    docs = [
        torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 1, 30)
    ]
    cu = torch.tensor([0, 5, 6, 36], dtype=torch.int32)
    with torch.no_grad():
        ours = m(torch.cat(docs)[None], cu_seqlens=cu, max_seqlen=30)
        theirs = torch.cat([hf(d[None]).logits for d in docs], dim=1)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_round_trip_hf_longtrain_hf_bitwise(tmp_path) -> None:
    hf_cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope_theta=50000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_position_embeddings": 256,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    src = LlamaForCausalLM(hf_cfg).to(torch.bfloat16)
    src.save_pretrained(tmp_path / "src", max_shard_size="20KB")  # sharded input
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    assert main(["import-hf", "--hf", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")]) == 0
    rc = main(
        [
            "export-hf",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--out",
            str(tmp_path / "dst"),
            "--dtype",
            "bf16",
        ]
    )
    assert rc == 0
    a = load_hf_tensors(tmp_path / "src")
    b = load_hf_tensors(tmp_path / "dst")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16
        assert torch.equal(a[k], b[k]), k
    c_src = json.loads((tmp_path / "src" / "config.json").read_text())
    c_dst = json.loads((tmp_path / "dst" / "config.json").read_text())
    for key in [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
        "tie_word_embeddings", "rope_parameters",
    ]:  # fmt: skip
        assert c_src[key] == c_dst[key], key
    assert c_dst["rope_scaling"] == {
        k: v for k, v in c_src["rope_parameters"].items() if k != "rope_theta"
    }
    assert config_from_hf(c_dst) == config_from_hf(c_src)
    hf_back = _hf_from_dir(tmp_path / "dst")
    x = torch.randint(0, 101, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(
            hf_back(x).logits, _hf_from_dir(tmp_path / "src")(x).logits, rtol=0, atol=0
        )


def load_hf_tensors(path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_sharded_export_and_generation_config(tmp_path) -> None:
    m = _model(_cfg(tie_embeddings=True))
    files = save_hf(m, tmp_path, dtype="fp32", max_shard_size="30KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size < 30_000 + 64 * 97 * 4 for s in shards)  # one tensor may overflow
    assert (tmp_path / "generation_config.json").is_file()
    assert _max_diff(m, _hf_from_dir(tmp_path), 32) <= 1e-4
    back = open_artifact(tmp_path).model()
    for (k, v), (k2, v2) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_config_json_keys_for_transformers_4_and_5() -> None:
    """5 reads rope_parameters, 4.4x reads rope_scaling (with rope_type) and top-level theta."""
    cfg = _cfg(rope_theta=5e5, rope_scaling=ROPE["llama3"])
    d = config_to_hf(cfg)
    assert d["rope_theta"] == 5e5 and d["rope_parameters"]["rope_theta"] == 5e5
    assert d["rope_scaling"]["rope_type"] == "llama3"
    for key in (
        "factor",
        "original_max_position_embeddings",
        "low_freq_factor",
        "high_freq_factor",
    ):
        assert d["rope_scaling"][key] == d["rope_parameters"][key]
    for rope in ("dynamic", "yarn"):  # transformers' reference length for these two types
        d = config_to_hf(_cfg(rope_scaling=ROPE[rope]))
        assert d["max_position_embeddings"] == ORIG
        back = config_from_hf(d)
        assert back.rope_scaling == _cfg(rope_scaling=ROPE[rope]).rope_scaling
        assert back.max_seq_len == 4 * ORIG


# ---- bad input through the CLI: exit 2 and one line ---------------------------------------


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_refuses_non_llama(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    err = _cli_error(capsys, ["import-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "import-hf: error:" in err and "gpt2" in err and "(LlamaForCausalLM) only" in err


def test_cli_missing_files(tmp_path, capsys) -> None:
    err = _cli_error(capsys, ["import-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "config.json: file not found" in err
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(_cfg())))
    err = _cli_error(capsys, ["import-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "no weights found" in err
    err = _cli_error(
        capsys, ["export-hf", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    assert "export-hf: error:" in err and "nope" in err  # names the path


def test_cli_pickle_needs_flag(tmp_path, capsys) -> None:
    cfg = _cfg()
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    torch.save(state_dict_to_hf(_model(cfg).state_dict(), cfg), tmp_path / "pytorch_model.bin")
    err = _cli_error(capsys, ["import-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "--allow-pickle" in err
    assert (
        main(["import-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "o"), "--allow-pickle"])
        == 0
    )


def test_cli_bad_head_config_and_shard_size(tmp_path, capsys) -> None:
    m = _model(_cfg())
    save_model_dir(m, tmp_path)
    err = _cli_error(
        capsys,
        [
            "export-hf",
            "--checkpoint",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--max-shard-size",
            "lots",
        ],
    )
    assert "--max-shard-size" in err
    d = json.loads((tmp_path / "model_config.json").read_text())
    d["n_kv_heads"] = 3
    (tmp_path / "model_config.json").write_text(json.dumps(d))
    err = _cli_error(
        capsys, ["export-hf", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert "model_config.json" in err and "n_kv_heads" in err


def test_export_with_tokenizer_loads_in_auto_classes(tmp_path) -> None:
    from transformers import AutoTokenizer

    from longtrain.data.tokenizer import Tokenizer, train_tokenizer

    root = Path(json.__file__).parent.parent  # the stdlib: text that is always there
    docs = [(p.name, p.read_text(encoding="utf-8")) for p in sorted(root.glob("[a-c]*.py"))[:40]]
    train_tokenizer(docs, tmp_path / "tok", vocab_size=400, sample_mb=1, progress=False)
    tok = Tokenizer.load(tmp_path / "tok")
    m = _model(_cfg(vocab_size=tok.vocab_size))
    save_model_dir(m, tmp_path / "ckpt")
    argv = ["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]
    assert main([*argv, "--tokenizer", str(tmp_path / "tok"), "--dtype", "fp32"]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert cfg["bos_token_id"] == gen["bos_token_id"] == tok.bos_id
    assert cfg["eos_token_id"] == gen["eos_token_id"] == tok.eos_id
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def main():\n    return 0\n"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    hf = _hf_from_dir(tmp_path / "hf")
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert (hf(ids).logits - m(ids)).abs().max().item() <= 1e-4
