"""Reversible backpropagation through the Reformer's block stack (Kitaev et al. 2020, section 3 and RevNets).

A block maps (x1, x2) to y1 = x1 + F(x2), y2 = x2 + G(y1), with F the attention and G the feed-forward,
so its inputs can be recomputed from its outputs: x2 = y2 - G(y1), x1 = y1 - F(x2). The forward pass below
keeps only the last block's outputs, each LSH layer's buckets (a few int64 per token) and the random-number
state before each dropout-using function; the backward pass walks the stack from the top, recomputing one
block's inputs and its local graph at a time. Activation memory is one block's, whatever the depth.

The feed-forward is recomputed and differentiated in the same row chunks as its forward pass, so a long
sequence never holds the whole (tokens x feed_forward_size) activation either.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class _RandomState:
    """The generators' states at one point of the forward pass, to replay the same dropout masks."""

    cpu: Tensor
    cuda: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> _RandomState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    @contextmanager
    def replay(self, device: torch.device):
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, device)
            yield


@dataclass
class _BlockRecord:
    attention_rng: _RandomState | None
    feed_forward_rng: _RandomState | None
    buckets: Tensor | None  # the LSH layer's raw buckets from the forward pass


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, blocks: nn.ModuleList, mask: Tensor | None, autocast: tuple):
        random = any(block.training and (block.dropout or block.attn.dropout) for block in blocks)
        records = []
        x1 = x2 = x
        for block in blocks:
            attention_rng = _RandomState.capture(x.device) if random else None
            attended, kv = block.attention(x2, mask, want_kv=block.kind == "lsh")
            x1 = x1 + attended
            feed_forward_rng = _RandomState.capture(x.device) if random else None
            x2 = x2 + block.ff(x1)
            buckets = kv.buckets if kv is not None else None
            records.append(_BlockRecord(attention_rng, feed_forward_rng, buckets))
        ctx.blocks, ctx.mask, ctx.records, ctx.autocast = blocks, mask, records, autocast
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, grad_y1: Tensor, grad_y2: Tensor):
        y1, y2 = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        for block, record in zip(reversed(ctx.blocks), reversed(ctx.records)):
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                x2, grad_from_ff = _undo_feed_forward(block, record, y1, y2, grad_y2)
                grad_y1 = grad_y1 + grad_from_ff  # all the gradient that reaches y1 (= x1's gradient)
                x1, grad_from_attention = _undo_attention(block, record, ctx.mask, x2, y1, grad_y1)
            grad_y2 = grad_y2 + grad_from_attention  # all the gradient that reaches x2
            y1, y2 = x1, x2
        # The stack's input feeds both streams.
        return grad_y1 + grad_y2, None, None, None


def _replay(record: _RandomState | None, device: torch.device):
    return record.replay(device) if record is not None else nullcontext()


def _undo_feed_forward(block, record: _BlockRecord, y1: Tensor, y2: Tensor, grad_y2: Tensor) -> tuple[Tensor, Tensor]:
    """x2 = y2 - G(y1), and G's gradients (parameters accumulate theirs; y1's is returned)."""
    x2 = torch.empty_like(y2)
    grad_y1 = torch.empty_like(y1)
    with _replay(record.feed_forward_rng, y1.device):
        for rows in block.ff.row_chunks(y1.shape[1]):
            with torch.enable_grad():
                part = y1[:, rows].detach().requires_grad_()
                out = block.ff._rows(part)
                # (under autocast `out` may be bf16: its gradient is cast as autograd would cast it)
                torch.autograd.backward(out, grad_y2[:, rows].to(out.dtype))
            with torch.no_grad():
                x2[:, rows] = y2[:, rows] - out
            grad_y1[:, rows] = part.grad
    return x2, grad_y1


def _undo_attention(block, record: _BlockRecord, mask: Tensor | None, x2: Tensor, y1: Tensor,
                    grad_y1: Tensor) -> tuple[Tensor, Tensor]:
    """x1 = y1 - F(x2), and F's gradients (parameters accumulate theirs; x2's is returned)."""
    with _replay(record.attention_rng, x2.device), torch.enable_grad():
        x2 = x2.detach().requires_grad_()
        attended, _ = block.attention(x2, mask, buckets=record.buckets)
        torch.autograd.backward(attended, grad_y1.to(attended.dtype))
    with torch.no_grad():
        x1 = y1 - attended
    return x1, x2.grad


def reversible_stack(x: Tensor, blocks: nn.ModuleList, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The two streams after all blocks, with a backward pass that recomputes instead of storing."""
    device_type = x.device.type
    autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    return _ReversibleStack.apply(x, blocks, mask, autocast)
