"""A 16 x 16 register transpose for the CPU kernels' row tiles.

The short-row kernels (tiles.py, ``tile_reduce``) turn 64 rows of a few
classes into a (classes x 64) tile so every max, exp and sum runs across rows. Done one
element at a time, that copy is a load and a store per logit and was a third of the time
of a 10-class forward pass. Here 16 rows are loaded as 16 vectors of 16 logits, widened
to float32 in registers (float16 by vcvtph2ps), transposed with 64 two-vector shuffles
(four butterfly stages), and up to 16 class rows are stored whole.

LLVM's own vectoriser does not do this: a column of a row-major block is a strided access
with a run-time stride, which it leaves scalar (or gathers, slower still on this CPU).

Each row is read as 16 elements from its first class on, so a row of fewer classes reads
into the next row: callers use it only where 16 elements past every row start of the
block are inside the array (not for the array's last rows).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_VF32 = ir.VectorType(_F32, LANES)
# what transpose16 reads: float32, and float16 / bfloat16 as uint16 / int16 bits
STORAGE = (types.float32, types.uint16, types.int16)


def _butterfly_masks(d):
    """Shuffle masks that swap the off-diagonal d x d blocks of a pair of rows (i, i + d):
    after the four stages d = 8, 4, 2, 1 row i holds what was column i."""
    lo = [lane if lane & d == 0 else LANES + lane - d for lane in range(LANES)]
    hi = [lane + d if lane & d == 0 else LANES + lane for lane in range(LANES)]
    return ir.Constant(ir.VectorType(_I32, LANES), lo), ir.Constant(ir.VectorType(_I32, LANES), hi)


def _widen(builder, raw, dtype):
    """<16 x storage> -> <16 x float>: float16 and bfloat16 bits arrive as integers."""
    if dtype == types.float32:
        return raw
    if dtype == types.uint16:  # IEEE half bits
        return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), LANES)), _VF32)
    # bfloat16 bits: the high half of a float32
    wide = builder.zext(raw, ir.VectorType(_I32, LANES))
    shift = ir.Constant(ir.VectorType(_I32, LANES), [16] * LANES)
    return builder.bitcast(builder.shl(wide, shift), _VF32)


@intrinsic
def transpose16(typingctx, x, row, col, ncols, buf, lane):
    """buf[col + j, lane : lane + 16] = x[row : row + 16, col + j] as float32, j < ncols.

    x: 2-D float32, or uint16 / int16 bits of float16 / bfloat16, with unit class stride;
    buf: 2-D float32, C-contiguous; ncols <= 16. No bounds checks (see the module doc).
    """
    if not (isinstance(x, types.Array) and x.ndim == 2 and x.dtype in STORAGE):
        return None
    if not (isinstance(buf, types.Array) and buf.ndim == 2 and buf.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        xty, rowty, colty, ncolsty, bufty, lanety = sig.args
        xa = context.make_array(xty)(context, builder, args[0])
        ba = context.make_array(bufty)(context, builder, args[4])
        row = context.cast(builder, args[1], rowty, types.intp)
        col = context.cast(builder, args[2], colty, types.intp)
        ncols = context.cast(builder, args[3], ncolsty, types.intp)
        lane = context.cast(builder, args[5], lanety, types.intp)
        row_stride = cgutils.unpack_tuple(builder, xa.strides, 2)[0]
        item = context.get_abi_sizeof(context.get_data_type(xty.dtype))
        base = builder.add(
            builder.ptrtoint(xa.data, _I64),
            builder.add(builder.mul(row, row_stride), builder.mul(col, ir.Constant(_I64, item))),
        )
        vty = ir.VectorType(context.get_data_type(xty.dtype), LANES)
        rows = []
        for k in range(LANES):
            addr = builder.add(base, builder.mul(ir.Constant(_I64, k), row_stride))
            load = builder.load(builder.inttoptr(addr, vty.as_pointer()))
            load.align = item
            rows.append(_widen(builder, load, xty.dtype))
        for d in (8, 4, 2, 1):
            lo_mask, hi_mask = _butterfly_masks(d)
            for i in range(LANES):
                if i & d == 0:
                    a, b = rows[i], rows[i + d]
                    rows[i] = builder.shuffle_vector(a, b, lo_mask)
                    rows[i + d] = builder.shuffle_vector(a, b, hi_mask)
        buf_stride = cgutils.unpack_tuple(builder, ba.strides, 2)[0]
        dst = builder.add(
            builder.ptrtoint(ba.data, _I64),
            builder.add(builder.mul(col, buf_stride), builder.mul(lane, ir.Constant(_I64, 4))),
        )
        for j in range(LANES):
            with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, j), ncols)):
                addr = builder.add(dst, builder.mul(ir.Constant(_I64, j), buf_stride))
                store = builder.store(rows[j], builder.inttoptr(addr, _VF32.as_pointer()))
                store.align = 4
        return context.get_dummy_value()

    return types.none(x, row, col, ncols, buf, lane), codegen
