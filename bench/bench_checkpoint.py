"""Peak memory of consolidating a ZeRO-3 checkpoint on the CPU: longtrain vs DeepSpeed.

Builds a 2-rank ZeRO-3 checkpoint of ``--layers`` Linear(dim, dim) layers (gloo, CPU), then, in
fresh processes, measures the growth of peak RSS (VmHWM, reset after imports) while

* ``ours``: ``longtrain.train.reshard.iter_state_dict`` yields every full fp32 tensor (the
  consumer keeps none, as ``write_model_dir`` / an exporter writing shard by shard does);
* ``ours-write``: ``write_model_dir`` streams the whole model into model.safetensors;
* ``deepspeed``: ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``.

    python bench/bench_checkpoint.py --layers 32 --dim 1024 --out runs/bench_ckpt

With ``--export`` the checkpoint is a 2-rank ZeRO-3 longtrain ``Transformer`` (``--layers``
blocks of width ``--dim``, vocabulary 8192) and the measured paths are ``longtrain export-hf``
(bf16, 5GB shards, the CLI defaults):

* ``export-stream``: ``longtrain.train.reshard.export_hf`` (what the CLI runs), tensor by tensor;
* ``export-consolidate``: the previous path, ``consolidate_state_dict`` + ``model.hf.save_hf``.

    python bench/bench_checkpoint.py --export --layers 2 --dim 1024 --out runs/bench_export

2026-11-29, same machine, --export --dim 1024: 2 layers (162 MiB fp32) export-stream 88.1 MiB
(0.54x), export-consolidate 400.6 MiB (2.47x); 6 layers (358 MiB) 88.2 MiB (0.25x) vs 796.6
MiB (2.22x).

glibc's adaptive mmap threshold keeps up to 64 MiB of freed memory around; it is fixed here
(MALLOC_MMAP_THRESHOLD_) so that the figures show what the code holds, for all three alike.

2026-11-29, shared 2-core Xeon VM, torch 2.13.0+cpu, deepspeed 0.19.8, defaults (128 MiB fp32):
ours 35.7 MiB (0.28x), ours-write 27.9 MiB (0.22x), deepspeed 260.1 MiB (2.03x); also in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

MEASURE = textwrap.dedent(
    """
    import json, sys
    import deepspeed, torch
    import longtrain.train.checkpoint
    import longtrain.model.hf, transformers  # the exporters import them; not part of the peak
    from longtrain.train.reshard import _safe_globals, iter_state_dict, write_model_dir
    _safe_globals()  # imports the DeepSpeed classes before the baseline
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    path, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    base = hwm()
    n = 0
    if mode == "ours":
        for _, t in iter_state_dict(path, remap_bytes=8 << 20):
            n += t.numel()
            del t
    elif mode == "ours-write":
        write_model_dir(path, out, remap_bytes=8 << 20)
        n = -1
    elif mode == "export-stream":
        from longtrain.train.reshard import export_hf
        export_hf(path, out, dtype="bf16", remap_bytes=8 << 20)
        n = -1
    elif mode == "export-consolidate":
        from longtrain.model import hf
        from longtrain.model.config import ModelConfig
        from longtrain.model.transformer import Transformer
        from longtrain.train.reshard import consolidate_state_dict
        cfg = ModelConfig.from_dict(json.load(open(path + "/model_config.json")))
        with torch.device("meta"):
            model = Transformer(cfg, attention="sdpa")
        model.load_state_dict(consolidate_state_dict(path), strict=False, assign=True)
        model.rope.to_empty(device="cpu")
        model.rope.reset_parameters()
        hf.save_hf(model, out, dtype="bf16")
        n = -1
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        root, tag = path.rsplit("/", 1)
        sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
        n = sum(t.numel() for t in sd.values())
    print(json.dumps({"peak": hwm() - base, "numel": n}))
    """
)


def worker(out: Path, layers: int, dim: int) -> None:
    """One rank: build the ZeRO-3 model, take one step, save a longtrain checkpoint."""
    import datetime

    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    from longtrain.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(dim, dim, bias=False) for _ in range(layers)])
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    eng, _, _, _ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
    eng.backward(eng(torch.randn(1, dim)).pow(2).mean())
    eng.step()
    save_checkpoint(eng, out, 1, {}, {"layers": layers, "dim": dim}, keep=2)


def worker_transformer(out: Path, layers: int, dim: int) -> None:
    """One rank: a ZeRO-3 longtrain Transformer, one step, a longtrain checkpoint."""
    import datetime

    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer
    from longtrain.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = get_flavor(
        "debug",
        vocab_size=8192,
        dim=dim,
        n_layers=layers,
        n_heads=8,
        n_kv_heads=8,
        ffn_dim=dim * 11 // 4,
    )
    m = Transformer(cfg, attention="sdpa")
    m.init_weights()
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    eng, _, _, _ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=ds)
    eng.backward(eng(torch.randint(0, 8192, (1, 8))).float().pow(2).mean())
    eng.step()
    save_checkpoint(eng, out, 1, {}, cfg.to_dict(), keep=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--out", default="runs/bench_ckpt")
    ap.add_argument("--export", action="store_true", help="measure export-hf on a Transformer")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args.worker:
        (worker_transformer if args.export else worker)(out, args.layers, args.dim)
        return
    env = dict(os.environ, DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="65536")
    ckpt = out / "checkpoints" / "step_00000001"
    if not (ckpt / "COMMIT").is_file():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for r in range(2):
            e = dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2")
            e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            cmd = [sys.executable, __file__, "--worker", "--out", str(out)]
            cmd += ["--layers", str(args.layers), "--dim", str(args.dim)]
            cmd += ["--export"] if args.export else []
            procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL))
        assert [p.wait(timeout=900) for p in procs] == [0, 0]
    if args.export:
        from longtrain.model.config import ModelConfig

        cfg = ModelConfig.from_dict(json.loads((ckpt / "model_config.json").read_text()))
        full = cfg.num_params() * 4
        what = f"Transformer dim {args.dim} x {args.layers} layers, vocab 8192"
        modes: tuple[str, ...] = ("export-stream", "export-consolidate")
    else:
        full = args.layers * args.dim * args.dim * 4
        what = f"{args.layers} x Linear({args.dim}, {args.dim})"
        modes = ("ours", "ours-write", "deepspeed")
    print(f"model: {what}, full fp32 state {full / 2**20:.0f} MiB")
    print("| method | peak RSS growth (MiB) | x full fp32 |\n|---|---|---|")
    for mode in modes:
        r = subprocess.run(
            [sys.executable, "-c", MEASURE, str(ckpt), mode, str(out / "model")],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        peak = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
        print(f"| {mode} | {peak / 2**20:.1f} | {peak / full:.2f} |")


if __name__ == "__main__":
    main()
