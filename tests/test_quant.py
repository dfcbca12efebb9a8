"""Quantized N:M weights (int8, int4 two per byte, per-group scales, optional zeros): the format,
the CPU kernels against the reference, bad input, SparseLinear, sparsify, save / load and HF
``from_pretrained``."""

import contextlib
import zlib

import pytest
import tiny_lm
import torch
import torch.nn.functional as F
from conftest import assert_matches_dense, assert_matches_reference

import sparsekern as sk
from sparsekern import _extension
from sparsekern.formats import quant as q

needs_ext = pytest.mark.skipif(not _extension.HAS_C_EXT, reason="compiled extension not loaded")


def _qweight(out, k, n, m, quant, group_size, symmetric=True, dtype=torch.float32):
    w = sk.NMSparseWeight.from_dense(torch.randn(out, k), n=n, m=m, prune=True)
    return w.quantize(quant, group_size, symmetric).to(dtype)


# -- format ----------------------------------------------------------------------------------


def test_int4_pack_round_trip_is_exact():
    nib = torch.randint(0, 16, (5, 38), dtype=torch.uint8)
    packed = q.pack_int4(nib)
    assert packed.shape == (5, 19) and packed.dtype == torch.uint8
    assert torch.equal(q.unpack_int4(packed), nib)
    assert int(packed[0, 0]) == int(nib[0, 0]) | (int(nib[0, 1]) << 4)  # slot 2j low, 2j+1 high


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 32, 128])
@pytest.mark.parametrize("quant", q.QUANTS)
def test_quantize_error_within_half_a_step(quant, group_size, symmetric):
    w = sk.NMSparseWeight.from_dense(torch.randn(24, 256), n=2, m=4, prune=True)
    wq = w.quantize(quant, group_size, symmetric).validate()
    assert wq.quant == quant and wq.meta is w.meta and wq.dtype == torch.float32
    groups = 1 if group_size == 0 else 256 // group_size
    assert wq.scales.shape == (24, groups) and (wq.zeros is None) == symmetric
    # Every kept weight within half a step (plus fp32 rounding) of its original; pruned ones stay 0.
    step = wq.scales.repeat_interleave(w.kept // groups, dim=1)
    assert ((wq.float_values() - w.values).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(wq.to_dense() == 0, (w.to_dense() == 0) | (wq.to_dense() == 0))
    # The stored form round-trips through a new object unchanged (what save / load rely on).
    again = sk.NMSparseWeight(wq.values.clone(), wq.meta.clone(), 2, 4, wq.shape, wq.scales.clone(),
                              None if wq.zeros is None else wq.zeros.clone(), group_size)  # fmt: skip
    assert torch.equal(again.to_dense(), wq.to_dense())


def test_to_dtype_moves_scales_and_keeps_integers():
    wq = _qweight(8, 64, 2, 4, "int8", 32).to(torch.bfloat16)
    assert wq.values.dtype == torch.int8 and wq.scales.dtype == torch.bfloat16 and wq.dtype == torch.bfloat16
    assert wq.to_dense().dtype == torch.bfloat16
    assert wq.nbytes() == 8 * 32 + wq.meta.numel() * 4 + 8 * 2 * 2


def test_bad_quantized_parts_are_refused():
    wq = _qweight(8, 64, 2, 4, "int4", 32, symmetric=False)
    parts = dict(values=wq.values, meta=wq.meta, n=2, m=4, shape=(8, 64), scales=wq.scales, zeros=wq.zeros,
                 group_size=32)  # fmt: skip

    def make(**kw):
        return sk.NMSparseWeight(**(parts | kw)).validate()

    with pytest.raises(ValueError, match=r"scales: expected shape \(8, 2\)"):
        make(scales=wq.scales[:, :1])
    with pytest.raises(TypeError, match="scales: expected dtype"):
        make(scales=wq.scales.to(torch.int32))
    with pytest.raises(TypeError, match="scales: expected torch.Tensor"):
        make(scales=None)
    with pytest.raises(ValueError, match=r"scales: expected finite values > 0, got 0.0 at row 3, group 1"):
        make(scales=wq.scales.clone().index_put_((torch.tensor(3), torch.tensor(1)), torch.tensor(0.0)))
    with pytest.raises(ValueError, match="scales: expected finite values > 0, got nan"):
        make(scales=torch.full_like(wq.scales, float("nan")))
    with pytest.raises(ValueError, match=r"zeros: expected values in 0..15, got 16"):
        make(zeros=torch.full_like(wq.zeros, 16))
    with pytest.raises(TypeError, match="zeros: expected an int8 tensor"):
        make(zeros=wq.zeros.to(torch.int32))
    with pytest.raises(ValueError, match="group_size: expected 0 .* that divides in_features 64, got 24"):
        make(group_size=24)
    with pytest.raises(ValueError, match="group_size: expected 0 .* multiple of m=4 .*, got 6"):
        make(group_size=6)
    with pytest.raises(ValueError, match="values: expected int4 shape"):
        make(values=wq.values[:, :-1])
    with pytest.raises(ValueError, match="scales/zeros/group_size/act_block: only quantized"):
        sk.NMSparseWeight(torch.zeros(8, 32), wq.meta, 2, 4, (8, 64), scales=wq.scales)
    # int4 with an odd kept count per row (K = 12 at 2:4 keeps 6 ... K = 4 * odd groups at 1:4)
    odd = sk.NMSparseWeight.from_dense(torch.randn(4, 12), n=1, m=4, prune=True)
    with pytest.raises(ValueError, match="int4 packs kept weights in pairs"):
        odd.quantize("int4")
    with pytest.raises(ValueError, match="quant: expected one of"):
        odd.quantize("int3")


# -- kernels against the reference -------------------------------------------------------------


def _has_vnni_vbmi() -> bool:
    flags = open("/proc/cpuinfo").read().split()
    return "avx512_vnni" in flags and "avx512vbmi" in flags


@contextlib.contextmanager
def _matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) inside the block (the C++ op reads it per call)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _check(y, x, wq, bias, what):
    # The kernels dequantize in fp32 from the stored scale: so does this fp32 reference.
    dense32 = sk.NMSparseWeight(wq.values, wq.meta, wq.n, wq.m, wq.shape, wq.scales.float(), wq.zeros,
                                wq.group_size).to_dense()  # fmt: skip
    assert_matches_dense(y, x, dense32, bias, what)


NM = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 8), (3, 8), (2, 16)]  # 3:8 and 2:16: the portable path


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 13, 40, 70])  # 70: past every decode limit (a sparse GEMM, or the tiles)
@pytest.mark.parametrize("group_size", [0, 32, 128])
@pytest.mark.parametrize("quant", q.QUANTS)
@pytest.mark.parametrize("nm", NM, ids=lambda p: f"{p[0]}:{p[1]}")
def test_quantized_nm_linear_cpu(isa, nm, quant, group_size, rows, dtype):
    n, m = nm
    k = 384 if group_size != 32 else 352  # 352: 11 groups of 32, a partial last 16-slot step at 2:4
    if group_size and (k % group_size or group_size % m):
        pytest.skip("group does not divide K")
    symmetric = rows % 2 == 1
    wq = _qweight(19, k, n, m, quant, group_size, symmetric, dtype)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(19).to(dtype) if rows != 3 else None
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, wq, bias)
    _check(y, x, wq, bias, f"{isa} {n}:{m} {quant} g{group_size} sym={symmetric} rows={rows} {dtype}")


@needs_ext
@pytest.mark.parametrize("rows", [1, 2, 5, 13, 70])  # 5: decode; 13, 70: a sparse GEMM (AVX-512 BF16, AVX2) or tiles
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("quant", q.QUANTS)
# Steps of 32 kept slots (K / 2 at 2:4 and 4:8, K / 4 at 1:4 and 2:8): whole steps (384 at 2:4,
# 4096), a partial last one (200, 352, 480, 1344); 4:8 at 384 and 1344 walks all five phases of
# its 3-bit meta. Groups in kept slots: at 2:4 and 4:8 half the group size, 16 (each half-step
# its own group), 32 (a group per step), 48 (a step's halves in two groups), 64, 96; at 1:4 and
# 2:8 a quarter: 8 (group size 32: each quarter-step its own group; with zero points the AVX2
# kernel), 24 (the AVX2 kernel); 0: one per row.
@pytest.mark.parametrize(
    "k,group_size",
    [(k, g) for k in (200, 352, 384, 480, 1344, 4096) for g in (0, 32, 64, 96, 128, 192) if g == 0 or k % g == 0],
)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8), (4, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_quantized_nm_bf16_decode(dtype, nm, k, group_size, quant, symmetric, rows):
    """Quantized N:M with bf16 or fp32 x and scales (on AVX-512 BF16 + VBMI: the vdpbf16ps decode
    kernel, which scales per group, half-step or quarter-step and looks int4 up in tables; fp32 x
    goes in as three bf16 parts at one row (more rows: the AVX2 quads kernel), and as two at any
    rows under float32 matmul precision "high"; past a few rows the sparse GEMM, which dequantizes
    each block of values to bf16 or fp32 as it packs it, or where the group layout does not suit it
    the decode passes up to 64 rows and then the tiles) at every group layout and tail. Values this short take the decode kernel's far
    prefetch on any pages; test_quantized_real_shape runs the page-boundary prefetch of long
    values."""
    n, m = nm
    wq = _qweight(23, k, n, m, quant, group_size, symmetric, dtype)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(23).to(dtype) if rows != 2 else None
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, wq, bias)
    _check(y, x, wq, bias, f"{n}:{m} {quant} g{group_size} sym={symmetric} k={k} rows={rows} {dtype}")
    if dtype == torch.float32:
        with _matmul_precision("high"), sk.use_backend("cpu"):
            y = sk.ops.nm_linear(x, wq, bias)
        _check(y, x, wq, bias, f"{n}:{m} {quant} g{group_size} sym={symmetric} k={k} rows={rows} high")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 7, 13, 40])
@pytest.mark.parametrize("k", [4, 36, 132])
def test_quantized_odd_kept_with_zero_points(isa, k, rows, dtype):
    """1:4 int8 with zero points and an odd count of kept slots per row (K / 4): the sparse GEMM
    packs slots in pairs, and the last pair's second slot (past K) must add nothing, though its
    zero point would dequantize it to -zero * scale."""
    wq = _qweight(19, k, 1, 4, "int8", 0, symmetric=False, dtype=dtype)
    assert wq.zeros is not None and wq.values.shape[1] % 2 == 1
    x = torch.randn(rows, k).to(dtype)
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, wq)
    _check(y, x, wq, None, f"{isa} 1:4 k={k} rows={rows} {dtype}")


@needs_ext
@pytest.mark.parametrize("rows", [1, 4, 6])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8), (4, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_quantized_fp32_x_keeps_its_low_bits(isa, nm, rows):
    """fp32 x whose low bits carry the answer (1 + j / 4096 and its negation: 13 significant bits,
    which one bf16 rounding of x would cut to 8) with quantized values: fp32 accuracy at every
    ISA level (the AVX-512 BF16 kernel takes one row of x as three bf16 parts)."""
    n, m = nm
    wq = _qweight(31, 640, n, m, "int4", 64, False)
    x = 1 + torch.randint(0, 4096, (rows, 640)) * 2.0**-12
    x[:, ::3] *= -1
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, wq)
    dense32 = wq.to_dense()
    _check(y, x, wq, None, f"{isa} {n}:{m} rows={rows}")
    # (what a kernel that rounded x to bf16 once would give: out of the same bound)
    rounded = F.linear(x.bfloat16().float(), dense32)
    with pytest.raises(AssertionError, match="out of bound"):
        _check(rounded, x, wq, None, "x rounded to bf16")


@needs_ext
@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8), (4, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_quantized_fp32_products_follow_matmul_precision(isa, nm, rows, precision):
    """One kept weight per output row (q in -127..127, scale 1/2), fp32 x with all 24 bits: the
    answer is one product, so a kernel with fp32 products is within 2 roundings of it. At
    torch.get_float32_matmul_precision() "highest" (the default) every kernel is; at "high" the
    AVX-512 BF16 kernel may take x as two bf16 parts (within 2^-17 |x|), like torch's own
    reduced-precision fp32 matmuls."""
    n, m = nm
    out, k = 37, 512
    kept = k // m * n
    values = torch.zeros(out, kept, dtype=torch.int8)
    slot = torch.randint(0, kept, (out,))
    sign = 1 - 2 * (torch.arange(out) % 2)
    values[torch.arange(out), slot] = (torch.randint(1, 128, (out,)) * sign).to(torch.int8)
    meta = sk.NMSparseWeight.from_dense(torch.randn(out, k), n=n, m=m, prune=True).meta
    wq = sk.NMSparseWeight(values, meta, n, m, (out, k), torch.full((out, 1), 0.5), None, 0).validate()
    x = torch.randn(rows, k)
    with _matmul_precision(precision), sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, wq)
    exact = F.linear(x.double(), wq.to_dense().double())
    rel = ((y.double() - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    assert rel <= (2.0**-21 if precision == "highest" else 2.0**-16), f"{isa} {n}:{m} rows={rows}: {rel:.3g}"


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant", q.QUANTS)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_quantized_huge_x_rows_match_dense(nm, quant, dtype):
    """A row of x holding a finite value of magnitude >= 2^100 (here 1e37): the integer kernels sum
    q * x before the scale, which overflows where (q * scale) * x does not, so such rows are
    redone densely, as rows holding NaN / Inf are; the other rows stay on the kernel."""
    n, m = nm
    w = sk.NMSparseWeight.from_dense(torch.randn(16, 256) * 0.01, n=n, m=m, prune=True)
    wq = w.quantize(quant, 64).to(dtype)
    x = torch.randn(3, 256)
    x[1, :8] = 1e37  # q * 1e37 > fp32's largest value from |q| = 35; scale * q * 1e37 is far below it
    x = x.to(dtype)
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, wq)
    assert torch.isfinite(y).all()
    _check(y, x, wq, None, f"{n}:{m} {quant} {dtype}")


@pytest.fixture(scope="module", params=[(qq, d) for qq in q.QUANTS for d in (torch.bfloat16, torch.float32)],
                ids=lambda p: f"{p[0]}-{p[1]}")  # fmt: skip
def real_shape_weight(request):
    """A Llama-7B / TinyLlama MLP weight (11008 x 4096), 2:4, group 128, made once for its three
    row counts (1.6 s to draw, prune and quantize here): fresh random, seeded by its parameters."""
    quant, dtype = request.param
    with torch.random.fork_rng():
        torch.manual_seed(zlib.crc32(f"real-shape-{quant}-{dtype}".encode()))
        wq = _qweight(11008, 4096, 2, 4, quant, 128, dtype=dtype)
    # The fp32 yardstick of _check, once per weight too.
    dense32 = sk.NMSparseWeight(wq.values, wq.meta, 2, 4, wq.shape, wq.scales.float(), wq.zeros, 128).to_dense()
    return quant, wq, dense32


@needs_ext
@pytest.mark.parametrize("rows", [1, 4, 70])  # 70: a sparse GEMM (AVX-512 BF16, AVX2) or decompress + GEMM
def test_quantized_real_shape(real_shape_weight, rows):
    """Llama-7B / TinyLlama MLP shape (11008 x 4096), 2:4, group 128, bf16 or fp32 activations."""
    quant, wq, dense32 = real_shape_weight
    x = torch.randn(rows, 4096).to(wq.dtype)
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, wq)
    assert_matches_dense(y, x, dense32, None, f"11008x4096 {quant} rows={rows} {wq.dtype}")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act_block", [0, 32])
@pytest.mark.parametrize("rows", [3, 70])  # decode kernel; batched path (70 rows: past both dtypes' decode rows)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8), (4, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_nonfinite_x_propagates_like_dense(nm, rows, act_block, dtype):
    """A row of x holding Inf / NaN comes out as from the dense op (rounding it to int8 would give
    finite integers), the other rows finite."""
    w = sk.NMSparseWeight.from_dense(torch.randn(16, 128), *nm, prune=True)
    wq = w.quantize("int8", 64, act_block=act_block).to(dtype)
    x = torch.randn(rows, 128).to(dtype)
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, wq)
    ref = F.linear(x.float(), wq.to(torch.float32).to_dense())
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.isnan(y[1:3]).any(dim=1).all() and torch.isfinite(y[[0] + list(range(3, rows))]).all()


@needs_ext
def test_cpu_op_checks_quantized_arguments_itself():
    wq = _qweight(8, 64, 2, 4, "int4", 32, symmetric=False)
    op = torch.ops.sparsekern._nm_linear_cpu
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"scales: expected shape \(8, 2\)"):
        op(x, wq.values, wq.meta, 2, 4, None, wq.scales[:, :1], wq.zeros, 32)
    with pytest.raises(TypeError, match="scales: expected torch.Tensor for quantized values, got None"):
        op(x, wq.values, wq.meta, 2, 4, None, None, None, 32)
    with pytest.raises(TypeError, match="zeros: expected dtype"):
        op(x, wq.values, wq.meta, 2, 4, None, wq.scales, wq.zeros.to(torch.uint8), 32)
    with pytest.raises(ValueError, match="group_size: expected 0"):
        op(x, wq.values, wq.meta, 2, 4, None, wq.scales, wq.zeros, 24)
    with pytest.raises(TypeError, match=r"scales: expected dtype torch.bfloat16 \(that of x\)"):
        op(x.bfloat16(), wq.values, wq.meta, 2, 4, None, wq.scales, wq.zeros, 32)
    with pytest.raises(ValueError, match="scales/zeros/group_size/act_block: only int8"):
        op(x, wq.float_values(), wq.meta, 2, 4, None, wq.scales, None, 32)
    # the same words from the Python op (every backend)
    with pytest.raises(ValueError, match=r"scales: expected shape \(8, 2\)"):
        torch.ops.sparsekern.nm_linear(x, wq.values, wq.meta, 2, 4, None, wq.scales[:, :1], wq.zeros, 32)


@needs_ext
@pytest.mark.parametrize("rows", [1, 37])
def test_opcheck_quantized(rows):
    wq = _qweight(20, 64, 2, 4, "int4", 32, symmetric=False)
    args = (torch.randn(rows, 64), wq.values, wq.meta, 2, 4, torch.randn(20), wq.scales, wq.zeros, 32)
    torch.library.opcheck(torch.ops.sparsekern._nm_linear_cpu.default, args)
    torch.library.opcheck(torch.ops.sparsekern.nm_linear.default, args)


def test_cuda_backend_declines_quantized_values():
    from sparsekern import dispatch

    wq = _qweight(8, 64, 2, 4, "int8", 0)
    args = (torch.randn(1, 64), wq.values, wq.meta, 2, 4, None, *wq.quant_args())
    impl = dispatch.implementations("nm_linear").get("cuda")
    if impl is not None:
        assert "quantized" in impl.supports(*args)


# -- modules, sparsify, checkpoints ------------------------------------------------------------


def test_sparse_linear_quantized_state_and_dtype():
    lin = torch.nn.Linear(64, 24)
    layer = sk.SparseLinear.from_linear(lin, "2:4", quant="int8", group_size=32)
    assert layer.quant == "int8" and layer.dtype == torch.float32 and layer.group_size == 32
    assert set(layer.state_dict()) == {"values", "meta", "scales", "bias"}
    x = torch.randn(5, 64)
    with sk.use_backend("reference"):
        ref = layer(x)
    torch.testing.assert_close(ref, F.linear(x, layer.weight, layer.bias))
    half = layer.to(torch.bfloat16)
    assert half.values.dtype == torch.int8 and half.scales.dtype == torch.bfloat16 and half.bias.dtype == torch.bfloat16
    assert half(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("quant,group_size,symmetric", [("int8", 0, True), ("int4", 32, True)])
def test_sparsify_save_load_from_pretrained(tmp_path, quant, group_size, symmetric):
    from transformers import AutoModelForCausalLM

    model = tiny_lm.llama(vocab_size=128)
    ids = torch.randint(0, 128, (1, 9))
    report = sk.sparsify(model, "2:4", skip=["lm_head"], quant=quant, group_size=group_size, progress=False)
    assert len(report.swapped) == 14
    layer = model.model.layers[0].mlp.down_proj
    assert layer.quant == quant and layer.group_size == group_size
    with torch.no_grad():
        ref = model(ids).logits
    sk.save(model, tmp_path / "ck")
    again = tiny_lm.llama(vocab_size=128)
    sk.load(tmp_path / "ck", again)
    assert again.model.layers[0].mlp.down_proj.quant == quant
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    hf_bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert hf_bf16.model.layers[1].self_attn.q_proj.scales.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)
        assert torch.equal(hf(ids).logits, ref)
        assert (hf_bf16(ids).logits.float() - ref).abs().max() < 0.05


def test_sparsify_skips_layers_the_group_does_not_divide():
    model = tiny_lm.llama(vocab_size=128)
    report = sk.sparsify(model, "2:4", skip=["lm_head"], quant="int8", group_size=128, progress=False)
    skipped = {r.name for r in report.skipped}
    # in_features 64 (q/k/v/o, gate/up) is not divisible by 128; down_proj (128) is
    assert "model.layers.0.self_attn.q_proj" in skipped and "model.layers.0.mlp.down_proj" not in skipped
    with pytest.raises(ValueError, match="quant: expected one of"):
        sk.sparsify(tiny_lm.llama(vocab_size=128), "2:4", quant="fp8", progress=False)


def test_checkpoint_with_wrong_quant_field_is_refused(tmp_path):
    import json

    model = tiny_lm.llama(vocab_size=128)
    sk.sparsify(model, "2:4", skip=["lm_head"], quant="int8", progress=False)
    sk.save(model, tmp_path / "ck")
    cfg_file = tmp_path / "ck" / "sparsekern.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["layers"]["model.layers.0.mlp.up_proj"]["quant"] = "int4"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="expected int4 shape|expected int4 values"):
        sk.load(tmp_path / "ck", tiny_lm.llama(vocab_size=128))


def test_sparsegpt_rounds_inside_its_sweep():
    """Joint pruning + int4: rounding errors spread by OBS beat rounding SparseGPT's result after."""
    from sparsekern.prune import prune_quantized, prune_weight

    w = torch.randn(64, 256)
    x = torch.randn(1024, 256) @ torch.randn(256, 256) * 0.3  # correlated inputs, as in a real layer
    h = x.T @ x

    def added_error(sparse, base):  # output error beyond the unquantized SparseGPT result's
        return float(((x @ (w - sparse.to_dense()).T) ** 2).mean() - ((x @ (w - base).T) ** 2).mean())

    base, keep = prune_weight(w, "2:4", "sparsegpt", hessian=h)
    for quant, group_size, symmetric in (("int4", 32, True), ("int4", 64, False)):
        joint = prune_quantized(w, "2:4", "sparsegpt", quant, group_size, symmetric, hessian=h).validate()
        assert joint.quant == quant and joint.scales.shape == (64, 256 // group_size)
        assert torch.equal(joint.to_dense() != 0, (joint.to_dense() != 0) & keep)  # SparseGPT's own mask
        after = sk.NMSparseWeight.from_dense(base, 2, 4).quantize(quant, group_size, symmetric)
        assert added_error(joint, base) < added_error(after, base), (quant, group_size)
    with pytest.raises(ValueError, match="quant: int8/int4 values are implemented for N:M and block patterns"):
        prune_quantized(w, "unstructured:0.5", "sparsegpt", "int8", hessian=h)


def test_sparsegpt_act_order_rounds_loud_inputs_first():
    """The joint rounding sweep in decreasing H_jj: the mask of the unquantized pass, values on the
    grid, the weights back in column order, and less added output error than rounding left to
    right when the inputs' scales differ."""
    from sparsekern.prune.patterns import parse_pattern
    from sparsekern.prune.sparsegpt import sparsegpt_prune

    torch.manual_seed(0)
    w = torch.randn(96, 256)
    x = torch.randn(2048, 256) @ torch.randn(256, 256) * 0.3 * torch.logspace(0, 1.5, 256)[torch.randperm(256)]
    h = x.T @ x
    pattern = parse_pattern("2:4")
    base, base_keep = sparsegpt_prune(w, pattern, h)

    def error(q):
        return float(((x @ (w - q).T) ** 2).mean())

    for quant, group_size, symmetric in (("int4", 32, True), ("int4", 64, False)):
        added = {}
        for act_order in (False, True):
            q, keep, scales, zeros = sparsegpt_prune(
                w, pattern, h, quant=(quant, group_size, symmetric), act_order=act_order
            )
            assert torch.equal(keep, base_keep) and torch.equal(q != 0, (q != 0) & keep)
            nibbles = q.view(96, -1, group_size) / scales.unsqueeze(-1) + zeros.unsqueeze(-1)
            nibbles = nibbles.masked_select(keep.view(96, -1, group_size))  # 0..15, the zero point 8 if symmetric
            assert (
                torch.allclose(nibbles, nibbles.round(), atol=1e-3) and nibbles.min() > -1e-3 and nibbles.max() < 15.001
            )
            added[act_order] = error(q) - error(base)
        assert 0 < added[True] < 0.97 * added[False], (quant, added)


# -- int8 activations (act_block) ---------------------------------------------------------------


def test_quantize_x_rounds_per_block():
    from sparsekern.reference import quantize_x

    x = torch.randn(3, 96) * torch.linspace(0.01, 10, 96)
    xq = quantize_x(x, 32)
    step = x.view(3, 3, 32).abs().amax(-1, keepdim=True) / 127
    assert ((xq - x).view(3, 3, 32).abs() <= step / 2 + 1e-6).all()
    units = xq.view(3, 3, 32) / step
    assert ((units - units.round()).abs() < 1e-4).all() and units.abs().max() <= 127 + 1e-4  # on the grid
    assert torch.equal(quantize_x(torch.zeros(2, 32), 32), torch.zeros(2, 32))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 5, 40, 70])  # 40: a sparse GEMM (AVX-512 BF16 fp32 / bf16; AVX2) or decode
@pytest.mark.parametrize("group_size", [0, 32, 64, 128, 192])  # 192: steps straddle groups (portable)
@pytest.mark.parametrize("quant", q.QUANTS)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8), (4, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_int8_activations_cpu(isa, nm, quant, group_size, rows, dtype):
    """act_block=32 against the reference (x rounded per block, then the fp32 product). 2:4 takes
    the AVX-512 VBMI+VNNI kernel where the CPU has it; 320 columns end in a partial 128-column step."""
    from sparsekern.reference import quantize_x

    if isa == "avx512" and not _has_vnni_vbmi():
        pytest.skip("this CPU lacks AVX-512 VBMI/VNNI")
    n, m = nm
    k = 320 if group_size in (0, 32, 64) else 384
    symmetric = rows != 3
    w = sk.NMSparseWeight.from_dense(torch.randn(21, k), n=n, m=m, prune=True)
    wq = w.quantize(quant, group_size, symmetric, act_block=32).to(dtype)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(21).to(dtype)
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, wq, bias)
    dense32 = sk.NMSparseWeight(wq.values, wq.meta, n, m, wq.shape, wq.scales.float(), wq.zeros, group_size).to_dense()
    xq = quantize_x(x, 32)
    ref32 = F.linear(xq, dense32, bias.float())
    same = _a8_same(ref32, xq, dense32, bias, rows, dtype, nm)
    mag = F.linear(xq.abs(), dense32.abs(), bias.float().abs())
    assert_matches_reference(y, ref32, same, f"{isa} {n}:{m} {quant} g{group_size} a32 rows={rows} {dtype}", mag)
    # and it is what the reference backend computes
    with sk.use_backend("reference"):
        torch.testing.assert_close(sk.ops.nm_linear(x, wq, bias).float(), ref32.to(dtype).float(), rtol=0, atol=0)


def _a8_same(ref32, xq, dense32, bias, rows, dtype, nm=(2, 4)):
    """What the int8-activation op is held to beside the fp32 reference ``ref32`` (of x rounded,
    ``xq``): its result rounded once to x's dtype; in bf16 on AVX-512 BF16, from 33 rows at 2:4 and
    from 9 at the other patterns, the bf16 GEMM of the rounded x (rounded once more to bf16, W in
    bf16), as every other bf16 batch runs there. Other CPUs multiply the rounded x in fp32 (the AVX2
    sparse GEMM, or fp32 tiles) at any row count."""
    bf16_level = int(torch.ops.sparsekern._cpu_isa()) >= _extension.CPU_ISAS["avx512bf16"]
    if dtype == torch.bfloat16 and bf16_level and rows >= (33 if nm == (2, 4) else 9):
        return F.linear(xq.to(dtype), dense32.to(dtype), None if bias is None else bias.to(dtype))
    return ref32.to(dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 70])  # decode kernel; batched path (x rounded, then the GEMM)
def test_int8_activations_round_coarse_blocks(rows, dtype):
    """One large value per 32-column block (on a pruned column) makes x's int8 step coarse (most
    values round to 0 or one step): a path that skipped the rounding is off by far more than
    the tolerance."""
    from sparsekern.reference import quantize_x

    k = 384
    dense = torch.randn(21, k)
    dense[:, ::32] = 0.0  # pruned: the outliers set the scale but add nothing
    w = sk.NMSparseWeight.from_dense(dense, n=2, m=4, prune=True)
    wq = w.quantize("int4", 128, act_block=32).to(dtype)
    x = torch.randn(rows, k)
    x[:, ::32] = 150.0
    x = x.to(dtype)
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, wq)
    dense32 = sk.NMSparseWeight(wq.values, wq.meta, 2, 4, wq.shape, wq.scales.float(), None, 128).to_dense()
    xq = quantize_x(x, 32)
    ref32 = F.linear(xq, dense32)
    unrounded = F.linear(x.float(), dense32)
    mag = F.linear(xq.abs(), dense32.abs())
    assert ((unrounded - ref32).abs() / mag).amax() > 0.02  # the case is as coarse as it claims
    same = _a8_same(ref32, xq, dense32, None, rows, dtype)
    assert_matches_reference(y, ref32, same, f"coarse blocks rows={rows} {dtype}", mag)


@needs_ext
@pytest.mark.parametrize("quant,group_size", [("int8", 0), ("int4", 128)])
def test_int8_activations_real_shape(quant, group_size):
    """Llama-7B / TinyLlama MLP shape (11008 x 4096), 2:4, bf16 x: the kernel reads every weight."""
    from sparsekern.reference import quantize_x

    w = sk.NMSparseWeight.from_dense(torch.randn(11008, 4096), 2, 4, prune=True)
    wq = w.quantize(quant, group_size, act_block=32).to(torch.bfloat16)
    x = torch.randn(1, 4096).to(torch.bfloat16)
    with sk.use_backend("cpu"):
        y = sk.ops.nm_linear(x, wq)
    dense32 = sk.NMSparseWeight(wq.values, wq.meta, 2, 4, wq.shape, wq.scales.float(), None, group_size).to_dense()
    xq = quantize_x(x, 32)
    ref32 = F.linear(xq, dense32)
    assert_matches_reference(
        y, ref32, ref32.to(torch.bfloat16), f"11008x4096 {quant} a32", F.linear(xq.abs(), dense32.abs())
    )


def test_int8_activations_bad_input():
    w = sk.NMSparseWeight.from_dense(torch.randn(8, 96), 2, 4, prune=True)
    with pytest.raises(ValueError, match="act_block: expected 0 .* divides in_features 96, got 64"):
        w.quantize("int8", act_block=64)
    with pytest.raises(ValueError, match="scales/zeros/group_size/act_block: only quantized"):
        sk.NMSparseWeight(w.values, w.meta, 2, 4, w.shape, act_block=32)
    wq = w.quantize("int8", act_block=32)
    x = torch.randn(1, 96)
    with pytest.raises(ValueError, match="act_block: expected 0 .* got 40"):
        torch.ops.sparsekern.nm_linear(x, wq.values, wq.meta, 2, 4, None, wq.scales, None, 0, 40)
    if _extension.HAS_C_EXT:
        with pytest.raises(ValueError, match="act_block: expected 0"):
            torch.ops.sparsekern._nm_linear_cpu(x, wq.values, wq.meta, 2, 4, None, wq.scales, None, 0, 40)


def test_int8_activations_survive_save_and_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_lm.llama(vocab_size=128)
    sk.sparsify(model, "2:4", skip=["lm_head"], quant="int4", group_size=64, act_block=32, progress=False)
    assert model.model.layers[0].mlp.up_proj.act_block == 32
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        ref = model(ids).logits
    sk.save(model, tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert hf.model.layers[1].mlp.down_proj.act_block == 32
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ref)


def test_quantize_leaves_the_layers_sparsify_would_skip():
    """sk.quantize skips what sparsify(..., quant=) skips, instead of stopping half-way."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(12, 8), torch.nn.Linear(96, 8))
    sk.sparsify(model, "1:4", skip=[], progress=False)
    # layer 1: 12 columns at 1:4 keep 3 a row, an odd count: no int4 pairs (one scale per row)
    assert sk.quantize(model, "int4") == ["0", "2"]
    assert [layer.quant for layer in model] == ["int4", None, "int4"]
