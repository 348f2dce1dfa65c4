"""Data mixtures through the trainer: per-source token counts, per-source validation, exact
resume, a stage that changes the mixture, and one-line refusals of bad mixtures.

The loader's own properties (weights over 64 windows, DP resharding, epochs) are in
tests/test_data_mixture.py; here the sources are two real prepared directories (stdlib files
of two packages) and every run is a real ``longtrain pretrain`` subprocess.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_finetune import base_cfg, metrics
from test_trainer import pretrain

from longtrain.launch.cli import main as cli_main


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sources(work: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two data directories made with the session's tokenizer: 'short' and 'long' files."""
    from longtrain.data.corpus import CorpusSpec
    from longtrain.data.prepare import prepare

    root = tmp_path_factory.mktemp("mix")
    files = sorted((work / "corpus").glob("*.txt"), key=lambda p: p.stat().st_size)
    out = {}
    for name, part in (("short", files[: len(files) // 2]), ("long", files[len(files) // 2 :])):
        corpus = root / f"{name}_corpus"
        corpus.mkdir()
        for f in part:
            shutil.copy(f, corpus / f.name)
        spec = CorpusSpec(str(corpus / "*.txt"))
        prepare(spec, work / "tok", root / name, workers=1, val_fraction=0.2, progress=False)
        out[name] = root / name
    return out


def mix_cfg(run: Path, sources: dict[str, Path], weights: tuple[float, float], **sections) -> dict:
    cfg = base_cfg(run, sources["short"], **sections)
    cfg["data"].pop("dir")
    cfg["data"]["mix"] = [
        {"name": "short", "dir": str(sources["short"]), "weight": weights[0]},
        {"name": "long", "dir": str(sources["long"]), "weight": weights[1]},
    ]
    return cfg


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


def test_a_mixture_counts_tokens_per_source_and_validates_per_source(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = mix_cfg(
        run,
        sources,
        (0.25, 0.75),
        train={"steps": 8},
        log={"interval": 1, "eval_interval": 8, "tensorboard": True},
    )
    p = pretrain(cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [r for r in metrics(run) if "loss" in r]
    for r in rows:
        assert sum(r["tokens_by_source"].values()) == r["tokens"], r
    by = rows[-1]["tokens_by_source"]
    total = sum(by.values())
    # 8 steps x 2 windows = 16 windows: the schedule puts 4 of each 16 in 'short'.
    assert by["short"] / total == pytest.approx(0.25, abs=0.03), by
    ev = [r for r in metrics(run) if "val_loss" in r]
    for r in ev:
        assert {"val_loss/short", "val_loss/long"} <= set(r), r
        lo, hi = sorted([r["val_loss/short"], r["val_loss/long"]])
        assert lo <= r["val_loss"] <= hi  # the overall loss is their token-weighted mean
    tb = list((run / "tb").rglob("events.*"))
    assert tb, "TensorBoard events"


def test_a_mixture_resumes_bitwise_and_a_stage_changes_the_mixture(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    stages = [
        {"steps": 4, "name": "short-heavy"},
        {
            "steps": 4,
            "name": "long-heavy",
            "mix": [
                {"name": "short", "dir": str(sources["short"]), "weight": 0.25},
                {"name": "long", "dir": str(sources["long"]), "weight": 0.75},
            ],
        },
    ]

    def cfg(run: Path) -> dict:
        return mix_cfg(
            run,
            sources,
            (0.75, 0.25),
            train={"stages": stages},
            checkpoint={"interval": 1, "keep": 2},
        )

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert pretrain(cfg(full)).returncode == 0
    p = pretrain(cfg(cut), env={"LONGTRAIN_CRASH_AFTER_STEP": "6"})  # inside stage 2
    assert p.returncode == 17, p.stderr[-3000:]
    p = pretrain(cfg(cut))
    assert p.returncode == 0, p.stderr[-3000:]
    lf, lc = losses(full), losses(cut)
    assert sorted(lf) == sorted(lc) == list(range(1, 9))
    assert all(lc[s] == lf[s] for s in lf), {s: (lf[s], lc[s]) for s in lf}
    rows = {r["step"]: r for r in metrics(full) if "loss" in r}
    first = rows[4]["tokens_by_source"]
    second = {k: rows[8]["tokens_by_source"][k] - first[k] for k in first}
    assert first["short"] > first["long"] and second["long"] > second["short"], (first, second)
    assert (
        rows[8]["tokens_by_source"]
        == {r["step"]: r for r in metrics(cut) if "loss" in r}[8]["tokens_by_source"]
    )


@pytest.mark.parametrize("case", ["other_tokenizer", "zero_weight", "name_twice", "dir_and_mix"])
def test_a_bad_mixture_is_one_line_before_any_process_group(
    case: str,
    sources: dict[str, Path],
    work: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = mix_cfg(tmp_path / "run", sources, (0.5, 0.5))
    mix = cfg["data"]["mix"]
    expect = {
        "other_tokenizer": "data.mix[1] 'long'",
        "zero_weight": "data.mix[1].weight 0: must be a positive number",
        "name_twice": "data.mix[1].name 'short': given twice",
        "dir_and_mix": "data.dir and data.mix are both set",
    }[case]
    if case == "other_tokenizer":
        other = tmp_path / "other"
        shutil.copytree(sources["long"], other)
        man = json.loads((other / "manifest.json").read_text())
        man["tokenizer_hash"] = "f" * 64
        (other / "manifest.json").write_text(json.dumps(man))
        mix[1]["dir"] = str(other)
    elif case == "zero_weight":
        mix[1]["weight"] = 0
    elif case == "name_twice":
        mix[1]["name"] = "short"
    else:
        cfg["data"]["dir"] = str(sources["short"])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert cli_main(["pretrain", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    import torch.distributed as dist

    assert not dist.is_initialized() and not (tmp_path / "run").exists()
