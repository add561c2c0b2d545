"""MLX building blocks of the MoE layer (the mlx_lm `switch_layers.py` of this project): the
SwiGLU activation, the routed experts stacked and applied with `mx.gather_mm`, and the blocked
dispatch that MLX's CPU backend takes instead (`StackedExperts.blocked`)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from customllm_mlx import _blas
from customllm_mlx.loss import exp

# rows per GEMM of the blocked CPU dispatch (StackedExperts.blocked), see `cpu_block_rows`
CPU_BLOCK_ROWS = 32  # the default, and the fewest pairs per expert for the blocked layout
CPU_BLOCK_ROWS_PACKED = 64  # blocks OpenBLAS packs, in large batches
CPU_BLOCK_ROWS_CHUNKED = 16  # blocks too large for the small kernel at 32 rows: column chunks
SORT_MIN_PAIRS = 64  # fewer token-expert pairs (decoding) skip the sort, as mlx_lm's SwitchGLU


@mx.compile
def _sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + exp(-x))


@mx.custom_function
def sigmoid(x: mx.array) -> mx.array:
    """`mx.sigmoid` through `loss.exp`, for the router's scores; its gradient from the output.
    Equals `mx.sigmoid` to float32 rounding, values and gradients (tests/test_model_mlx.py);
    faster in a compiled layer, as fast eager (docs/benchmarks.md)."""
    return _sigmoid(x)


@sigmoid.vjp
def _sigmoid_vjp(x, cotangent, output):  # one input: the primal comes as the array itself
    return cotangent * output * (1.0 - output)


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the sigmoid through `loss.exp`: MLX's Linux CPU exp is slow (see
    loss.py). The same function as `nn.silu(gate) * up` to float32 rounding, values and
    gradients (tests/test_model_mlx.py); the MLP layers use it (`benchmarks/bench_moe.py`).
    One custom function for the product, not `silu(gate) * up` with silu the custom function:
    a custom function's output is materialised, so the product after it would be one pass
    more, and its vjp forms both gradients in one compiled function (the sigmoid recomputed).
    Its helpers are compiled; inside a transformation (`mx.grad` outside `mx.compile`) MLX
    runs them op by op, so the gain over `nn.silu` is largest in a compiled step
    (docs/benchmarks.md)."""
    return gate * _sigmoid(gate) * up


@mx.compile
def _swiglu_grad(gate: mx.array, up: mx.array, cotangent: mx.array):
    s = _sigmoid(gate)
    return cotangent * up * s * (1.0 + gate * (1.0 - s)), cotangent * gate * s


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    return _swiglu_grad(*primals, cotangent)


class StackedExpertLinear(nn.Module):
    """E linear layers in one (E, out, in) weight, applied with `mx.gather_mm`."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, expert: mx.array, sorted_indices: bool = True) -> mx.array:
        # x: (B, rows, in), each batch entry for one expert; expert: (B,) -> (B, rows, out)
        # (or any batch shape that broadcasts against `expert`)
        weight = self.weight.swapaxes(-1, -2)
        if x.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm supports float32 only
            out = mx.gather_mm(
                x.astype(mx.float32),
                weight.astype(mx.float32),
                rhs_indices=expert,
                sorted_indices=sorted_indices,
            )
            return out.astype(x.dtype)
        return mx.gather_mm(x, weight, rhs_indices=expert, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, **kwargs):
        """`nn.quantize` (and mlx_lm's convert -q) turns the experts into this."""
        return QuantizedStackedExpertLinear.from_stacked(self, group_size, bits, **kwargs)


class QuantizedStackedExpertLinear(nn.Module):
    """StackedExpertLinear with quantized weights (`mx.quantize` per expert's rows), applied
    with `mx.gather_qmm`. Keys: weight (packed), scales, biases (affine mode)."""

    def __init__(self, weight, scales, biases, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales = weight, scales
        if biases is not None:
            self.biases = biases
        self.freeze()

    @classmethod
    def from_stacked(cls, layer, group_size=None, bits=None, mode="affine", **kwargs):
        group_size, bits = group_size or 64, bits or 4
        weight, scales, *biases = mx.quantize(layer.weight, group_size, bits, mode=mode)
        return cls(weight, scales, biases[0] if biases else None, group_size, bits, mode)

    def __call__(self, x: mx.array, expert: mx.array, sorted_indices: bool = True) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=expert,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


# multiply-adds of a block GEMM that OpenBLAS runs unpacked (its small-matrix kernel), at most;
# 0 where the BLAS has no such kernel (another core, Accelerate, the reference BLAS): there
# every block GEMM is packed, and the blocks take 32 or 64 rows, never column chunks
SMALL_BLOCK_GEMM = 100**3 if _blas.small_gemm_kernel() else 0
CHUNK_COLUMNS = 16  # output columns of a chunked block GEMM: a multiple of this (AVX-512 floats)
# Input width from which a chunked forward reads its weight as a transposed view, uncopied
# (the small kernel's NT form); narrower, it copies the weight into untransposed chunks, which
# the kernel reads faster there (docs/benchmarks.md, "Blocked MoE dispatch").
CHUNK_VIEW_MIN_IN = 512


def small_block_gemm(rows: int, d_in: int, d_out: int) -> bool:
    """Whether OpenBLAS's small-matrix kernel takes a (rows, d_in) @ (d_in, d_out) block."""
    return rows * d_in * d_out <= SMALL_BLOCK_GEMM


def chunk_columns(rows: int, d_in: int, d_out: int) -> int | None:
    """Output columns per GEMM that bring a (rows, d_in) @ (d_in, d_out) block GEMM of at most
    32 rows, too large for OpenBLAS's small-matrix kernel, under it: the widest multiple of
    CHUNK_COLUMNS that divides d_out and fits; None where the block fits whole, no chunk
    does, or the blocks have more rows.
    A packed GEMM repacks its weight operand on every call, once per block here: a copy as
    large against the block's work as the block has few rows. The chunks' operands are read
    unpacked. 64-row blocks amortise the packing, so they are never chunked
    (docs/benchmarks.md, "Blocked MoE dispatch")."""
    if rows > CPU_BLOCK_ROWS or small_block_gemm(rows, d_in, d_out):
        return None
    fits = [
        c
        for c in range(CHUNK_COLUMNS, d_out, CHUNK_COLUMNS)
        if d_out % c == 0 and small_block_gemm(rows, d_in, c)
    ]
    return max(fits, default=None)


def small_kernel_fits(rows: int, d_in: int, d_out: int) -> bool:
    """Whether OpenBLAS's small-matrix kernel takes a block GEMM whole or in column chunks."""
    return small_block_gemm(rows, d_in, d_out) or chunk_columns(rows, d_in, d_out) is not None


def cpu_block_rows(hidden_size: int, intermediate_size: int, pairs: int, num_experts: int) -> int:
    """Rows per block of the blocked CPU dispatch of `pairs` token-expert pairs:
    - 32 where OpenBLAS's small-matrix kernel takes the block GEMMs whole (tiny);
    - 16 where it takes 16-row blocks in column chunks (`chunk_columns`; small, 973m): the
      chunks twice as wide as at 32 rows, and half the padding;
    - else 64 where the padding that 64-row blocks add (half a block per expert, on
      average) is at most 1/16 of the pairs (a packed GEMM pays a fixed cost per call, a
      padded row a row's work), or 32.
    The layer's fwd+bwd timings behind these choices: docs/benchmarks.md, "Blocked MoE
    dispatch"."""
    if small_block_gemm(CPU_BLOCK_ROWS, hidden_size, intermediate_size):
        return CPU_BLOCK_ROWS
    shapes = ((hidden_size, intermediate_size), (intermediate_size, hidden_size))
    if all(small_kernel_fits(CPU_BLOCK_ROWS_CHUNKED, *shape) for shape in shapes):
        return CPU_BLOCK_ROWS_CHUNKED
    padding = num_experts * CPU_BLOCK_ROWS_PACKED // 2
    return CPU_BLOCK_ROWS_PACKED if 16 * padding <= pairs else CPU_BLOCK_ROWS


def _block_gemm(x: mx.array, weight: mx.array, block_expert: mx.array, forward: bool):
    """x (blocks, rows, K) times each block's expert: x @ weight[e].T (`forward`, K = in)
    or x @ weight[e] (the input gradient, K = out); weight (E, out, in) -> (blocks, rows, N).
    A block too large for OpenBLAS's small-matrix kernel goes in column chunks where it can
    (`chunk_columns`): the weight as (E * chunks, K, columns), a transposed view or copied
    once per call (CHUNK_VIEW_MIN_IN), one small GEMM per block and chunk, the output put
    back in order (a copy of it)."""
    E, d_out, d_in = weight.shape
    blocks, rows, K = x.shape
    N = d_out if forward else d_in
    columns = chunk_columns(rows, K, N)
    if columns is None:
        w = weight.swapaxes(-1, -2) if forward else weight  # (E, K, N)
        if forward and small_block_gemm(rows, K, N):
            # untransposed operands: the small-matrix kernel runs them without packing;
            # packed blocks would only pay for the copy (docs/benchmarks.md)
            w = mx.contiguous(w)
        return mx.gather_mm(x, w, rhs_indices=block_expert, sorted_indices=True)
    chunks = N // columns
    if forward and d_in >= CHUNK_VIEW_MIN_IN:  # (E * chunks, columns, in), transposed: a view
        w = weight.reshape(E * chunks, columns, d_in).swapaxes(-1, -2)
    else:
        if forward:  # (E, chunks, columns, in) -> (E, chunks, in, columns)
            w = weight.reshape(E, chunks, columns, d_in).swapaxes(-1, -2)
        else:  # (E, out, chunks, columns) -> (E, chunks, out, columns)
            w = weight.reshape(E, d_out, chunks, columns).transpose(0, 2, 1, 3)
        w = mx.contiguous(w).reshape(E * chunks, K, columns)
    block = mx.broadcast_to(mx.arange(blocks, dtype=mx.uint32)[:, None], (blocks, chunks))
    chunk = block_expert.astype(mx.uint32)[:, None] * chunks + mx.arange(chunks, dtype=mx.uint32)
    out = mx.gather_mm(x, w, lhs_indices=block, rhs_indices=chunk)  # (blocks, chunks, rows, c)
    return out.transpose(0, 2, 1, 3).reshape(blocks, rows, N)


@mx.custom_function
def block_matmul(x, weight, block_expert, segments):
    """x (blocks, rows, in) @ weight[block_expert].T -> (blocks, rows, out), weight (E, out, in),
    for the blocked CPU dispatch: block_expert sorted, segments (E, 2) the [start, end) rows of
    each expert in x flattened to (blocks * rows, in). The block GEMMs as `_block_gemm` lays
    them out; the weight gradient is one GEMM per expert (`segmented_mm`)."""
    return _block_gemm(x, weight, block_expert, forward=True)


@block_matmul.vjp
def _block_matmul_vjp(primals, cotangent, output):
    x, weight, block_expert, segments = primals
    dx = _block_gemm(cotangent, weight, block_expert, forward=False)
    rows_out = cotangent.reshape(-1, cotangent.shape[-1])
    dw = mx.segmented_mm(rows_out.T, x.reshape(-1, x.shape[-1]), segments)  # (E, out, in)
    return dx, dw, mx.zeros_like(block_expert), mx.zeros_like(segments)


class StackedExperts(nn.Module):
    """The routed experts held stacked; `routed_experts.{gate,up,down}_proj.weight` is (E, out, in)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.gate_proj = StackedExpertLinear(hidden_size, intermediate_size, num_experts)
        self.up_proj = StackedExpertLinear(hidden_size, intermediate_size, num_experts)
        self.down_proj = StackedExpertLinear(intermediate_size, hidden_size, num_experts)

    def __call__(self, x: mx.array, expert: mx.array, sorted_indices: bool = True) -> mx.array:
        gate = self.gate_proj(x, expert, sorted_indices)
        hidden = swiglu(gate, self.up_proj(x, expert, sorted_indices))
        return self.down_proj(hidden, expert, sorted_indices)

    def blocks(self, x: mx.array, block_expert: mx.array, segments: mx.array) -> mx.array:
        """The experts on whole blocks of rows (the blocked CPU dispatch), float32:
        x (blocks, rows, in), block_expert (blocks,) sorted, segments as `block_matmul`'s."""
        dtype = x.dtype
        x = x.astype(mx.float32)  # MLX's CPU gather_mm supports float32 only

        def linear(layer, h):
            return block_matmul(h, layer.weight.astype(mx.float32), block_expert, segments)

        hidden = swiglu(linear(self.gate_proj, x), linear(self.up_proj, x))
        return linear(self.down_proj, hidden).astype(dtype)

    @property
    def num_experts(self) -> int:
        return self.up_proj.weight.shape[0]

    def blocked_dispatch(self, pairs: int) -> bool:
        """Whether `pairs` token-expert pairs (sorted) take the blocked CPU dispatch."""
        plain = isinstance(self.up_proj, StackedExpertLinear)  # not quantized
        return (
            plain and mx.default_device() == mx.cpu and pairs >= self.num_experts * CPU_BLOCK_ROWS
        )

    def blocked(self, x_flat, flat_expert, order, counts, top_k: int):
        """Expert outputs (N * k, D) in pair order, for MLX's CPU gather_mm, which runs one
        GEMM per batch entry (one GEMV per row when sorted): each expert's sorted rows are
        padded to whole blocks of `cpu_block_rows` and sent as (blocks, rows, D), one GEMM
        per block (the weight gradients: one per expert, over its padded rows, `segments`).
        The padded length has a static bound, so this compiles (no host sync)."""
        _, inter, hidden = self.up_proj.weight.shape
        E, P = self.num_experts, order.size
        g = cpu_block_rows(hidden, inter, P, E)
        sorted_expert = flat_expert[order]
        padded = (counts + g - 1) // g * g
        end = mx.cumsum(padded)
        first = end - padded  # each expert's padded rows: [first, end)
        shift = first - (mx.cumsum(counts) - counts)  # per expert
        row = (shift[sorted_expert] + mx.arange(P)).astype(mx.uint32)  # padded row of each pair
        rows = (P + E * (g - 1)) // g * g  # each expert pads < g rows: whole blocks fit
        pair_row = mx.zeros((P,), mx.uint32)  # padded row of each pair, in pair order
        pair_row[order] = row
        pair_of_row = mx.full((rows,), P, mx.uint32)  # and back; padding: P
        pair_of_row[row] = order.astype(mx.uint32)
        token = pair_of_row // top_k  # padding: P // k = N, which reads an all-zero row
        # each block's expert: the experts whose padded rows end at or before its start (a
        # block never straddles two); trailing blocks E - 1, so the indices stay sorted
        start = mx.arange(0, rows, g)
        block_expert = mx.minimum((end[None] <= start[:, None]).sum(-1), E - 1).astype(mx.uint32)
        token, block_expert, pair_row, pair_of_row = map(
            mx.stop_gradient, (token, block_expert, pair_row, pair_of_row)
        )
        segments = mx.stop_gradient(mx.stack([first, end], -1).astype(mx.uint32))
        x_rows = rows_to_blocks(x_flat, token, pair_row.reshape(-1, top_k))
        out = self.blocks(x_rows.reshape(rows // g, g, -1), block_expert, segments)
        return blocks_to_pairs(out.reshape(rows, -1), pair_row, pair_of_row)


# The blocked dispatch's two row permutations, each with the other as its vjp: a gather both
# ways, where autodiff would scatter-add (slower on MLX's CPU backend).
@mx.custom_function
def rows_to_blocks(x, token, rows_of_token):
    """x (N, D) -> (rows, D): row r holds x[token[r]], or zeros where token[r] == N."""
    return mx.concatenate([x, mx.zeros_like(x[:1])])[token]


@rows_to_blocks.vjp
def _rows_to_blocks_vjp(primals, cotangent, output):
    x, token, rows_of_token = primals  # rows_of_token (N, k): the k rows that hold each token
    grad = cotangent[rows_of_token].sum(axis=1)
    return grad, mx.zeros_like(token), mx.zeros_like(rows_of_token)


@mx.custom_function
def blocks_to_pairs(out, pair_row, pair_of_row):
    """out (rows, D) -> (P, D): pair p reads row pair_row[p]."""
    return out[pair_row]


@blocks_to_pairs.vjp
def _blocks_to_pairs_vjp(primals, cotangent, output):
    out, pair_row, pair_of_row = primals  # pair_of_row (rows,): P on padding rows
    grad = mx.concatenate([cotangent, mx.zeros_like(cotangent[:1])])[pair_of_row]
    return grad.astype(out.dtype), mx.zeros_like(pair_row), mx.zeros_like(pair_of_row)
