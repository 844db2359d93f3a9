"""The zero-bubble backward split: I then W gives exactly the full backward, and W does not redo I's work."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dynapipe.runtime.split_backward import backward_input, backward_weight


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)
        self.extra = nn.Parameter(torch.randn(16))  # reaches the output without touching the input

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.down(torch.relu(self.up(self.norm(x))))
        return h, (h * self.extra).sum(-1)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_split_equals_full_backward_and_does_no_extra_flops() -> None:
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(8, 16, requires_grad=True)
    g_h, g_s = torch.randn(8, 16), torch.randn(8)

    outs = block(x)
    full = _flops(lambda: torch.autograd.backward(outs, [g_h, g_s], inputs=[x, *block.parameters()]))
    expect = {n: p.grad.clone() for n, p in block.named_parameters()}
    expect_x = x.grad.clone()
    block.zero_grad(set_to_none=True)

    x2 = x.detach().clone().requires_grad_(True)
    outs = block(x2)
    result = {}
    flops_i = _flops(lambda: result.setdefault("i", backward_input(list(outs), [g_h, g_s], [x2])))
    (gx,), work = result["i"]
    assert all(p.grad is None for p in block.parameters()), "the input half must not touch weight gradients"
    flops_w = _flops(lambda: backward_weight(work, list(block.parameters())))

    torch.testing.assert_close(gx, expect_x, rtol=0, atol=0)
    for n, p in block.named_parameters():
        torch.testing.assert_close(p.grad, expect[n], rtol=0, atol=0)
    assert flops_i > 0 and flops_w > 0
    assert flops_i + flops_w == full, (flops_i, flops_w, full)


def test_stage_without_received_inputs_defers_everything() -> None:
    block = Block()
    x = torch.randn(4, 16)
    outs = block(x)
    grads, work = backward_input(list(outs), [torch.ones(4, 16), torch.ones(4)], [])
    assert grads == [] and len(work.roots) == 2
    backward_weight(work, list(block.parameters()))
    assert all(p.grad is not None for p in block.parameters())


def test_custom_autograd_function_sharing_a_saved_parameter() -> None:
    from models import CustomFnNet

    torch.manual_seed(0)
    net = CustomFnNet()
    x, y = torch.randn(8, 8), torch.randint(0, 2, (8,))
    leaf = x.clone().requires_grad_(True)
    net(leaf, y).backward()
    expect = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    leaf2 = x.clone().requires_grad_(True)
    (gx,), work = backward_input([net(leaf2, y)], [torch.ones(())], [leaf2])
    backward_weight(work, list(net.parameters()))
    torch.testing.assert_close(gx, leaf.grad, rtol=0, atol=0)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expect[n], rtol=0, atol=0)
