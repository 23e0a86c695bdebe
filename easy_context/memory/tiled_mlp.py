"""Tiled MLP (DeepSpeed ALST's TiledMLP): each decoder layer's MLP runs over sequence tiles forward and backward, so
``(seq, intermediate)`` activations never exist in full. :func:`tile_mlps` replaces the ``forward`` of each MLP
instance with a :class:`TiledMLPForward` (the class and the state-dict names are untouched); the model-level
``enable_tiled_mlp`` (which finds a transformers model's MLPs) is in ``easy_context.integrations.memory``.

Another feature that changes what an MLP computes per token (the fused SwiGLU) changes the forward the tiles call:
:func:`mlp_forward` / :func:`set_mlp_forward` are that contract, whichever of the two is applied first.
"""
from __future__ import annotations

import math

import torch

from ..utils import is_zero3

# Default MLP tile: this many hidden_size's of tokens (bench/RESULTS.md: 4 x 4096 = 16K-token tiles, 4-layer
# Llama-2-7B at 256K, 23.9 s vs 26.8 s for 4096-token tiles; the tile's intermediates stay ~1.3 GiB).
TILE_HIDDENS = 4


class _TiledMLP(torch.autograd.Function):
    """``mlp(x)`` over sequence tiles; neither pass materialises ``(seq, intermediate)`` activations in full.

    Forward runs the tiles under no_grad and saves only ``x``. Backward recomputes one tile at a time with grad
    and differentiates it at once. Parameter gradients: summed over tiles and returned as this Function's
    gradients for the parameters (each parameter's grad accumulator fires once per backward, as DDP expects);
    under DeepSpeed ZeRO-3 they are accumulated tile by tile through ZeRO's own hooks, with ``ds_grad_is_ready``
    held back until the last tile, as DeepSpeed's TiledMLP does. There the parameters come in ``zero3_params`` (a
    tuple, not Function inputs): a partitioned parameter made a Function input gets its gradient accumulator created
    with the empty partition's shape, and the tile's Linear backward then fails ("invalid gradient ... expected shape
    compatible with [0]", seen on 2xH200).
    """

    @staticmethod
    def forward(ctx, forward_fn, tile_size, zero3_params, x, *params):
        ctx.forward_fn, ctx.tile_size, ctx.params = forward_fn, tile_size, zero3_params or params
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(x)
        with torch.no_grad():
            # (b, s, hidden) -> tiles (b, <=tile, hidden) -> mlp -> (b, s, hidden)
            return torch.cat([forward_fn(t) for t in x.split(tile_size, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        params = [p for p in ctx.params if p.requires_grad]
        zero3 = is_zero3(ctx.params)
        dx = torch.empty_like(x) if x.requires_grad else None
        dparams = [None] * len(params)
        tiles = list(zip(x.split(ctx.tile_size, dim=-2), dout.split(ctx.tile_size, dim=-2)))
        device_type, autocast_on, autocast_dtype = ctx.autocast
        offset = 0
        for i, (x_tile, dout_tile) in enumerate(tiles):
            x_tile = x_tile.detach().requires_grad_(x.requires_grad)
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                y_tile = ctx.forward_fn(x_tile)
            n = x_tile.shape[-2]
            if zero3:
                for p in params:
                    p.ds_grad_is_ready = i == len(tiles) - 1
                # No `inputs=`: naming the partitioned parameters there makes autograd take their gradient edges
                # when their data is the empty partition (seen on 2xH200: "invalid gradient ... expected shape
                # compatible with [0]"). The tile's graph reaches only x_tile (a detached leaf) and the parameters,
                # whose gradients ZeRO's hooks collect; this is how DeepSpeed's own TiledMLP calls it.
                torch.autograd.backward(y_tile, dout_tile)
                if dx is not None:
                    dx.narrow(-2, offset, n).copy_(x_tile.grad)
            else:
                inputs = ([x_tile] if x.requires_grad else []) + params
                grads = torch.autograd.grad(y_tile, inputs, dout_tile, allow_unused=True)
                if x.requires_grad:
                    dx.narrow(-2, offset, n).copy_(grads[0])
                    grads = grads[1:]
                for j, g in enumerate(grads):
                    if g is not None:
                        # sum tiles in float32: bf16 sums over many tiles lose ~1e-2 relative accuracy
                        g = g.float() if g.dtype in (torch.bfloat16, torch.float16) else g
                        dparams[j] = g if dparams[j] is None else dparams[j].add_(g)
            offset += n
        if zero3:
            return None, None, None, dx
        dparams = [g.to(p.dtype) if g is not None else None for g, p in zip(dparams, params)]
        it = iter(dparams)
        return (None, None, None, dx, *[next(it) if p.requires_grad else None for p in ctx.params])


class TiledMLPForward:
    """The ``forward`` of a tiled MLP instance: ``inner`` (the MLP's own forward) over tiles of ``tile_size`` tokens
    (or ``num_tiles`` tiles per sequence). Calls with extra arguments, or sequences of one tile, call ``inner``."""

    def __init__(self, mlp: torch.nn.Module, inner, tile_size: int | None, num_tiles: int | None):
        self.mlp, self.inner, self.tile_size, self.num_tiles = mlp, inner, tile_size, num_tiles

    def __call__(self, x, *args, **kwargs):
        tile_size = self.tile_size or math.ceil(x.shape[-2] / self.num_tiles)
        forward_fn = self.inner
        if args or kwargs or x.shape[-2] <= tile_size:
            return forward_fn(x, *args, **kwargs)
        params = tuple(self.mlp.parameters())
        if is_zero3(params):  # partitioned parameters must not be Function inputs (see _TiledMLP)
            return _TiledMLP.apply(forward_fn, tile_size, params, x)
        return _TiledMLP.apply(forward_fn, tile_size, None, x, *params)


def mlp_forward(mlp: torch.nn.Module):
    """What computes ``mlp``'s per-token function: the forward its tiles call if tiled, else its ``forward``."""
    return mlp.forward.inner if isinstance(mlp.forward, TiledMLPForward) else mlp.forward


def set_mlp_forward(mlp: torch.nn.Module, fn) -> None:
    """Make ``fn`` compute ``mlp``'s per-token function: inside the tiles if tiled, else as its ``forward``."""
    if isinstance(mlp.forward, TiledMLPForward):
        mlp.forward.inner = fn
    else:
        mlp.forward = fn


def tile_mlps(mlps, *, tile_size: int | None = None, num_tiles: int | None = None) -> int:
    """Compute each MLP of ``mlps`` in sequence tiles, forward and backward (DeepSpeed ALST's TiledMLP).

    The ``(batch, tile, intermediate)`` activations of one tile exist at a time instead of
    ``(batch, seq, intermediate)``; backward recomputes each tile's MLP (one extra MLP forward per step). MLPs are
    per-token, so the result is exact. Each module keeps its class and parameter names: only the instance's
    ``forward`` is replaced by a :class:`TiledMLPForward` calling the original forward per tile (tiling again
    changes only the tile size). Under DeepSpeed ZeRO-3 the module's hooks gather the parameters once around the
    tiled forward, and ZeRO's pre-backward hook gathers them before the per-tile recompute.

    Args:
        mlps: modules taking ``(batch, seq, hidden)``.
        tile_size: tokens per tile. num_tiles: tiles per sequence (tile size = ceil(seq / num_tiles)); exactly one.
    Returns:
        The number of MLPs tiled.
    Raises:
        ValueError: both, neither or a non-positive tile option given.
    """
    if (tile_size is None) == (num_tiles is None):
        raise ValueError("pass tile_size or num_tiles (one of them)")
    for what, value in (("tile_size", tile_size), ("num_tiles", num_tiles)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    n = 0
    for mlp in mlps:
        mlp.forward = TiledMLPForward(mlp, mlp_forward(mlp), tile_size, num_tiles)
        n += 1
    return n


__all__ = ["TILE_HIDDENS", "TiledMLPForward", "tile_mlps", "mlp_forward", "set_mlp_forward"]
