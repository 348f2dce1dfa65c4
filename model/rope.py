"""Rotary position embeddings with long-context scaling, in fp32.

Convention: HF's ``rotate_half`` (the two halves of each head are the pair coordinates, not
interleaved neighbours), so weights convert to transformers' Llama without permuting q/k.

The inverse frequencies of every scaling type repeat transformers' ``modeling_rope_utils``
operation for operation (same dtypes, same order), so an exported model computes the same
angles in transformers:

- ``linear`` (position interpolation): ``inv_freq / factor``.
- ``dynamic`` (NTK): the base grows with the current length ``L`` once ``L`` exceeds the
  original context ``M``: ``base * (factor * L / M - (factor - 1)) ** (d / (d - 2))``.
  transformers takes ``L = max(position_ids) + 1`` of the current forward call (and caches
  it). We are stateless and take ``L = max(max_seqlen, max(position_ids) + 1)``: for a forward
  over one sequence of length T starting at position 0 that is T, exactly what a freshly
  loaded transformers model computes for that call. Passing ``max_seqlen`` (the longest
  document of the whole window, the same on every sequence-parallel rank) keeps all SP ranks
  on the same frequencies. Caveat: transformers keeps the largest length seen so far while it
  stays above ``M``, so after a longer call a shorter one differs there but not here.
- ``yarn``: NTK-by-parts blend of interpolated and extrapolated frequencies with a ramp over
  the correction range, and cos/sin scaled by the attention factor (``0.1 ln(factor) + 1``).
- ``llama3``: Meta's Llama 3.1 piecewise rule (low frequencies / factor, high ones kept, a
  smooth blend between).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from longtrain.model.config import ModelConfig, RopeScaling


def _default_inv_freq(base: float, dim: int, device: torch.device | None) -> torch.Tensor:
    # int64 arange then float, as transformers does, so the exponents are bit-identical.
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base**exponent)  # (dim/2,) fp32


def _yarn_inv_freq(
    base: float, dim: int, rs: RopeScaling, device: torch.device | None
) -> tuple[torch.Tensor, float]:
    factor = rs.factor
    omp = rs.original_max_position_embeddings
    assert omp is not None

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rs.attention_factor
    if attention_factor is None:
        if rs.mscale and rs.mscale_all_dim:
            attention_factor = float(
                get_mscale(factor, rs.mscale) / get_mscale(factor, rs.mscale_all_dim)
            )
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rs.beta_fast or 32
    beta_slow = rs.beta_slow or 1
    truncate = True if rs.truncate is None else rs.truncate

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits num_rotations times into the original context.
        return (dim * math.log(omp / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp, as transformers does

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_factor)
        + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq, float(attention_factor)


def _llama3_inv_freq(
    base: float, dim: int, rs: RopeScaling, device: torch.device | None
) -> torch.Tensor:
    inv_freq = _default_inv_freq(base, dim, device)
    factor = rs.factor
    lo, hi = rs.low_freq_factor, rs.high_freq_factor
    old_len = rs.original_max_position_embeddings
    assert lo is not None and hi is not None and old_len is not None
    low_freq_wavelen = old_len / lo
    high_freq_wavelen = old_len / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _dynamic_inv_freq(
    base: float, dim: int, rs: RopeScaling, seq_len: int, device: torch.device | None
) -> torch.Tensor:
    omp = rs.original_max_position_embeddings
    assert omp is not None
    if seq_len <= omp:
        return _default_inv_freq(base, dim, device)
    # transformers does this in fp32 tensors (seq_len comes from position_ids): do the same.
    length = torch.tensor(seq_len, dtype=torch.int64, device=device)
    new_base = base * ((rs.factor * length / omp) - (rs.factor - 1)) ** (dim / (dim - 2))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (new_base**exponent)


def compute_inv_freq(
    cfg: ModelConfig, seq_len: int | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) fp32 and the cos/sin scale for ``cfg``.

    ``seq_len`` matters only for ``dynamic`` scaling (the current sequence length).
    """
    dim = cfg.head_dim
    assert dim is not None
    base = cfg.rope_theta
    rs = cfg.rope_scaling
    if rs is None:
        return _default_inv_freq(base, dim, device), 1.0
    if rs.type == "linear":
        return _default_inv_freq(base, dim, device) / rs.factor, 1.0
    if rs.type == "dynamic":
        return _dynamic_inv_freq(base, dim, rs, seq_len or 0, device), 1.0
    if rs.type == "yarn":
        return _yarn_inv_freq(base, dim, rs, device)
    if rs.type == "llama3":
        return _llama3_inv_freq(base, dim, rs, device), 1.0
    raise AssertionError(f"unhandled rope type {rs.type}")  # RopeScaling validated it


class RotaryEmbedding(nn.Module):
    """Turns position ids into (cos, sin) tables.

    The inverse frequencies are derived from the config, so they are not a buffer: they are
    computed on first use on the device of the position ids and cached in a plain dict. That
    keeps them out of ``meta``/``to_empty`` (never left uninitialised) and out of
    ``model.to(bfloat16)`` (never rounded to bf16).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._cache: dict[str, tuple[torch.Tensor, float]] = {}

    def reset_parameters(self) -> None:
        """Drop cached frequencies (nothing else to initialise)."""
        self._cache.clear()

    def inv_freq(self, device: torch.device) -> tuple[torch.Tensor, float]:
        """Static inverse frequencies (head_dim/2,) fp32 and cos/sin scale on ``device``."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = compute_inv_freq(self.cfg, device=device)
        return self._cache[key]

    def forward(
        self, position_ids: torch.Tensor, max_seqlen: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (B, T, head_dim) fp32 for ``position_ids`` (B, T)."""
        inv_freq, scale = self.inv_freq(position_ids.device)
        rs = self.cfg.rope_scaling
        if rs is not None and rs.type == "dynamic":
            seq_len = int(position_ids.max().item()) + 1 if position_ids.numel() else 0
            if max_seqlen is not None:
                seq_len = max(seq_len, int(max_seqlen))
            inv_freq, scale = compute_inv_freq(
                self.cfg, seq_len=seq_len, device=position_ids.device
            )
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): rotate_half layout
        return emb.cos() * scale, emb.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): the pair partner of each coordinate, the first half negated."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin (B, T, D); math in fp32, result in x's dtype."""
    cos = cos[:, :, None, :]  # (B, T, 1, D): broadcast over heads
    sin = sin[:, :, None, :]  # (B, T, 1, D)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
