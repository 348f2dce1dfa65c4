"""Fine-tuning: SFT masks + chat template, context extension, staged resume, LoRA, classification.

Each ``longtrain finetune`` run is a real subprocess (one rank, DeepSpeed on CPU, fp32) on a
0.2M-parameter model and a small corpus of stdlib files tokenized once per session.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from longtrain.data.tokenizer import Tokenizer

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192)
TIMEOUT = 420


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: with the 2 cores shared by other jobs, a second OpenMP thread
    spin-waits for a busy core and made these tiny steps 10x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def finetune(cfg: dict, overrides: list[str] = (), env: dict | None = None, check: bool = True):
    """Run ``python -m longtrain.launch finetune`` in a subprocess; returns the CompletedProcess."""
    path = Path(cfg["run_dir"] + ".yaml")
    path.write_text(yaml.safe_dump(cfg))
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "longtrain.launch", "finetune", "--config", str(path), *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(
            f"finetune failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def base_cfg(run_dir: Path, data_dir: Path, **sections) -> dict:
    cfg = {
        "model": {
            "flavor": "debug",
            "attention": "sdpa",
            "overrides": {**SHAPE, "vocab_size": 512},
        },
        "data": {"dir": str(data_dir), "seq_len": 64, "attention": "causal", "val_batches": 2},
        "train": {"steps": 6, "micro_batch": 2, "lr": 2e-3, "warmup": 1, "schedule": "constant"},
        "parallel": {"zero_stage": 1, "dtype": "fp32", "timeout_s": 120},
        "checkpoint": {"interval": 0, "keep": 2},
        "log": {"interval": 1, "eval_interval": 0, "tensorboard": False, "progress": False},
        "run_dir": str(run_dir),
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# ---- SFT ----------------------------------------------------------------------------------


def test_sft_mask_token_by_token_and_chat_template_round_trip(work: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from longtrain.data.loader import DistributedLoader
    from longtrain.data.tokenizer import save_hf_tokenizer

    tok = Tokenizer.load(work / "tok")
    role_of = {v: k for k, v in tok.role_ids.items()}
    loader = DistributedLoader(work / "sft", seq_len=128, micro_batch=4, attention="document")
    checked = trained = 0
    for _ in range(3):
        b = loader.__next__()
        for ids, labels in zip(b["input_ids"].tolist(), b["labels"].tolist()):
            # Walk the window: a role marker opens a message and the tokens after it belong to
            # it; before the first marker or EOS the window started mid-message (unknown).
            role, known = None, False
            for t in range(len(ids) - 1):  # the last input's target lies outside the window
                if ids[t] in role_of:
                    role, known = role_of[ids[t]], True
                elif ids[t] == tok.eos_id:
                    role, known = None, True
                if not known:
                    continue
                nxt = ids[t + 1]
                # Trained: assistant content and its <|end|>; never a marker, EOS or other roles.
                want = role == "assistant" and nxt not in role_of and nxt != tok.eos_id
                assert (labels[t] != -100) == want, (t, ids[max(0, t - 3) : t + 2], labels[t])
                if want:
                    assert labels[t] == nxt
                    trained += 1
                checked += 1
    assert checked > 1000 and trained > 100, (checked, trained)
    # The exported tokenizer's chat template reproduces the training ids exactly.
    out = tmp_path / "hf_tok"
    save_hf_tokenizer(work / "tok", out)
    hf = AutoTokenizer.from_pretrained(str(out))
    from longtrain.data.sft import encode_chat

    for line in (work / "chat.jsonl").read_text().splitlines()[:20]:
        msgs = json.loads(line)["messages"]
        ids, _ = encode_chat(tok, msgs)
        got = hf.apply_chat_template(msgs, tokenize=True)
        got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
        assert list(got) == ids
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in cfg["chat_template"]


# ---- LoRA + SFT from an HF directory --------------------------------------------------------


def test_lora_sft_from_hf_only_adapters_change_and_merged_export_matches(
    work: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from longtrain.launch.cli import main as cli
    from longtrain.model.config import get_flavor
    from longtrain.model.lora import LoRAConfig, apply_lora
    from longtrain.model.transformer import Transformer
    from longtrain.train.export import save_hf

    torch.manual_seed(0)
    cfg = get_flavor("debug", **SHAPE, vocab_size=512, max_seq_len=128)
    init_dir = tmp_path / "hf_init"
    save_hf(Transformer(cfg, attention="sdpa"), init_dir, tokenizer=work / "tok", dtype="fp32")
    run = tmp_path / "lora"
    lora = {"rank": 4, "alpha": 8.0, "targets": ["wq", "wv", "w2"]}
    finetune(
        base_cfg(
            run,
            work / "sft",
            model={"init": str(init_dir), "overrides": {}},
            data={"seq_len": 128, "attention": "document"},
            train={"steps": 5, "lr": 1e-2},
            parallel={"zero_stage": 3},
            finetune={"task": "lm", "lora": lora},
        )
    )
    rows = [r for r in metrics(run) if "loss" in r]
    assert len(rows) == 5 and all(np.isfinite(r["loss"]) for r in rows)
    from longtrain.train.artifacts import open_artifact

    init_sd = open_artifact(init_dir).model(attention="sdpa").state_dict()
    final = load_state(run / "final")
    adapters = {k for k in final if k.endswith((".lora_a", ".lora_b"))}
    assert len(adapters) == 2 * 3 * cfg.n_layers
    for k, v in init_sd.items():  # every base weight bit-identical to the HF initial model
        assert torch.equal(final[k], v), k
    assert all(final[k].abs().max() > 0 for k in adapters if k.endswith(".lora_b"))
    # Unmerged reference: the base model plus the trained adapters, in longtrain.
    ref = Transformer(cfg, attention="sdpa")
    apply_lora(ref, LoRAConfig(4, 8.0, 0.0, ("wq", "wv", "w2")))
    ref.load_state_dict(final)
    ref.eval()
    ids = torch.randint(0, 512, (2, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids)
    for src in (run / "final", run):  # the model dir, and the run's training checkpoint
        out = tmp_path / f"hf_merged_{src.name}"
        argv = ["export-hf", "--checkpoint", str(src), "--out", str(out), "--merge-lora"]
        assert cli([*argv, "--dtype", "fp32", "--tokenizer", str(work / "tok")]) == 0
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            got = hf(ids).logits
        err = float((got - want).abs().max())
        print(f"merged export ({src.name}) vs unmerged logits: max abs diff {err:.2e}")
        assert err < 1e-5
    assert cli(["export-hf", "--checkpoint", str(run / "final"), "--out", str(tmp_path / "x")]) == 2


# ---- sequence classification ----------------------------------------------------------------

FILLER = ["self", "return", "value", "data", "None", "import", "list", "dict", "item", "name"]


def write_classify_data(d: Path, n_train: int, n_val: int, seed: int = 0) -> None:
    """Label = the colour word at the start; ~150 filler words follow it (far from the end)."""
    rng = random.Random(seed)
    d.mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        with open(d / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                label = rng.randint(0, 1)
                words = ["colour", ("red", "blue")[label]] + rng.choices(FILLER, k=150)
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")


def cls_cfg(work: Path, run: Path, data: Path, **sections) -> dict:
    cfg = base_cfg(
        run,
        data,
        data={"seq_len": 256, "tokenizer": str(work / "tok")},
        train={"steps": 30, "micro_batch": 8, "lr": 3e-3, "warmup": 4},
        log={"interval": 1, "eval_interval": 10},
    )
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


@pytest.fixture(scope="module")
def cls_run(work: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A single-process classification run (full fine-tune from scratch), and its data."""
    root = tmp_path_factory.mktemp("cls")
    data, run = root / "cls", root / "cls_run"
    write_classify_data(data, 512, 64)
    finetune(
        cls_cfg(
            work,
            run,
            data,
            finetune={
                "task": "classify",
                "num_labels": 2,
                "early_stopping": {"patience": 3, "min_delta": 0.0},
            },
        )  # fmt: skip
    )
    return run, data


def test_classification_learns_far_token_and_hf_export_matches(
    work: Path, cls_run: tuple[Path, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    from longtrain.data.classify import ClassifyData
    from longtrain.launch.cli import main as cli
    from longtrain.model.config import ModelConfig
    from longtrain.model.heads import TransformerForClassification, last_token_logits
    from longtrain.train.files import MODEL_CONFIG as MODEL_CONFIG_FILE

    run, data = cls_run
    evals = [r for r in metrics(run) if "val_acc" in r]
    print("classification evals:", [(r["step"], round(r["val_loss"], 3), r["val_acc"], round(r["val_f1"], 3)) for r in evals])  # fmt: skip
    assert evals[0]["step"] == 0
    best = json.loads((run / "best" / "source.json").read_text())
    assert best["val_loss"] == min(r["val_loss"] for r in evals[1:])
    assert evals[-1]["val_acc"] >= 0.9 and evals[-1]["val_f1"] >= 0.9, evals[-1]
    # The deciding word sits in the first 8 tokens, > 150 tokens before the scored last token.
    val = ClassifyData(data, "val", work / "tok", 256, 2)
    for i in range(len(val)):
        head = val.tok.decode(val.ids[i, :8].tolist())
        tail = val.tok.decode(val.ids[i, 8 : val.lengths[i]].tolist())
        assert ("red", "blue")[val.labels[i]] in head and "red" not in tail and "blue" not in tail
    assert val.lengths.min() > 150
    # Export: transformers' LlamaForSequenceClassification gives the same logits.
    out = tmp_path / "hf_cls"
    argv = ["export-hf", "--checkpoint", str(run / "final"), "--out", str(out)]
    assert cli([*argv, "--dtype", "fp32", "--tokenizer", str(work / "tok")]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.config.pad_token_id == val.tok.pad_id and hf.config.num_labels == 2
    cfg = ModelConfig.from_dict(json.loads((run / "final" / MODEL_CONFIG_FILE).read_text()))
    ours = TransformerForClassification(cfg, 2, attention="sdpa")
    ours.load_state_dict(load_state(run / "final"))
    ours.eval()
    ids, lengths = torch.from_numpy(val.ids[:16]), torch.from_numpy(val.lengths[:16])
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        want = last_token_logits(ours, ids, lengths)
        got = hf(input_ids=ids, attention_mask=mask).logits
    err = float((got - want).abs().max())
    print(f"LlamaForSequenceClassification vs longtrain logits: max abs diff {err:.2e}")
    assert err < 1e-4
    acc = float((got.argmax(-1) == torch.from_numpy(val.labels[:16])).float().mean())
    assert acc >= 0.9


# ---- context extension ------------------------------------------------------------------------


def position_bucket_losses(
    model: torch.nn.Module, data: Path, seq_len: int, bucket: int, max_windows: int
) -> list[tuple[int, int, float]]:
    """``[(lo, hi, mean loss)]`` per position bucket over the first validation windows."""
    from longtrain.data.loader import validation_batches
    from longtrain.train.eval.ppl import eval_ppl

    batches = validation_batches(data, seq_len, attention="causal", max_batches=max_windows)
    res = eval_ppl(model, batches, seq_len, bucket, torch.device("cpu"), progress=False)
    return [(r["start"], min(r["end"], seq_len), r["loss"]) for r in res["buckets"]]


def pretrain_short(work: Path, out: Path, seq_len: int, steps: int) -> None:
    """A plain PyTorch pretraining loop at ``seq_len`` (the 'starting checkpoint')."""
    from longtrain.data.loader import DistributedLoader
    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer
    from longtrain.train.export import save_model_dir

    torch.manual_seed(0)
    cfg = get_flavor("debug", **SHAPE, vocab_size=512, max_seq_len=seq_len)
    model = Transformer(cfg, attention="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    loader = DistributedLoader(work / "data", seq_len=seq_len, micro_batch=8, attention="causal")
    for _ in range(steps):
        b = next(loader)
        s, c = model.loss(b["input_ids"], b["labels"], b["position_ids"])
        (s / c).backward()
        opt.step()
        opt.zero_grad()
    save_model_dir(model, out)


def test_context_extension_yarn_lowers_loss_beyond_training_length(
    work: Path, tmp_path: Path
) -> None:
    from longtrain.launch.cli import main as cli
    from longtrain.train.artifacts import open_artifact

    start = tmp_path / "ckpt256"
    pretrain_short(work, start, 256, 60)
    run = tmp_path / "ext"
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    finetune(
        base_cfg(
            run,
            work / "data",
            model={"init": str(start), "overrides": {"rope_scaling": yarn}},
            data={"seq_len": 1024},
            train={"steps": 10, "micro_batch": 2, "lr": 1e-3, "warmup": 2},
        )
    )
    m0 = open_artifact(start).model(attention="sdpa")
    m0.cfg.max_seq_len = 1024  # same weights and RoPE, evaluated past its training length
    m1 = open_artifact(run / "final").model(attention="sdpa")
    assert m1.cfg.rope_scaling is not None and m1.cfg.rope_scaling.type == "yarn"
    before = position_bucket_losses(m0, work / "data", 1024, 256, max_windows=6)
    after = position_bucket_losses(m1, work / "data", 1024, 256, max_windows=6)
    print(
        "\nval loss by position bucket (start: trained at 256, default RoPE; after: 1024 + YaRN x4)"
    )
    print(f"{'positions':>12} {'start':>8} {'after':>8}")
    for (lo, hi, a), (_, _, b) in zip(before, after):
        print(f"{lo:>5}-{hi:<6} {a:8.4f} {b:8.4f}")
    for (lo, _, a), (_, _, b) in zip(before[1:], after[1:]):  # every bucket beyond 256
        assert b < a, (lo, a, b)
    out = tmp_path / "hf_ext"
    assert cli(["export-hf", "--checkpoint", str(run / "final"), "--out", str(out)]) == 0
    hf_cfg = json.loads((out / "config.json").read_text())
    rp = hf_cfg["rope_parameters"]
    assert rp["rope_type"] == "yarn" and rp["factor"] == 4.0
    assert rp["original_max_position_embeddings"] == 256


# ---- staged curriculum ----------------------------------------------------------------------


def test_staged_loader_continues_without_repeats(work: Path) -> None:
    from longtrain.data.curriculum import StagedLoader

    def covered(loader: StagedLoader, steps: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(steps):
            b = next(loader)
            L = loader.seq_len
            out += [(int(w) * L, int(w) * L + L) for w in b["sample_ids"]]
        return out

    a = StagedLoader(work / "data", 256, 64, 3, 0, 1, 0, 1, seed=1)
    spans = covered(a, 5)  # 15 windows of 64: ends mid-block and off a 128 boundary
    b = StagedLoader(work / "data", 256, 128, 2, 0, 1, 0, 1, seed=1)
    b.load_state_dict(a.state_dict())
    spans += covered(b, 6)
    spans.sort()
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:])), "a token range was repeated"
    # DP=2 reads the same windows as DP=1 with twice the micro-batch.
    c0 = StagedLoader(work / "data", 256, 128, 1, 0, 2, 0, 1, seed=1)
    c1 = StagedLoader(work / "data", 256, 128, 1, 1, 2, 0, 1, seed=1)
    d = StagedLoader(work / "data", 256, 128, 2, 0, 1, 0, 1, seed=1)
    for _ in range(3):
        both = torch.cat([next(c0)["sample_ids"], next(c1)["sample_ids"]])
        assert torch.equal(both, next(d)["sample_ids"])


STAGES = [
    {"name": "short", "steps": 3, "seq_len": 64, "micro_batch": 2, "lr": 2e-3},
    {"name": "long", "steps": 4, "seq_len": 128, "micro_batch": 1, "lr": 1e-3, "warmup": 1,
     "rope_scaling": {"type": "linear", "factor": 2.0}},
]  # fmt: skip


def staged_cfg(work: Path, run: Path, stages: list[dict]) -> dict:
    return base_cfg(
        run,
        work / "data",
        checkpoint={"interval": 2, "keep": 3},
        log={"interval": 1, "eval_interval": 0},
        finetune={"stages": stages},
    )


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


@pytest.fixture(scope="module")
def staged_full(work: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted single-process staged run (the reference of two tests)."""
    run = tmp_path_factory.mktemp("staged") / "full"
    finetune(staged_cfg(work, run, STAGES))
    return run


def test_staged_run_interrupted_in_stage2_equals_uninterrupted(
    work: Path, staged_full: Path, tmp_path: Path
) -> None:
    def cfg(run: Path) -> dict:
        return staged_cfg(work, run, STAGES)

    full, cut = staged_full, tmp_path / "cut"
    p = finetune(cfg(cut), env={"LONGTRAIN_CRASH_AFTER_STEP": "5"}, check=False)
    assert p.returncode == 17, p.stderr[-2000:]
    done = sorted(x.name for x in (cut / "checkpoints").glob("step_*") if (x / "COMMIT").is_file())
    assert done[-1] == "step_00000004", (
        done
    )  # interval 2 + stage end 3: the newest is inside stage 2
    assert not (cut / "final").exists()
    finetune(cfg(cut))  # checkpoint.resume=auto: continues from step 4, inside stage 2

    lf, lc = losses(full), losses(cut)
    print("\nstep  uninterrupted  interrupted+resumed")
    for s in sorted(lf):
        print(f"{s:>4}  {lf[s]:.8f}     {lc[s]:.8f}")
    assert sorted(lf) == sorted(lc) == list(range(1, 8))
    for s in lf:
        assert lc[s] == pytest.approx(lf[s], rel=1e-6, abs=0), s
    a, b = load_state(full / "final"), load_state(cut / "final")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"final weights: max abs diff {worst:.2e}")
    assert worst <= 1e-6
    from longtrain.train.checkpoint import client_parts
    from longtrain.train.files import find_latest, read_client_state

    sa, sb = (client_parts(read_client_state(find_latest(r))) for r in (full, cut))
    assert sa["loader"] == sb["loader"] and sa["progress"]["step"] == sb["progress"]["step"] == 7
    # The RNG a resumed stage continues with is the checkpoint's, not whatever start-up drew.
    ra, rb = (
        torch.load(find_latest(r) / "rng_state_rank00000.pt", weights_only=True)
        for r in (full, cut)
    )
    assert _same_tree(ra, rb)


def _same_tree(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    if hasattr(a, "shape"):  # numpy arrays
        return bool((a == b).all())
    return a == b


def test_staged_run_changes_sp_and_dp_between_stages(
    work: Path, staged_full: Path, tmp_path: Path
) -> None:
    """2 ranks: stage 1 DP=2 x SP=1, stage 2 DP=1 x SP=2 (Ulysses), same windows per step as
    the single-process reference, so the losses agree to float rounding."""
    stages = [
        {**STAGES[0], "micro_batch": 1, "sp": 1},  # DP=2 x 1 window = the reference's 2
        {**STAGES[1], "sp": 2},
    ]
    run = tmp_path / "sp"
    path = Path(str(run) + ".yaml")
    path.write_text(yaml.safe_dump(staged_cfg(work, run, stages)))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "longtrain.launch", "finetune", "--config", str(path)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "DP 2 x SP 1" in p.stdout + p.stderr and "DP 1 x SP 2" in p.stdout + p.stderr
    lf, ls = losses(staged_full), losses(run)
    print("\nstep  1 rank        2 ranks (stage 2: SP=2)")
    for s in sorted(lf):
        print(f"{s:>4}  {lf[s]:.8f}  {ls[s]:.8f}")
    assert sorted(ls) == sorted(lf)
    for s in lf:
        assert ls[s] == pytest.approx(lf[s], rel=1e-5), s
    a, b = load_state(staged_full / "final"), load_state(run / "final")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"final weights: max abs diff {worst:.2e}")
    assert worst < 1e-4


def test_presets_parse_and_validate() -> None:
    from longtrain.train.config import check_command, load_job
    from longtrain.train.stages import resolve_stages

    root = Path(__file__).resolve().parents[1] / "launch" / "configs"
    sft = load_job(root / "sft.yaml")
    check_command(sft, "finetune")
    assert sft.finetune.lora.rank > 0 and sft.finetune.early_stopping.patience > 0
    ctx = load_job(root / "context-extension.yaml")
    check_command(ctx, "finetune")
    stages = resolve_stages(ctx)
    assert [s.seq_len for s in stages] == [32768, 131072]
    assert all(s.rope_scaling["type"] == "yarn" for s in stages)


def test_classify_batches_shard_labels_across_sp_ranks(work: Path, tmp_path: Path) -> None:
    from longtrain.data.classify import ClassifyData, classify_val_batches

    write_classify_data(tmp_path / "c", 8, 5)
    data = ClassifyData(tmp_path / "c", "val", work / "tok", 256, 2)
    for whole, *parts in zip(
        classify_val_batches(data, 2, 0, 1, 0, 1),
        classify_val_batches(data, 2, 0, 1, 0, 2),
        classify_val_batches(data, 2, 0, 1, 1, 2),
    ):
        glued = torch.cat([p["labels"] for p in parts], dim=1)  # (B, T)
        assert torch.equal(glued, whole["labels"])
        assert torch.equal(torch.cat([p["input_ids"] for p in parts], 1), whole["input_ids"])
        for row, (n, c) in enumerate(zip(whole["lengths"], whole["classes"])):
            held = [int((p["labels"][row] != -100).sum()) for p in parts]
            assert sum(held) == (c != -100)  # one label per real row, on exactly one SP rank
            if c != -100:
                assert whole["labels"][row, n - 1] == c
                assert whole["input_ids"][row, n - 1] == data.tok.eos_id


def test_classify_sp2_zero3_matches_and_early_stopping_keeps_best(
    work: Path, cls_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """2 ranks, SP=2 (a row's last token, hence its label, lives on one rank), ZeRO-3: the same
    losses as the 1-rank run; early stopping then ends the run and keeps the best model."""
    ref, data = cls_run
    run = tmp_path / "cls_sp2"
    cfg = cls_cfg(
        work,
        run,
        data,
        parallel={"sp": 2, "zero_stage": 3},
        log={"eval_interval": 1},
        # No later evaluation can beat the first by 1e9: stop after `patience` evaluations.
        finetune={"task": "classify", "early_stopping": {"patience": 2, "min_delta": 1e9}},
    )
    path = Path(str(run) + ".yaml")
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "longtrain.launch", "finetune", "--config", str(path)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "DP 1 x SP 2" in out and "early stopping at step 3" in out
    got, want = losses(run), losses(ref)
    print("\nclassification loss, 1 rank vs 2 ranks (SP=2, ZeRO-3):")
    for s in sorted(got):
        print(f"{s:>4}  {want[s]:.8f}  {got[s]:.8f}")
    assert sorted(got) == [1, 2, 3]
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-5), s
    assert json.loads((run / "best" / "source.json").read_text())["step"] == 1
    assert json.loads((run / "final" / "source.json").read_text())["step"] == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.stages=[{steps: 2, seqlen: 64}]", "finetune.stages[0]: unknown key 'seqlen'"),
        ("finetune.stages=[{steps: 2, seq_len: 48}, {steps: 2, seq_len: 64}]", "does not divide"),
        ("finetune.task=regress", "finetune.task must be one of"),
        ("finetune.lora.targets=[wz]", "lora.targets has unknown module names"),
        ("model.overrides.dim=128", "model.overrides.dim: the shape comes from model.init"),
        ("data.tokenizer=TOK2", "differs from the tokenizer of the data in data.dir"),
    ],
)
def test_bad_finetune_config_fails_with_one_line(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture, override: str, message: str
) -> None:
    from longtrain.launch.cli import main as cli
    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer
    from longtrain.train.export import save_model_dir

    init = tmp_path / "init"
    save_model_dir(Transformer(get_flavor("debug", **SHAPE, vocab_size=512)), init)
    cfg = base_cfg(tmp_path / "bad", work / "data", model={"init": str(init), "overrides": {}})
    if "TOK2" in override:  # a different tokenizer than the data's
        import shutil

        shutil.copytree(work / "tok", tmp_path / "tok2")
        meta = json.loads((tmp_path / "tok2" / "tokenizer_meta.json").read_text())
        meta["hash"] = "0" * 64
        (tmp_path / "tok2" / "tokenizer_meta.json").write_text(json.dumps(meta))
        override = override.replace("TOK2", str(tmp_path / "tok2"))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["finetune", "--config", str(path), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
