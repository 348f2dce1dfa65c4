"""The planner's arithmetic on hand-computed cases, its terms against what the code actually
does (bytes autograd saves, bytes alive in a block's backward, FLOPs a checkpointed step
executes), and one prediction against a measured run.

This file is also the worker of the block-backward measurement
(``python tests/test_plan.py --block-worker``).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import longtrain.train.plan as plan_mod
from longtrain.launch.cli import main as cli_main
from longtrain.model.config import get_flavor
from longtrain.model.errors import LongtrainError
from longtrain.model.tiled import apply_tiled_mlp, tile_bounds
from longtrain.model.transformer import Transformer
from longtrain.train.config import load_job
from longtrain.train.metrics import peak_rss_bytes, reset_peak_rss
from longtrain.train.offload import host_bytes_needed
from longtrain.train.parallel import apply_activation_checkpointing
from longtrain.train.plan import (
    CPU,
    GB,
    GPUS,
    PlanInput,
    a2a_bytes,
    block_backward_phases,
    flops,
    layer_activation_bytes,
    longest_window,
    make_plan,
    max_seq_len,
    memory,
    mlp_tile_bytes,
    norm_tile_bytes,
    recommend,
    timing,
    zero_buffers,
)
from longtrain.train.ring import ring_p2p_bytes

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
DEBUG = get_flavor("debug")  # vocab 1024, dim 128, 4 layers, 4 heads, 2 KV heads, ffn 384
N_DEBUG = 1_049_728  # see test_params_by_hand
H100 = GPUS["h100"]


def plan(model: object = DEBUG, device: str = "cuda", **settings: object) -> PlanInput:
    return PlanInput.of(model, device=device, **settings)  # type: ignore[arg-type]


def test_params_by_hand() -> None:
    # per layer: wq 128*128 + wk, wv 2*128*64 + wo 128*128 = 49152; SwiGLU 3*128*384 = 147456;
    # norms 256 -> 196864; 4 layers 787456; embedding + head 2*1024*128; final norm 128.
    assert 4 * (49152 + 147456 + 256) + 2 * 1024 * 128 + 128 == N_DEBUG
    assert DEBUG.num_params() == N_DEBUG
    assert make_plan(plan(seq_len=128), 1, 80, H100)["params"] == N_DEBUG


def test_settings_come_from_the_job_and_the_engine_config() -> None:
    p = plan(seq_len=4096, sp=2, zero_stage=3, offload_optimizer=True, mlp_chunk_size=300)
    assert (p.job.data.seq_len, p.job.parallel.sp, p.job.train.mlp_chunk_size) == (4096, 2, 300)
    # bf16 with fp32 gradient accumulation and communication: the engine's GPU config.
    assert (p.a, p.accum_bytes, p.comm_bytes) == (2, 4, 4)
    assert p.ds["zero_optimization"]["reduce_bucket_size"] == p.zero.reduce_bucket_size == 5e8
    assert p.offload_optimizer and not p.offload_params and p.tiled
    cpu = plan(device="cpu", seq_len=4096, zero_stage=3)
    assert (cpu.a, cpu.accum_bytes, cpu.comm_bytes, cpu.zero.reduce_bucket_size) == (4, 4, 4, 5e7)
    assert cpu.zero.max_live_parameters == 1e9  # DeepSpeed's own default, resolved
    # A layout the config refuses is refused here too (one rule).
    with pytest.raises(LongtrainError, match="offload_activations"):
        plan(seq_len=128, offload_activations=True, activation_checkpointing="none")
    with pytest.raises(LongtrainError, match="not a field"):
        plan(seq_len=128, no_such_setting=1)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_states_by_zero_stage(stage: int) -> None:
    n, w = N_DEBUG, 4
    mem = memory(plan(seq_len=128, zero_stage=stage), w, H100)
    # ZeRO paper: 2N bf16 params and 12N fp32 master + Adam, sharded by stage; DeepSpeed 0.19
    # accumulates bf16 gradients in fp32 (the engine's grad_accum_dtype), see zero_buffers.
    assert mem.params == pytest.approx(2 * n / (w if stage == 3 else 1))
    assert mem.optimizer == pytest.approx(12 * n / (w if stage >= 1 else 1))
    grads = {0: 2 * n, 1: 4 * n + 4 * n / w, 2: 4 * n / w, 3: 4 * n / w}[stage]
    assert mem.grads == pytest.approx(grads)
    if stage:
        off = memory(plan(seq_len=128, zero_stage=stage, offload_optimizer=True), w, H100)
        assert off.optimizer == 0 and off.host_optimizer == pytest.approx(12 * n / w)


def test_gradients_under_optimizer_offload_leave_the_gpu() -> None:
    # The case: 8b on one GPU, ZeRO-3 + optimizer offload used to report 16.06 GB of
    # bf16 gradients resident. DeepSpeed 0.19 allocates grad_partitions_flat_buffer and the
    # step's fp32 gradients on the offload device; the GPU keeps the reduce bucket only.
    job = load_job(ROOT / "launch" / "configs" / "8b-128k.yaml",
                   ["data.dir=", "parallel.offload_optimizer=true", "parallel.sp=1"])  # fmt: skip
    p = PlanInput.from_job(job)
    n = p.model.num_params()
    mem = memory(p, 1, H100)
    assert mem.grads == 0
    assert mem.host_grads == pytest.approx(4 * n + 4 * n)  # fp32 partition + fp32 step grads
    bufs = {b.name: b for b in zero_buffers(p, 1, H100)}
    assert bufs["grad_partitions_flat_buffer"].where == "host"
    assert bufs["ipg bucket"].where == "device" and bufs["ipg bucket"].bytes == 4 * 5e8
    on = memory(PlanInput.from_job(load_job(ROOT / "launch" / "configs" / "8b-128k.yaml",
                                            ["data.dir=", "parallel.sp=1"])), 1, H100)  # fmt: skip
    # Without offload: the fp32 partition on the GPU; the step builds one sub-group's fp32
    # gradient at a time (DeepSpeed's sub_group_size, 1e9 elements by default).
    assert on.grads == pytest.approx(4 * n)
    steps = [b for b in zero_buffers(PlanInput.from_job(load_job(
        ROOT / "launch" / "configs" / "8b-128k.yaml", ["data.dir=", "parallel.sp=1"])), 1, H100)
        if b.component == "step"]  # fmt: skip
    assert [b.bytes for b in steps] == [4 * 1e9]


def test_fp32_stage0_has_no_master_copy() -> None:
    mem = memory(plan(device="cpu", seq_len=128, zero_stage=0), 1, CPU)
    assert (mem.params, mem.grads, mem.optimizer) == (4 * N_DEBUG, 4 * N_DEBUG, 8 * N_DEBUG)


def test_layer_activations_by_hand() -> None:
    # fp32, SDPA core: each norm keeps its input (4*128) and 1/rms (4), the next linear its
    # output (4*128); q 4*128, k and v 4*64 each; the output twice (2 * 4*128); lse 4 per
    # head; SwiGLU 4 * 4*384.
    norm = 2 * 512 + 4
    assert (
        layer_activation_bytes(DEBUG, 4, 1, "sdpa") == 2 * norm + 512 + 256 + 256 + 1024 + 16 + 6144
    )
    assert layer_activation_bytes(DEBUG, 4, 1, "sdpa") == 10264
    # flash keeps the output once; under SP=4 the 2 KV heads are replicated to 4.
    assert layer_activation_bytes(DEBUG, 4, 1, "flash") == 10264 - 512
    assert layer_activation_bytes(DEBUG, 4, 4, "flash") == 10264 + 2 * 256
    # Tiled, the MLP keeps only its input (the norm's output, already counted).
    assert layer_activation_bytes(DEBUG, 4, 1, "sdpa", tiled=True) == 10264 - 6144
    # One tile of 100 tokens: 6 vectors of ffn_dim, and the fp32 sums of 3 matrices' gradients.
    assert mlp_tile_bytes(DEBUG, 2, 100) == 100 * 2 * 6 * 384 + 3 * 128 * 384 * 6


def _saved_bytes_per_token(dtype: torch.dtype, chunk: int = 0) -> float:
    """Bytes autograd keeps for one block of the real model (unique storages, no params)."""
    torch.manual_seed(0)
    model = Transformer(DEBUG, attention="sdpa").to(dtype)
    apply_tiled_mlp(model, chunk)
    B, T = 1, 256
    x = torch.randn(B, T, DEBUG.dim, dtype=dtype, requires_grad=True)
    cos, sin = model.rope(torch.arange(T)[None])
    cu = torch.tensor([0, 100, 101, 256], dtype=torch.int32)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}  # shared
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, cos, sin, cu, 155)
    return sum(seen.values()) / (B * T)


@pytest.mark.parametrize("dtype,a", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("chunk", [0, 100])
def test_activation_formula_matches_autograd(dtype: torch.dtype, a: int, chunk: int) -> None:
    got = _saved_bytes_per_token(dtype, chunk)
    assert got == layer_activation_bytes(DEBUG, a, 1, "sdpa", tiled=bool(chunk))
    if chunk:  # negative control: the untiled formula is wrong for the tiled MLP
        assert got != layer_activation_bytes(DEBUG, a, 1, "sdpa", tiled=False)


# ---- the bytes alive while one checkpointed block back-propagates ---------------------------

BLOCK_CFG = {"ffn_dim": 768, "n_layers": 1}  # the tiny flavor: dim 256, 8 heads, 4 KV heads
BLOCK_T = 4096
BLOCK_CASES = [
    ("fp32", 0, 0),
    ("fp32", 300, 0),
    ("bf16", 0, 0),
    ("bf16", 300, 0),
    ("bf16", 300, 256),
]
"""(dtype, MLP tile, RMSNorm backward tile in tokens: 0 = the default, here one tile of all)."""
BLOCK_DOCS = [0, 1000, 1001, BLOCK_T]  # a packed window: the per-document core's two copies


def _block_worker() -> None:
    """Peak RSS above the post-forward level during one checkpointed block's backward.

    glibc's mmap threshold is pinned so every tensor above 64 KiB is its own mapping, freed at
    once: the resident set then follows the live tensors (``bench/bench_plan.py`` does the
    same). The block input, its gradient and the parameters' gradients exist before the
    baseline, as in training (DeepSpeed holds gradient buffers). The window holds three
    documents, as a packed training window does (with one, the SDPA core keeps one copy of
    the attention output less than the planner's per-document core).
    """
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    torch.set_num_threads(1)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    out = {}
    for dt, chunk, norm_tile in BLOCK_CASES:
        dtype = torch.float32 if dt == "fp32" else torch.bfloat16
        cfg = get_flavor("tiny", **BLOCK_CFG, max_seq_len=BLOCK_T)
        torch.manual_seed(0)
        model = Transformer(cfg, attention="sdpa").to(dtype)
        apply_tiled_mlp(model, chunk)
        if norm_tile:
            for norm in (model.layers[0].attention_norm, model.layers[0].ffn_norm):
                norm.tile_elements = norm_tile * cfg.dim
        apply_activation_checkpointing(model, "full")
        for prm in model.parameters():
            prm.grad = torch.zeros_like(prm)
        cos, sin = model.rope(torch.arange(BLOCK_T)[None])
        cu = torch.tensor(BLOCK_DOCS, dtype=torch.int32)
        longest = max(b - a for a, b in zip(BLOCK_DOCS, BLOCK_DOCS[1:]))
        x = torch.randn(1, BLOCK_T, cfg.dim, dtype=dtype, requires_grad=True)
        g = torch.randn(1, BLOCK_T, cfg.dim, dtype=dtype)
        peaks = []
        for _ in range(2):  # the first backward also warms up kernels and allocator
            y = model.layers[0](x, cos, sin, cu, longest)
            gc.collect()
            base = rss()
            reset_peak_rss()
            y.backward(g)
            peaks.append(peak_rss_bytes() - base)
            del y
            x.grad = None
            gc.collect()
        out[f"{dt}/{chunk}/{norm_tile}"] = peaks[-1]
    print(json.dumps(out))


def _block_prediction(
    dt: str, chunk: int, norm_tile: int = 0, phases: tuple[str, ...] = ("mlp", "norm", "attention")
) -> float:
    """The planner's bytes for that backward, minus what exists before the baseline: the
    incoming gradient and the block input (the first norm keeps the input itself)."""
    cfg = get_flavor("tiny", **BLOCK_CFG, max_seq_len=BLOCK_T)
    a = 4 if dt == "fp32" else 2
    tiled = chunk > 0
    ph = block_backward_phases(cfg, a, 1, "sdpa", tiled)
    tile = mlp_tile_bytes(cfg, a, max(e - s for s, e in _tiles(chunk))) if tiled else 0.0
    t = BLOCK_T
    cands = {
        "mlp": t * ph["mlp"] + tile,
        "norm": t * ph["norm"] + norm_tile_bytes(cfg, a, norm_tile or t),
        "attention": t * ph["attention"],
    }
    before = t * 2 * a * cfg.dim
    return max(cands[k] for k in phases) - before


def _tiles(chunk: int) -> list[tuple[int, int]]:
    return tile_bounds(BLOCK_T, chunk)


@pytest.fixture(scope="module")
def block_peaks() -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(HERE), "--block-worker"], capture_output=True,
                       text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dt,chunk,norm_tile", BLOCK_CASES)
def test_block_backward_peak_matches_phases(
    block_peaks: dict[str, float], dt: str, chunk: int, norm_tile: int
) -> None:
    measured = block_peaks[f"{dt}/{chunk}/{norm_tile}"]
    assert_block_close(_block_prediction(dt, chunk, norm_tile), measured)


def assert_block_close(predicted: float, measured: float) -> None:
    ratio = predicted / measured
    assert 0.9 <= ratio <= 1.12, f"predicted / measured = {ratio:.3f}"


def test_block_backward_negative_controls(
    block_peaks: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A planner that knew only the MLP's backward misses the tiled bf16 block, whose peak is
    # the RMSNorm's backward.
    with pytest.raises(AssertionError, match="predicted / measured"):
        assert_block_close(_block_prediction("bf16", 300, 0, ("mlp",)), block_peaks["bf16/300/0"])
    # The norm terms of HF Llama's autograd RMSNorm (fp32 input copy, normalised value, fp32
    # gradients of the whole input) are wrong for ours.
    monkeypatch.setattr(plan_mod, "norm_bytes", lambda m, a: 4 * m.dim + 2 * a * m.dim + 4)
    monkeypatch.setattr(
        plan_mod,
        "norm_backward_bytes",
        lambda m, a: 2 * a * m.dim + 8 * m.dim + (4 * m.dim + a * m.dim if a < 4 else 0),
    )
    with pytest.raises(AssertionError, match="predicted / measured"):
        assert_block_close(_block_prediction("bf16", 300, 0), block_peaks["bf16/300/0"])


# ---- activations, checkpointing and offload ------------------------------------------------


def test_checkpointing_keeps_block_inputs_and_offload_moves_them() -> None:
    t, a = 2 * 1024, 2
    p = plan(seq_len=1024, micro_batch=2, activation_checkpointing="full")
    glob = 8 * 32 + (2 * a * 128 + 4) + 4  # cos/sin, final norm, loss lse
    assert memory(p, 1, H100).activations == pytest.approx(t * (4 * a * 128 + glob))
    none = memory(p.with_(activation_checkpointing="none"), 1, H100)
    sel = memory(p.with_(activation_checkpointing="selective"), 1, H100)
    block = layer_activation_bytes(DEBUG, a, 1, "flash")
    assert none.activations == pytest.approx(t * (4 * block + glob))
    assert sel.activations == pytest.approx(t * (2 * block + 2 * a * 128 + glob))
    # Offloaded, the block inputs leave the device for the host: host_bytes_needed exactly.
    off = memory(p.with_(offload_activations=True), 1, H100)
    assert off.activations == pytest.approx(t * glob)
    need = host_bytes_needed(4, 128, 1024, 2, torch.bfloat16, "full")
    assert off.host_activations == need == 4 * t * 128 * a
    # On a CPU host and device are one memory: the host copies count in the peak.
    cpu = plan(device="cpu", seq_len=1024, activation_checkpointing="full")
    assert memory(cpu.with_(offload_activations=True), 1, CPU).total >= memory(cpu, 1, CPU).total


def test_tiling_lowers_the_peak_at_long_context_not_at_short() -> None:
    # 8b at 512K on SP=8: 64K tokens per GPU, where the recomputed block's backward (its
    # SwiGLU intermediates and their gradients, 4af + 2af per token) sets the peak.
    p = plan(get_flavor("8b"), seq_len=524288, sp=8, zero_stage=3, activation_checkpointing="full")
    whole, tiled = memory(p, 8, H100), memory(p.with_(mlp_chunk_size=4096), 8, H100)
    assert tiled.total < whole.total - 5 * GB
    # At 128K the chunked loss sets the peak: tiling changes nothing there.
    short8 = p.with_(seq_len=131072)
    assert memory(short8, 8, H100).total == memory(short8.with_(mlp_chunk_size=4096), 8, H100).total
    short = plan(seq_len=64, mlp_chunk_size=100)  # one tile: the plain MLP
    assert (
        not short.tiled
        and memory(short, 1, H100).total == memory(short.with_(mlp_chunk_size=0), 1, H100).total
    )


# ---- time: terms on a hand-computed configuration ------------------------------------------

HAND = get_flavor("debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                  vocab_size=256, max_seq_len=1024)  # fmt: skip


def test_time_terms_by_hand() -> None:
    p = plan(HAND, seq_len=1024, sp=2, activation_checkpointing="full")
    # Matmul parameters: per layer wq, wo 64*64, wk, wv 64*32 (2 KV heads of 16), SwiGLU
    # 3*64*128, norms 128 -> 36992; 2 layers, final norm 64, LM head 256*64 -> 90432.
    dense = 6 * 90432
    attention = 6 * 2 * 64 * 1024  # 12 * L * q * s, halved for causal masks
    fl = flops(p)
    assert (fl.model, fl.attention) == (dense + attention, attention)
    # Full checkpointing recomputes every block's forward once: a third of the block's dense
    # and attention FLOPs, less w2 (2 * 64 * 128 per layer: torch's checkpoint stops at the
    # last saved tensor); the LM head (6 * 256 * 64) is not recomputed.
    recompute = (dense - 6 * 256 * 64 + attention) / 3 - 2 * 2 * 64 * 128
    assert fl.recompute == pytest.approx(recompute)
    assert fl.recompute_share == pytest.approx((410240 - 32768) / 1329024)
    assert fl.attention_share == pytest.approx(786432 / 1329024)
    # The tiled MLP adds one more MLP forward: 2 * 3 * 64 * 128 per token and layer (and its
    # checkpointed forward now runs w2 too).
    tiled = flops(p.with_(mlp_chunk_size=100))
    assert tiled.tiled_mlp == pytest.approx(2 * 2 * 3 * 64 * 128)
    assert tiled.recompute == pytest.approx(recompute + 2 * 2 * 64 * 128)
    # Ulysses at 2: q, k, v and the output, 512 local tokens, half of it leaves each rank, in
    # the forward, the backward and the recompute of both layers (bf16).
    assert a2a_bytes(p) == 2 * 512 * 16 * (2 * 4 + 2 * 2) * 0.5 * 2 * 3 == 589824
    # The step time uses those terms: recomputation costs time.
    free = timing(p.with_(activation_checkpointing="none"), 2, H100)
    assert timing(p, 2, H100).compute_s > free.compute_s * 1.25


def _addmm_flops(self: object, mat1: torch.Size, mat2: torch.Size, *args: object,
                 out_shape: object = None, **kwargs: object) -> int:  # fmt: skip
    """FLOPs of ``self.addmm_(mat1, mat2)`` (shapes): one multiply-add per output and inner."""
    return 2 * mat1[0] * mat1[1] * mat2[1]


def test_recompute_factor_matches_the_executed_flops() -> None:
    """FLOPs that a checkpointed, tiled step executes (FlopCounterMode, CPU) against the
    planner's executed FLOPs. The reference core computes attention as explicit matmuls over
    the full (T, T) square, twice the causal count the planner uses."""
    T = 256
    cfg = HAND.replace(max_seq_len=T)
    for ckpt, chunk in (("full", 100), ("selective", 0), ("none", 0)):
        torch.manual_seed(0)
        model = Transformer(cfg, attention="reference")
        apply_tiled_mlp(model, chunk)
        apply_activation_checkpointing(model, ckpt)
        ids = torch.randint(0, cfg.vocab_size, (1, T + 1))
        # The loss adds the head-weight gradient into its fp32 buffer in place (addmm_), which
        # FlopCounterMode does not count by itself: count it as addmm.
        inplace = {torch.ops.aten.addmm_: _addmm_flops}
        with FlopCounterMode(display=False, custom_mapping=inplace) as counter:
            s, n = model.loss(ids[:, :-1], ids[:, 1:], chunk_size=64)
            (s / n).backward()
        fl = flops(plan(cfg, seq_len=T, activation_checkpointing=ckpt, mlp_chunk_size=chunk))
        frac = {"full": 1.0, "selective": 0.5, "none": 0.0}[ckpt]
        attn_exec = fl.attention * (1 + frac / 3)
        norms = 6 * (2 * cfg.dim * cfg.n_layers + cfg.dim)  # counted in 6N, not matmuls
        expected = T * (fl.executed - norms + attn_exec)  # + attention once more: full square
        got = counter.get_total_flops()
        assert got == pytest.approx(expected, rel=0.01), (ckpt, chunk, got / expected)


def test_ring_terms_come_from_train_ring() -> None:
    p = plan(get_flavor("8b"), seq_len=131072, sp=16, ring=2, zero_stage=3,
             activation_checkpointing="full")  # fmt: skip
    assert (p.ulysses, p.ring) == (8, 2)
    rb = ring_p2p_bytes(p.model, 131072, 1, 8, 2, 2)
    zero_comm = sum(b.bytes for b in zero_buffers(p, 16, H100) if b.component == "comm")
    assert rb["buffer_bytes"] > 0
    assert memory(p, 16, H100).comm == pytest.approx(zero_comm + rb["buffer_bytes"])
    # The heads split over the Ulysses part only; the all-to-all volume is U=8's.
    assert a2a_bytes(p) == a2a_bytes(p.with_(ring=1, sp=8)) / 2  # half the local tokens
    assert timing(p, 16, H100).ring_s >= 0


def test_sp_divides_activations_and_time_model() -> None:
    cfg = get_flavor("8b")
    p1 = plan(cfg, seq_len=65536, sp=1, zero_stage=2)
    p8 = p1.with_(sp=8)
    m1, m8 = memory(p1, 8, H100), memory(p8, 8, H100)
    # 8 KV heads over SP=8: no replication, the kept activations split almost exactly by 8
    # (the attention output is kept twice under SP).
    block1 = layer_activation_bytes(cfg, 2, 1, "flash")
    block8 = layer_activation_bytes(cfg, 2, 8, "flash")
    assert block8 - block1 == 2 * 32 * 128
    assert m8.activations < m1.activations / 7
    t1, t8 = timing(p1, 8, H100), timing(p8, 8, H100)
    assert 0 < t8.mfu <= t1.mfu < 1


# ---- search -------------------------------------------------------------------------------


def test_max_seq_len_is_the_boundary() -> None:
    p = plan(get_flavor("1b"), seq_len=8192, sp=2, zero_stage=2, activation_checkpointing="full")
    best = max_seq_len(p, 8, 40.0, H100)
    assert best > 0 and best % 1024 == 0
    assert memory(p.with_(seq_len=best), 8, H100).total <= 40 * GB
    assert memory(p.with_(seq_len=best + 1024), 8, H100).total > 40 * GB
    # Host memory bounds it too once the activations go there.
    off = p.with_(offload_activations=True, mlp_chunk_size=2048)
    free = max_seq_len(off, 8, 40.0, H100)
    assert free > best
    assert 0 < max_seq_len(off, 8, 40.0, H100, host_mem_gb=100.0) < free


def test_recommend_none_when_nothing_fits_and_valid_otherwise() -> None:
    p = plan(get_flavor("8b"), seq_len=131072, sp=8, zero_stage=3)
    assert recommend(p, 8, 4.0, H100) is None
    r = recommend(p, 8, 80.0, H100)
    assert r is not None and r["memory_gb"] <= 80 and 8 % r["sp"] == 0


def test_ceilings_of_8b_on_h100() -> None:
    """The longest windows the planner finds for 8b on H100 80 GB with both levers and
    optimizer offload: at least ALST's published 3.7M on one node and 500K on one GPU
    (bench/RESULTS.md records them)."""
    cfg = get_flavor("8b")
    base = plan(cfg, seq_len=131072, sp=8, zero_stage=3, activation_checkpointing="full")
    node = longest_window(base, 8, 80.0, H100)
    assert node["layout"]["sp"] == 8 and node["layout"]["mlp_chunk_size"]
    assert node["layout"]["offload_activations"] and node["layout"]["offload_optimizer"]
    assert node["seq_len"] >= 3_700_000
    assert node["host_gb_per_node"] > 500  # the block inputs of 32 layers x 8 GPUs
    assert node["without"]["offload_activations"] < node["seq_len"] / 2
    one = longest_window(base.with_(sp=1), 1, 80.0, H100)
    assert one["seq_len"] >= 500_000 and one["without_levers"] == 0
    # With too little host RAM the activation offload is what has to go.
    small = longest_window(base, 8, 80.0, H100, host_mem_gb=256.0)
    assert 0 < small["seq_len"] < node["seq_len"] and not small["layout"]["offload_activations"]


def test_presets_plan_without_error() -> None:
    cases = [("1b-32k", 8, "h100", 80), ("8b-128k", 32, "h100", 80),
             ("8b-1m-offload", 32, "h100", 80), ("8b-4m", 8, "h200", 141)]  # fmt: skip
    for name, gpus, gpu, mem in cases:
        job = load_job(ROOT / "launch" / "configs" / f"{name}.yaml", ["data.dir="])
        result = make_plan(PlanInput.from_job(job), gpus, mem, GPUS[gpu], host_mem_gb=2048)
        assert result["fits"], (name, result["memory_gb"])  # the presets are meant to fit
        assert result["recommended"] is not None
    # 4M fits one node of H100 80 GB too (README, "Planning a run"), and only with its block
    # inputs in host RAM.
    job = load_job(ROOT / "launch" / "configs" / "8b-4m.yaml", ["data.dir="])
    assert make_plan(PlanInput.from_job(job), 8, 80, H100, host_mem_gb=2048)["fits"]
    kept = load_job(ROOT / "launch" / "configs" / "8b-4m.yaml",
                    ["data.dir=", "parallel.offload_activations=false"])  # fmt: skip
    assert not make_plan(PlanInput.from_job(kept), 8, 80, H100, host_mem_gb=2048)["fits"]


def test_bad_layouts_are_one_clear_error() -> None:
    with pytest.raises(LongtrainError, match="parallel.sp=3"):
        make_plan(plan(get_flavor("8b"), seq_len=3 * 1024, sp=3), 3, 80, H100)
    with pytest.raises(LongtrainError, match="--gpus 6"):
        make_plan(plan(get_flavor("8b"), seq_len=4096, sp=4), 6, 80, H100)
    with pytest.raises(LongtrainError, match="activation_checkpointing"):
        plan(seq_len=128, activation_checkpointing="some")


def test_cli_json_max_seq_and_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "model: {flavor: 8b}\ndata: {seq_len: 131072}\n"
        "parallel: {sp: 8, zero_stage: 3, activation_checkpointing: full}\n"
    )
    base = ["plan", "--config", str(cfg), "--gpus", "8", "--gpu-mem", "80"]
    assert cli_main([*base, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["sp"] == 8 and out["config"]["dp"] == 1 and out["fits"]
    assert set(out["max_seq_len_by_sp"]) == {"1", "2", "4", "8"}
    assert out["host_gb"]["per_node"] == 0  # nothing offloaded
    assert cli_main([*base, "--max-seq", "--host-mem", "2048"]) == 0
    text = capsys.readouterr().out
    assert "longest window on 8 x h100 (80 GB), 2048 GB host RAM per node" in text
    assert "what makes it fit: offload_activations" in text
    assert cli_main(["plan", "--config", str(cfg), "--gpus", "12", "--gpu-mem", "80"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpus 12" in err[0]


# ---- against a measured run -----------------------------------------------------------------


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "bench" / "bench_plan.py")
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["bench_plan"] = bench  # dataclasses look their module up while defining
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    return bench


@pytest.mark.parametrize("kind", ["plain", "tiled"])
def test_prediction_close_to_a_measured_run(kind: str) -> None:
    bench = _bench()
    if kind == "plain":
        case = bench.Case("debug", 8192, "none", steps=2)  # type: ignore[attr-defined]
    else:  # a tile that does not divide the window
        case = bench.Case("tiny", 8192, "full", {"ffn_dim": 2048}, mlp_chunk=300, steps=2)  # type: ignore[attr-defined]
    r = bench.measure(case, timeout=300)  # type: ignore[attr-defined]
    assert r["measured_gb"] > 0.2, r  # big enough that RSS noise does not decide the result
    assert 0.85 <= r["ratio"] <= 1.15, r


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--block-worker":
    _block_worker()
