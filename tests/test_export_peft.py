"""Exports that other tools read as they are: a PEFT adapter of a LoRA run, complete HF dirs.

One short LoRA fine-tune (``longtrain finetune``, one rank, from a transformers directory),
exported three ways by ``longtrain export-hf``: merged (``--merge-lora``), merged plus the
adapters as a PEFT adapter directory (``--lora-adapter``), and base weights plus the adapter.

- peft loads the adapter onto the initial model: its logits equal the merged export's within
  1e-5 and ``merge_and_unload()`` gives the merged export's weights; the same over our own
  base-weights export. Negative control: the adapter with the wrong ``lora_alpha`` is off.
- ``GenerationConfig.from_pretrained`` reads bos/eos/pad of the tokenizer, and the model
  card's figures are the run's: steps, tokens, the last validation and training loss of its
  ``metrics.jsonl``, the manifest's counts, the command recorded in ``commands.jsonl``.
  Negative control: a metrics row after the checkpoint's step is not taken, one at it is.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from longtrain.data.tokenizer import Tokenizer
from longtrain.launch.cli import main as cli
from longtrain.model.config import get_flavor
from longtrain.model.transformer import Transformer
from longtrain.train.export import save_hf

peft = pytest.importorskip("peft")  # the dev extras install it
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.05, "targets": ["wq", "wv", "wo", "w2"]}
STEPS = 4


@pytest.fixture(scope="module")
def lora_run(work: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-step LoRA fine-tune (evaluated at steps 0, 2, 4) and its three exports."""
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    init = root / "init"
    cfg = get_flavor("debug", **SHAPE, vocab_size=512, max_seq_len=128)
    save_hf(Transformer(cfg, attention="sdpa"), init, tokenizer=work / "tok", dtype="fp32")
    run = root / "run"
    job = {
        "model": {"flavor": "debug", "attention": "sdpa", "init": str(init)},
        "data": {"dir": str(work / "data"), "seq_len": 128, "attention": "document",
                 "val_batches": 2},
        "train": {"steps": STEPS, "lr": 2e-2, "warmup": 1, "schedule": "constant"},
        "parallel": {"zero_stage": 2, "dtype": "fp32", "timeout_s": 120},
        "checkpoint": {"interval": 0, "keep": 2},
        "log": {"interval": 1, "eval_interval": 2, "tensorboard": False, "progress": False},
        "finetune": {"lora": LORA},
        "run_dir": str(run),
    }  # fmt: skip
    cfg_path = root / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "longtrain.launch", "finetune", "--config", str(cfg_path),
           "train.warmup=2"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = {"root": root, "init": init, "run": run}
    for name, extra in (
        ("merged", ["--merge-lora"]),
        ("merged_a", ["--merge-lora", "--lora-adapter", str(root / "adapter")]),
        ("base", ["--lora-adapter", str(root / "adapter_b")]),
    ):
        out[name] = root / name
        argv = ["export-hf", "--checkpoint", str(run), "--out", str(out[name]), "--dtype", "fp32"]
        assert cli([*argv, *extra]) == 0
    out["adapter"], out["adapter_b"] = root / "adapter", root / "adapter_b"
    return out


def _hf(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 512, (2, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits


def test_peft_loads_the_adapter_like_the_merged_export(lora_run: dict[str, Path]) -> None:
    from peft import PeftModel

    cfg = json.loads((lora_run["adapter"] / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8.0, 0.05)
    assert cfg["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == str(lora_run["init"])  # model.init is HF: named
    cfg_b = json.loads((lora_run["adapter_b"] / "adapter_config.json").read_text())
    assert cfg_b["base_model_name_or_path"] == str(lora_run["base"].resolve())  # our base export
    names = sorted(load_file(lora_run["adapter"] / "adapter_model.safetensors"))
    assert len(names) == 2 * 4 * SHAPE["n_layers"]
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
    merged = _hf(lora_run["merged"])
    want = _logits(merged)
    # The merged export is the same whether or not the adapter was written next to it.
    for a, b in zip(merged.state_dict().values(), _hf(lora_run["merged_a"]).state_dict().values()):
        assert torch.equal(a, b)
    for base, adapter in ((lora_run["init"], "adapter"), (lora_run["base"], "adapter_b")):
        pm = PeftModel.from_pretrained(_hf(base), str(lora_run[adapter])).eval()
        err = float((_logits(pm) - want).abs().max())
        print(f"\npeft over {base.name} + {adapter} vs merged export: max |logit diff| {err:.2e}")
        assert err <= 1e-5
        unloaded = pm.merge_and_unload().state_dict()
        ref = merged.state_dict()
        assert sorted(unloaded) == sorted(ref)
        worst = max(float((unloaded[k] - ref[k]).abs().max()) for k in ref)
        print(f"merge_and_unload() vs merged export: max |weight diff| {worst:.2e}")
        assert worst <= 1e-6, worst
    # Negative control: an adapter scaled wrong (alpha doubled) gives other logits.
    bad = lora_run["root"] / "adapter_bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes(
        (lora_run["adapter"] / "adapter_model.safetensors").read_bytes()
    )
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 16.0}))
    pm = PeftModel.from_pretrained(_hf(lora_run["init"]), str(bad)).eval()
    assert float((_logits(pm) - want).abs().max()) > 1e-3
    # The base export is the initial model's weights (the adapters left out).
    base, init = _hf(lora_run["base"]).state_dict(), _hf(lora_run["init"]).state_dict()
    assert all(torch.equal(base[k], init[k]) for k in init)


def test_export_files_come_from_the_run(lora_run: dict[str, Path], work: Path) -> None:
    out, run = lora_run["merged"], lora_run["run"]
    tok = Tokenizer.load(work / "tok")
    gen = GenerationConfig.from_pretrained(str(out))
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id,
    )  # fmt: skip
    card = (out / "README.md").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("val_loss") is not None]
    train = [r for r in rows if r.get("loss") is not None]
    assert [r["step"] for r in val] == [0, 2, 4]
    assert f"| final validation loss | {val[-1]['val_loss']!r} (step {STEPS}) |" in card
    assert f"| last training loss | {train[-1]['loss']!r} (step {STEPS}) |" in card
    state = json.loads(
        (run / "checkpoints" / f"step_{STEPS:08d}" / "client_state.json").read_text()
    )
    assert f"| steps | {STEPS} |" in card
    assert f"| tokens trained | {state['parts']['progress']['tokens_seen']:,} |" in card
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert f"| documents | {manifest['documents']:,} |" in card
    assert f"| tokens | {manifest['tokens']:,} |" in card
    assert f"`{manifest['tokenizer_hash']}`" in card
    assert (
        "| parameters | " + f"{sum(v.numel() for v in _hf(out).state_dict().values()):,} |" in card
    )
    assert (
        "| RoPE | theta 10000, no scaling |" in card and "| context length | 128 tokens |" in card
    )
    assert "LoRA r=4 alpha=8 merged in" in card
    assert "LoRA r=4 alpha=8 not included" in (lora_run["base"] / "README.md").read_text()
    cmds = [json.loads(line) for line in (run / "commands.jsonl").read_text().splitlines()]
    assert len(cmds) == 1 and cmds[0]["command"][:3] == ["longtrain", "finetune", "--config"]
    assert cmds[0]["command"][-1] == "train.warmup=2" and cmds[0]["world_size"] == 1
    assert f"```bash\n{shlex.join(cmds[0]['command'])}\n```" in card
    assert f"  init: {lora_run['init']}" in card  # the resolved config follows
    # A second export of the same checkpoint writes the same files, byte for byte.
    again = lora_run["root"] / "again"
    assert cli(["export-hf", "--checkpoint", str(run), "--out", str(again), "--dtype", "fp32",
                "--merge-lora"]) == 0  # fmt: skip
    for f in sorted(p.name for p in out.iterdir() if p.suffix != ".safetensors"):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    # Negative control: the card reads metrics.jsonl, up to the checkpoint's step only.
    metrics = run / "metrics.jsonl"
    original = metrics.read_text()
    try:
        metrics.write_text(original + json.dumps({"step": STEPS + 1, "val_loss": 0.5}) + "\n")
        assert cli(["export-hf", "--checkpoint", str(run), "--out", str(again), "--dtype",
                    "fp32", "--merge-lora"]) == 0  # fmt: skip
        assert (again / "README.md").read_text() == card
        metrics.write_text(original + json.dumps({"step": STEPS, "val_loss": 0.5}) + "\n")
        assert cli(["export-hf", "--checkpoint", str(run), "--out", str(again), "--dtype",
                    "fp32", "--merge-lora"]) == 0  # fmt: skip
        assert (
            f"| final validation loss | 0.5 (step {STEPS}) |" in (again / "README.md").read_text()
        )
    finally:
        metrics.write_text(original)


def test_final_model_dir_carries_the_record(lora_run: dict[str, Path]) -> None:
    """``final/`` (a model directory) exports the same card as the checkpoint it came from."""
    out = lora_run["root"] / "from_final"
    argv = ["export-hf", "--checkpoint", str(lora_run["run"] / "final"), "--out", str(out)]
    assert cli([*argv, "--dtype", "fp32", "--merge-lora"]) == 0
    assert (out / "README.md").read_text() == (lora_run["merged"] / "README.md").read_text()
    adapter = lora_run["root"] / "adapter_final"
    assert cli([*argv[:-1], str(lora_run["root"] / "b2"), "--lora-adapter", str(adapter)]) == 0
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_dropout"] == 0.05


def test_lora_adapter_refusals(lora_run: dict[str, Path], tmp_path: Path, capsys) -> None:
    def err(argv: list[str]) -> str:
        assert cli(argv) == 2
        return capsys.readouterr().err.strip()

    # A run without adapters (the HF init, as a model directory) has nothing to write.
    model_dir = tmp_path / "plain"
    assert cli(["import-hf", "--hf", str(lora_run["init"]), "--out", str(model_dir)]) == 0
    msg = err(["export-hf", "--checkpoint", str(model_dir), "--out", str(tmp_path / "o"),
               "--lora-adapter", str(tmp_path / "a")])  # fmt: skip
    assert "--lora-adapter" in msg and "no LoRA adapters" in msg and len(msg.splitlines()) == 1
    same = str(tmp_path / "same")
    msg = err(["export-hf", "--checkpoint", str(lora_run["run"]), "--out", same,
               "--lora-adapter", same])  # fmt: skip
    assert "another directory than --out" in msg
