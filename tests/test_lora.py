"""LoRA: adapters start as a no-op, only adapters train, merging preserves the function."""

import pytest
import torch
from torch import nn

from longtrain.model.errors import LongtrainError
from longtrain.model.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    lora_parameters,
    merge_lora,
    merge_lora_state_dict,
)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(16, 16, bias=False)
        self.wo = nn.Linear(16, 8, bias=False)
        self.w1 = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1(torch.tanh(self.wo(torch.tanh(self.wq(x)))))


def _train_a_bit(model: nn.Module, steps: int = 5) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 16, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_fresh_adapter_is_identity_and_only_adapters_train() -> None:
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(3, 16)
    before = model(x)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("wq", "wo")))
    assert isinstance(model.wq, LoRALinear) and type(model.w1) is nn.Linear
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert set(lora_parameters(model)) == {"wq.lora_a", "wq.lora_b", "wo.lora_a", "wo.lora_b"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(
        lora_parameters(model)
    )
    _train_a_bit(model)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed but is not an adapter"
    assert not torch.equal(model.wq.lora_b, torch.zeros_like(model.wq.lora_b))


def test_merge_matches_unmerged() -> None:
    torch.manual_seed(0)
    model = Toy()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("wq", "wo", "w1")))
    _train_a_bit(model)
    x = torch.randn(5, 16)
    want = model(x)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    assert all(type(m) is not LoRALinear for m in model.modules())
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
    merged = merge_lora_state_dict(state, scaling=8 / 4)
    assert set(merged) == {"wq.weight", "wo.weight", "w1.weight"}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)
    # Negative control: merging with the wrong scale must not match.
    wrong = merge_lora_state_dict(state, scaling=1.0)
    assert not torch.allclose(wrong["wq.weight"], merged["wq.weight"], atol=1e-6)


def test_bad_lora_config() -> None:
    with pytest.raises(LongtrainError, match="lora.rank"):
        LoRAConfig(rank=-1)
    with pytest.raises(LongtrainError, match="lora.rank=0"):
        apply_lora(nn.Sequential(nn.Linear(2, 2)), LoRAConfig(rank=0))
    with pytest.raises(LongtrainError, match="lora.targets"):
        LoRAConfig(targets=("q_proj",))
    with pytest.raises(LongtrainError, match="matched no nn.Linear"):
        apply_lora(nn.Sequential(nn.ReLU()), LoRAConfig())
