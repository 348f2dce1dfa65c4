"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) for the longtrain Transformer.

A :class:`LoRALinear` *is* an ``nn.Linear`` whose weight is frozen, plus two small trainable
matrices. Keeping the subclass (rather than wrapping the base layer) keeps the base weight's
state-dict key unchanged (``layers.0.attention.wq.weight``), so checkpoints, ZeRO partitioning
and HF export see the same names with or without adapters; the adapters add
``...wq.lora_a`` and ``...wq.lora_b``.

    y = x W^T + (alpha / r) * dropout(x) A^T B^T,   A: (r, in), B: (out, r), B initialised to 0

so a freshly applied adapter leaves the model's output unchanged. Apply adapters after the
base weights are loaded or initialised and before the model is handed to DeepSpeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.model.errors import LongtrainError

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo")
ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoRAConfig:
    """Which linear layers get adapters, and how large they are."""

    rank: int = 8
    """Rank r of the update A^T B^T; 4-64 is typical; 0 = no adapters (every weight trains)."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input path only (the frozen path never sees it)."""
    targets: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)
    """Names of linear submodules to adapt: any of wq, wk, wv, wo (attention), w1, w2, w3 (MLP)."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise LongtrainError(
                f"lora.rank must be >= 0 (got {self.rank}); 0 = off, try lora.rank=8"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise LongtrainError(f"lora.dropout must be in [0, 1) (got {self.dropout})")
        self.targets = tuple(self.targets)
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown or not self.targets:
            raise LongtrainError(
                f"lora.targets has unknown module names {unknown or '(empty)'}; "
                f"choose from {list(ALL_TARGETS)}"
            )


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.reset_lora()

    def reset_lora(self) -> None:
        """peft's default: A ~ Kaiming-uniform, B = 0, so the initial update is exactly zero."""
        if self.lora_a.device.type == "meta":
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.lora_b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        # (..., in) -> (..., r) -> (..., out): never forms the (out, in) product.
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)
        return base + self.scaling * update

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, in the weight's dtype (computed in fp32)."""
        delta = self.lora_b.float() @ self.lora_a.float()  # (out, r) @ (r, in) -> (out, in)
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for module in model.modules():
        for name, child in module.named_children():
            if name in names and type(child) is nn.Linear:
                found.append((module, name, child))
    return found


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Replace the target linears in place with :class:`LoRALinear` and freeze everything else.

    The base weights are reused (not copied), so this is cheap for large models.
    """
    if cfg.rank < 1:
        raise LongtrainError(f"lora.rank={cfg.rank}: adapters need a rank >= 1, e.g. lora.rank=8")
    found = _targets(model, cfg.targets)
    if not found:
        raise LongtrainError(
            f"lora.targets {list(cfg.targets)} matched no nn.Linear in the model; "
            f"choose from {list(ALL_TARGETS)}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name, lin in found:
        lora = LoRALinear(
            lin.in_features,
            lin.out_features,
            cfg.rank,
            cfg.alpha,
            cfg.dropout,
            bias=lin.bias is not None,
            device=lin.weight.device,
            dtype=lin.weight.dtype,
        )
        lora.weight = lin.weight
        lora.weight.requires_grad_(False)
        if lin.bias is not None:
            lora.bias = lin.bias
            lora.bias.requires_grad_(False)
        setattr(parent, name, lora)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and turn the layer back into a plain nn.Linear."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                with torch.no_grad():
                    plain.weight.copy_(child.merged_weight())
                    if child.bias is not None:
                        plain.bias.copy_(child.bias)
                setattr(module, name, plain)
    return model


def merge_lora_state_dict(
    state: dict[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """Merge adapters in a flat state dict (e.g. one consolidated from ZeRO shards).

    ``X.weight`` gains ``scaling * X.lora_b @ X.lora_a``; the ``lora_*`` keys are dropped.
    """
    out = {k: v for k, v in state.items() if not k.endswith((".lora_a", ".lora_b"))}
    for key in state:
        if key.endswith(".lora_a"):
            prefix = key[: -len(".lora_a")]
            a, b = state[key].float(), state[prefix + ".lora_b"].float()
            w = out[prefix + ".weight"]
            out[prefix + ".weight"] = (w.float() + scaling * (b @ a)).to(w.dtype)
    return out


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters by name (what a LoRA run trains and saves)."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))}
