"""Model configuration: the :class:`ModelConfig` dataclass, RoPE scaling settings and named flavors.

Every field carries a docstring; ``__post_init__`` validates the whole config and raises
:class:`~longtrain.model.errors.LongtrainError` with a message naming the field and the fix.
Field names follow torchtitan / Meta's Llama (``dim``, ``n_heads``...); the mapping to
transformers' ``LlamaConfig`` lives in ``longtrain.model.hf``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from longtrain.model.errors import LongtrainError

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")


@dataclass
class RopeScaling:
    """Long-context RoPE scaling, with transformers' field names so configs round-trip as-is.

    The math of each type lives in ``longtrain.model.rope`` and is identical to transformers'
    ``modeling_rope_utils`` for the same fields.
    """

    type: str
    """One of ``linear`` (position interpolation), ``dynamic`` (NTK, rescaled by the current
    sequence length), ``yarn``, ``llama3``. Called ``rope_type`` in transformers."""

    factor: float
    """Context extension factor (>= 1): roughly new context length / original context length."""

    original_max_position_embeddings: int | None = None
    """Context length the model was pretrained with. Required by ``yarn``, ``llama3`` and
    ``dynamic`` (above it, dynamic NTK starts rescaling); unused by ``linear``."""

    low_freq_factor: float | None = None
    """llama3 only: wavelengths above original/low_freq_factor are fully interpolated (Meta: 1)."""

    high_freq_factor: float | None = None
    """llama3 only: wavelengths below original/high_freq_factor are kept as-is (Meta: 4)."""

    beta_fast: float | None = None
    """yarn only: rotations bounding the extrapolated (unchanged) band; None means 32."""

    beta_slow: float | None = None
    """yarn only: rotations bounding the interpolated band; None means 1."""

    attention_factor: float | None = None
    """yarn only: scale on cos/sin; None means 0.1 * ln(factor) + 1 (or the mscale ratio)."""

    mscale: float | None = None
    """yarn only (DeepSeek style): numerator of the inferred attention factor."""

    mscale_all_dim: float | None = None
    """yarn only (DeepSeek style): denominator of the inferred attention factor."""

    truncate: bool | None = None
    """yarn only: round the correction range to whole dimensions; None means True."""

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise LongtrainError(
                f"rope_scaling.type: unknown type {self.type!r}; use one of {', '.join(ROPE_TYPES)}"
            )
        if not isinstance(self.factor, (int, float)) or self.factor < 1.0:
            raise LongtrainError(
                f"rope_scaling.factor: got {self.factor!r}; it must be a number >= 1 "
                "(new context length / original context length)"
            )
        self.factor = float(self.factor)
        omp = self.original_max_position_embeddings
        if self.type in ("yarn", "llama3", "dynamic") and (
            not isinstance(omp, int) or isinstance(omp, bool) or omp < 1
        ):
            raise LongtrainError(
                f"rope_scaling.original_max_position_embeddings: {self.type} needs the pretraining "
                f"context length as a positive int, got {omp!r}"
            )
        if self.type == "llama3":
            lo, hi = self.low_freq_factor, self.high_freq_factor
            if lo is None or hi is None or not (0 < lo < hi):
                raise LongtrainError(
                    "rope_scaling.low_freq_factor/high_freq_factor: llama3 needs both with "
                    f"0 < low < high (Meta uses 1 and 4), got {lo!r} and {hi!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that are set, so the dict reads like a transformers rope config."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeScaling:
        """Accepts ``type`` or transformers' ``rope_type``; unknown keys are an error."""
        d = dict(d)
        if "rope_type" in d:
            d.setdefault("type", d.pop("rope_type"))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LongtrainError(
                f"rope_scaling: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        if "type" not in d or "factor" not in d:
            raise LongtrainError("rope_scaling: needs at least 'type' and 'factor'")
        return cls(**d)


@dataclass
class ModelConfig:
    """Shape and numerics of a Llama-shaped decoder-only transformer."""

    vocab_size: int = 8000
    """Number of token ids; the embedding and LM head have this many rows."""

    dim: int = 256
    """Model (residual stream) width; transformers' ``hidden_size``."""

    n_layers: int = 4
    """Number of transformer blocks."""

    n_heads: int = 8
    """Query heads per layer."""

    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); must divide n_heads. None means n_heads (MHA)."""

    head_dim: int | None = None
    """Per-head width; None means dim // n_heads. May differ from dim / n_heads (e.g. Gemma)."""

    ffn_dim: int = 768
    """Hidden width of the SwiGLU MLP; transformers' ``intermediate_size``."""

    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm; transformers' ``rms_norm_eps``."""

    rope_theta: float = 10000.0
    """RoPE base wavelength (Llama 2: 1e4, Llama 3: 5e5)."""

    rope_scaling: RopeScaling | None = None
    """Long-context RoPE scaling, or None for plain RoPE. A dict is converted on construction."""

    max_seq_len: int = 2048
    """Longest sequence the model is meant for; exported as ``max_position_embeddings``."""

    tie_embeddings: bool = False
    """Share the token embedding matrix with the LM head (then ``Transformer.output`` is None)."""

    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights; output projections (wo, w2) are
    further scaled by 1/sqrt(2 * n_layers) as in GPT-2 / Megatron."""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling.from_dict(self.rope_scaling)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LongtrainError(f"model.{name}: must be a positive int, got {v!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1:
            raise LongtrainError(
                f"model.n_kv_heads: must be a positive int, got {self.n_kv_heads!r}"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise LongtrainError(
                f"model.n_kv_heads: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}; pick n_kv_heads dividing n_heads"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise LongtrainError(
                    f"model.n_heads: dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                    "change one of them or set model.head_dim explicitly"
                )
            self.head_dim = self.dim // self.n_heads
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise LongtrainError(
                f"model.head_dim: must be a positive even int (RoPE rotates pairs), got {self.head_dim!r}"
            )
        if not (self.norm_eps > 0):
            raise LongtrainError(f"model.norm_eps: must be > 0, got {self.norm_eps!r}")
        if not (self.rope_theta > 1):
            raise LongtrainError(f"model.rope_theta: must be > 1, got {self.rope_theta!r}")
        if not (self.init_std > 0):
            raise LongtrainError(f"model.init_std: must be > 0, got {self.init_std!r}")
        self.norm_eps = float(self.norm_eps)
        self.rope_theta = float(self.rope_theta)
        self.init_std = float(self.init_std)
        self.tie_embeddings = bool(self.tie_embeddings)

    # ---- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (rope_scaling nested as a dict or None)."""
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling.to_dict() if self.rope_scaling else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LongtrainError(
                f"model config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return ModelConfig.from_dict({**self.to_dict(), **overrides})

    # ---- size and cost -------------------------------------------------------------------

    @property
    def q_dim(self) -> int:
        """Width of all query heads together."""
        return self.n_heads * self.head_dim  # type: ignore[operator]

    @property
    def kv_dim(self) -> int:
        """Width of all key (or value) heads together."""
        return self.n_kv_heads * self.head_dim  # type: ignore[operator]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Exact parameter count of :class:`~longtrain.model.transformer.Transformer`.

        ``exclude_embeddings`` drops the input embedding table (a lookup, not a matmul); the
        LM head stays counted even when tied, because it is a matmul every token pays for.
        """
        attn = self.dim * self.q_dim + 2 * self.dim * self.kv_dim + self.q_dim * self.dim
        mlp = 3 * self.dim * self.ffn_dim
        norms = 2 * self.dim
        blocks = self.n_layers * (attn + mlp + norms)
        emb = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        total = blocks + self.dim + emb + head
        if exclude_embeddings:
            total -= emb
            if self.tie_embeddings:
                total += self.vocab_size * self.dim
        return total

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Training FLOPs (forward + backward) per token at context length ``seq_len``.

        ``6 * N + 12 * n_layers * n_heads * head_dim * seq_len`` from PaLM (Chowdhery et al.
        2022, appendix B) and Chinchilla (Hoffmann et al. 2022, appendix F): N counts the
        matmul parameters (every weight except the input embedding lookup, the LM head
        included even when tied); 6 = 2 (multiply-add) * 3 (forward + two backward matmuls).
        The attention term covers QK^T and AV. With ``causal=True`` (the convention of
        Megatron-LM / torchtitan MFU for causal masks and of flash-attn's benchmark) only the
        lower triangle is computed, so the attention term is halved; ``causal=False`` is
        PaLM's full-attention convention.
        """
        n = self.num_params(exclude_embeddings=True)
        attn = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len  # type: ignore[operator]
        if causal:
            attn = attn / 2
        return float(6 * n + attn)


# Named flavors. Sizes are the count of Transformer parameters (num_params()).
FLAVORS: dict[str, dict[str, Any]] = {
    # ~1.0M: unit tests and smoke runs.
    "debug": dict(
        vocab_size=1024, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=512
    ),
    # ~7.2M: the CPU demo (trains at seq_len 2048 on a laptop in a few minutes).
    "tiny": dict(
        vocab_size=8000, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, max_seq_len=2048
    ),
    # ~125M (GPT-3 Small width/depth, Llama blocks, tied embeddings).
    "125m": dict(
        vocab_size=32000,
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        ffn_dim=2816,
        max_seq_len=4096,
        tie_embeddings=True,
    ),
    # ~1.24B: Llama-3.2-1B shape.
    "1b": dict(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=8192,
        rope_theta=500000.0,
        max_seq_len=8192,
        tie_embeddings=True,
    ),
    # ~8.03B: Llama-3-8B shape.
    "8b": dict(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    # ~70.6B: Llama-3-70B shape.
    "70b": dict(
        vocab_size=128256,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim=28672,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
}


def get_flavor(name: str, **overrides: Any) -> ModelConfig:
    """The named flavor as a :class:`ModelConfig`, with ``overrides`` applied (and validated)."""
    if name not in FLAVORS:
        raise LongtrainError(
            f"model.flavor: unknown flavor {name!r}; choose one of {', '.join(FLAVORS)}"
        )
    return ModelConfig.from_dict({**FLAVORS[name], **overrides})


__all__ = ["FLAVORS", "ROPE_TYPES", "ModelConfig", "RopeScaling", "get_flavor"]
