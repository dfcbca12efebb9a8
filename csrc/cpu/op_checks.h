// Argument checks of the registered CPU ops (*_op.cpp). torch.ops.sparsekern._*_cpu can be
// called by anyone, not only through sparsekern/ops.py, so each op checks what it reads where the
// memory is touched. Messages follow the wording of the Python checks (sparsekern/ops.py,
// formats/bsr.py) so every backend refuses a bad input with the same words; TORCH_CHECK_VALUE /
// TORCH_CHECK_TYPE surface in Python as ValueError / TypeError.
#pragma once
#ifdef SPARSEKERN_TORCH
#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>

namespace sparsekern {

// Python spellings, so the messages read as the Python checks' do: (4,), torch.float32.
inline std::string py_shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline void check_tensor(const char* name, const at::Tensor& t, std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK_TYPE(t.defined(), name, ": expected torch.Tensor, got None");
  bool ok = false;
  std::string list = "[";
  for (at::ScalarType d : dtypes) {
    ok = ok || t.scalar_type() == d;
    list += (list.size() > 1 ? ", '" : "'") + py_dtype(d) + "'";
  }
  TORCH_CHECK_TYPE(ok, name, ": expected dtype in ", list, "], got ", py_dtype(t.scalar_type()));
}

inline void check_float(const char* name, const at::Tensor& t) {
  check_tensor(name, t, {at::kFloat, at::kHalf, at::kBFloat16});
}

// Same device and dtype as ref (what the kernels assume of their operands).
inline void check_same(const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(), " (that of ", ref_name,
                    "), got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", py_dtype(ref.scalar_type()),
                   " (that of ", ref_name, "), got ", py_dtype(t.scalar_type()));
}

inline void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(), " (that of ", ref_name,
                    "), got ", t.device());
}

// x [rows, k] on the CPU, weight of x's dtype, bias [out] (sparsekern/ops.py _check_linear_common).
inline void check_linear_common(const at::Tensor& x, const at::Tensor& weight, const char* weight_name, int64_t out,
                                int64_t k, const std::optional<at::Tensor>& bias) {
  check_float("x", x);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected device cpu (a CPU kernel), got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D [rows, in_features] tensor, got shape ", py_shape(x.sizes()));
  check_same(weight_name, weight, x, "x");
  TORCH_CHECK_VALUE(x.size(1) == k, "x: expected last dimension ", k, " (in_features), got shape ",
                    py_shape(x.sizes()));
  if (bias) {
    check_float("bias", *bias);
    check_same("bias", *bias, x, "x");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "bias: expected shape ", py_shape({out}), ", got ",
                      py_shape(bias->sizes()));
  }
}

// sparsekern/formats/nm.py check_nm, sparsekern/ops.py check_nm_linear and, for quantized
// values, sparsekern/formats/quant.py check_parts.
inline void check_nm_linear_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, int64_t n,
                                 int64_t m, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& zeros,
                                 int64_t group_size, int64_t act_block) {
  TORCH_CHECK_VALUE(m == 2 || m == 4 || m == 8 || m == 16, "m: expected one of (2, 4, 8, 16), got ", m);
  TORCH_CHECK_VALUE(0 < n && n < m, "n: expected 0 < n < m=", m, ", got ", n);
  check_tensor("values", values, {at::kFloat, at::kHalf, at::kBFloat16, at::kChar, at::kByte});
  check_tensor("meta", meta, {at::kInt});
  const bool quantized = values.scalar_type() == at::kChar || values.scalar_type() == at::kByte;
  const int64_t packed = values.scalar_type() == at::kByte ? 2 : 1;  // int4: two kept weights per byte
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(1) * packed % n == 0, "values: expected [out, K*", n, "/", m,
                    "], got shape ", py_shape(values.sizes()));
  const int64_t out = values.size(0), kept = values.size(1) * packed, k = kept / n * m;
  int bits = 0;
  while ((int64_t{1} << bits) < m) ++bits;
  const int64_t per_word = 32 / bits, words = (kept + per_word - 1) / per_word;
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == out && meta.size(1) == words, "meta: expected shape ",
                    py_shape({out, words}), ", got ", py_shape(meta.sizes()));
  check_same_device("meta", meta, values, "values");
  if (!quantized) {
    TORCH_CHECK_VALUE(!scales && !zeros && group_size == 0 && act_block == 0,
                      "scales/zeros/group_size/act_block: only int8 / uint8 (int4) values take them, got ",
                      py_dtype(values.scalar_type()));
    check_linear_common(x, values, "values", out, k, bias);
    return;
  }
  TORCH_CHECK_VALUE(group_size == 0 || (group_size > 0 && group_size % m == 0 && k % group_size == 0),
                    "group_size: expected 0 (one scale per row) or a multiple of m=", m, " that divides in_features ",
                    k, ", got ", group_size);
  const int64_t groups = group_size ? k / group_size : 1;
  TORCH_CHECK_VALUE(act_block == 0 || (act_block > 0 && k % act_block == 0),
                    "act_block: expected 0 (x as it is) or a block size that divides in_features ", k, ", got ",
                    act_block);
  TORCH_CHECK_TYPE(scales.has_value(), "scales: expected torch.Tensor for quantized values, got None");
  check_float("scales", *scales);
  TORCH_CHECK_VALUE(scales->dim() == 2 && scales->size(0) == out && scales->size(1) == groups, "scales: expected shape ",
                    py_shape({out, groups}), " (rows, groups), got ", py_shape(scales->sizes()));
  check_same_device("scales", *scales, values, "values");
  if (zeros) {
    check_tensor("zeros", *zeros, {at::kChar});
    TORCH_CHECK_VALUE(zeros->dim() == 2 && zeros->size(0) == out && zeros->size(1) == groups, "zeros: expected shape ",
                      py_shape({out, groups}), ", got ", py_shape(zeros->sizes()));
    check_same_device("zeros", *zeros, values, "values");
  }
  check_linear_common(x, *scales, "scales", out, k, bias);
}

// sparsekern/ops_moe.py check_offsets: int64 [experts + 1] on the CPU.
inline void check_offsets(const at::Tensor& offsets, int64_t e) {
  check_tensor("offsets", offsets, {at::kLong});
  TORCH_CHECK_VALUE(offsets.device().is_cpu(), "offsets: expected device cpu (the host splits rows by expert), got ",
                    offsets.device());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == e + 1, "offsets: expected shape ", py_shape({e + 1}),
                    " (experts + 1), got ", py_shape(offsets.sizes()));
}

// sparsekern/ops_moe.py check_offsets_values: from 0 to the rows of x, non-decreasing.
inline void check_offsets_values(const at::Tensor& offsets, int64_t e, int64_t tokens) {
  const at::Tensor off_c = offsets.contiguous();
  const int64_t* off = off_c.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[0] == 0 && off[e] == tokens, "offsets: expected to start at 0 and end at the rows of x (",
                    tokens, "), got ", off[0], "..", off[e]);
  for (int64_t i = 0; i < e; ++i) {
    TORCH_CHECK_VALUE(off[i + 1] >= off[i], "offsets: expected non-decreasing, got ", off[i], " then ", off[i + 1],
                      " at expert ", i);
  }
}

// sparsekern/ops_moe.py check_nm_grouped_linear and check_offsets_values: x [T, K] on the CPU,
// values [E, out, K*n/m] of x's dtype (float only), meta int32 [E, out, words], offsets int64
// [E+1] on the CPU from 0 to T, non-decreasing. Returns nothing; the op reads offsets itself.
inline void check_nm_grouped_linear_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                         const at::Tensor& offsets, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(m == 2 || m == 4 || m == 8 || m == 16, "m: expected one of (2, 4, 8, 16), got ", m);
  TORCH_CHECK_VALUE(0 < n && n < m, "n: expected 0 < n < m=", m, ", got ", n);
  TORCH_CHECK_VALUE(!values.defined() || (values.scalar_type() != at::kChar && values.scalar_type() != at::kByte),
                    "values: nm_grouped_linear takes float values only (quantized experts are not supported yet), got ",
                    py_dtype(values.scalar_type()));
  check_float("values", values);
  check_tensor("meta", meta, {at::kInt});
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(2) % n == 0, "values: expected [experts, out, K*", n, "/", m,
                    "], got shape ", py_shape(values.sizes()));
  const int64_t e = values.size(0), out = values.size(1), kept = values.size(2);
  int bits = 0;
  while ((int64_t{1} << bits) < m) ++bits;
  const int64_t per_word = 32 / bits, words = (kept + per_word - 1) / per_word;
  TORCH_CHECK_VALUE(meta.dim() == 3 && meta.size(0) == e && meta.size(1) == out && meta.size(2) == words,
                    "meta: expected shape ", py_shape({e, out, words}), ", got ", py_shape(meta.sizes()));
  check_same_device("meta", meta, values, "values");
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D [tokens, in_features] tensor, got shape ", py_shape(x.sizes()));
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected device cpu (a CPU kernel), got ", x.device());
  check_same("values", values, x, "x");
  TORCH_CHECK_VALUE(x.size(1) == kept / n * m, "x: expected last dimension ", kept / n * m,
                    " (in_features), got shape ", py_shape(x.sizes()));
  check_offsets(offsets, e);
  check_offsets_values(offsets, e, x.size(0));
}


// The index structure of a BSR weight: crow starts at 0, never decreases, ends at nnz; every
// col in 0..kb-1 and strictly increasing within a block row. The same checks, in the same order,
// as sparsekern/formats/bsr.py check_bsr_indices, so both name the same first bad entry.
// NOTE: runs on every call, in C++ (no per-weight cache): it is O(nnz) int32 reads against the
// kernel's O(nnz * bm * bk). 4096x4096, 32x32 blocks, 90% sparse (1638 blocks), 1 row fp32, 2-core
// EPYC under load: the op's 0-row call (checks only) took 2.8 us against 2.45 us with an empty
// weight, so the scan costs ~0.35-0.6 us, 0.2-0.5% of the 1-row call (117-180 us). That needs the
// flat, branch-free passes below (the loops naming the bad entry run only on failure): a first
// version with a TORCH_CHECK per entry cost 1.6 us (1.3%).
inline void check_bsr_indices(const int32_t* crow, int64_t block_rows, const int32_t* col, int64_t nnz, int64_t kb) {
  TORCH_CHECK_VALUE(crow[0] == 0 && crow[block_rows] == nnz, "crow: expected to start at 0 and end at nnz=", nnz,
                    ", got ", crow[0], "..", crow[block_rows]);
  uint32_t bad = 0;
  for (int64_t r = 0; r < block_rows; ++r) bad |= crow[r + 1] < crow[r];
  if (bad) {
    for (int64_t r = 0; r < block_rows; ++r) TORCH_CHECK_VALUE(crow[r + 1] >= crow[r], "crow: decreases at block row ", r);
  }
  // crow now lies within 0..nnz, so every read below is in bounds. Flat passes over col: the
  // columns may only fail to increase where a (non-empty) block row starts.
  const uint32_t ukb = static_cast<uint32_t>(kb);  // a negative col wraps to a huge unsigned value
  for (int64_t i = 0; i < nnz; ++i) bad |= static_cast<uint32_t>(col[i]) >= ukb;
  int64_t drops = 0, row_starts = 0;
  for (int64_t i = 1; i < nnz; ++i) drops += col[i] <= col[i - 1];
  for (int64_t r = 1; r < block_rows; ++r) {
    const int64_t s = crow[r];
    if (s > 0 && s < crow[r + 1]) row_starts += col[s] <= col[s - 1];
  }
  if (!bad && drops == row_starts) return;
  for (int64_t i = 0; i < nnz; ++i) {
    TORCH_CHECK_VALUE(col[i] >= 0 && col[i] < kb, "col: entry ", i, " is ", col[i], ", out of range 0..", kb - 1);
  }
  for (int64_t r = 0; r < block_rows; ++r) {
    for (int64_t i = crow[r] + 1; i < crow[r + 1]; ++i) {
      TORCH_CHECK_VALUE(col[i] > col[i - 1], "col: block row ", r, " has columns out of order or repeated at entry ",
                        i);
    }
  }
}

// Quantized blocks' scales / zeros (sparsekern/formats/bsr.py check_quant_blocks): [nnz, bm, groups]
// with groups dividing bk into runs of a multiple of 8 columns, zeros int8 of the same shape.
inline void check_bsr_quant_args(const at::Tensor& blocks, int64_t bk, const std::optional<at::Tensor>& scales,
                                 const std::optional<at::Tensor>& zeros) {
  const int64_t nnz = blocks.size(0), bm = blocks.size(1);
  const char* quant = blocks.scalar_type() == at::kByte ? "uint8" : "int8";
  TORCH_CHECK_TYPE(scales.has_value(), "scales: expected torch.Tensor for ", quant, " blocks, got None");
  const int64_t groups = scales->dim() == 3 ? scales->size(2) : 0;
  TORCH_CHECK_VALUE(scales->dim() == 3 && scales->size(0) == nnz && scales->size(1) == bm && groups > 0 &&
                        bk % groups == 0 && (bk / groups) % 8 == 0,
                    "scales: expected shape (", nnz, ", ", bm, ", groups) with groups dividing the block width ", bk,
                    " into runs of a multiple of 8 columns, got ", py_shape(scales->sizes()));
  check_float("scales", *scales);
  check_same_device("scales", *scales, blocks, "blocks");
  if (zeros) {
    check_tensor("zeros", *zeros, {at::kChar});
    TORCH_CHECK_VALUE(zeros->sizes() == scales->sizes(), "zeros: expected shape ", py_shape(scales->sizes()),
                      " (that of scales), got ", py_shape(zeros->sizes()));
    check_same_device("zeros", *zeros, blocks, "blocks");
  }
}

// sparsekern/ops.py check_bsr_linear plus the index values.
inline void check_bsr_linear_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                  const at::Tensor& blocks, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& scales = std::nullopt,
                                  const std::optional<at::Tensor>& zeros = std::nullopt) {
  check_tensor("blocks", blocks, {at::kFloat, at::kHalf, at::kBFloat16, at::kChar, at::kByte});
  const bool quantized = blocks.scalar_type() == at::kChar || blocks.scalar_type() == at::kByte;
  check_tensor("crow", crow, {at::kInt});
  check_tensor("col", col, {at::kInt});
  TORCH_CHECK_VALUE(blocks.dim() == 3 && blocks.size(1) >= 1 && blocks.size(2) >= 1,
                    "blocks: expected [nnz, bm, bk] with bm, bk >= 1, got shape ", py_shape(blocks.sizes()));
  const int64_t nnz = blocks.size(0), bm = blocks.size(1);
  const int64_t bk = blocks.size(2) * (blocks.scalar_type() == at::kByte ? 2 : 1);  // int4: two per byte
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.numel() >= 1 && col.dim() == 1 && col.numel() == nnz,
                    "crow/col: expected 1-D crow and col with ", nnz, " entries, got ", py_shape(crow.sizes()),
                    " / ", py_shape(col.sizes()));
  check_same_device("crow", crow, blocks, "blocks");
  check_same_device("col", col, blocks, "blocks");
  if (quantized) {
    check_bsr_quant_args(blocks, bk, scales, zeros);
  } else {
    TORCH_CHECK_VALUE(!scales && !zeros, "scales/zeros: only int8 / uint8 (int4) blocks take them, got ",
                      py_dtype(blocks.scalar_type()));
  }
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected at least 1 dimension, got a scalar");
  const int64_t k = x.size(-1);
  check_linear_common(x, quantized ? *scales : blocks, quantized ? "scales" : "blocks", (crow.numel() - 1) * bm, k,
                      bias);
  TORCH_CHECK_VALUE(k % bk == 0, "x: last dimension ", k, " is not divisible by the block width ", bk);
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();  // the scan reads flat arrays
  check_bsr_indices(crow_c.data_ptr<int32_t>(), crow.numel() - 1, col_c.data_ptr<int32_t>(), nnz, k / bk);
}

// Stacked BSR experts' indices (sparsekern/formats/bsr.py check_bsr_grouped_indices, same order and
// words): crow [e, block_rows + 1] from 0 to nnz, each expert starting where the one before ends,
// rows non-decreasing; every col in 0..kb-1, strictly increasing within a block row. Flat passes
// first, as check_bsr_indices (see its NOTE); the loops naming the bad entry run only on failure.
inline void check_bsr_grouped_indices(const int32_t* crow, int64_t e, int64_t block_rows, const int32_t* col,
                                      int64_t nnz, int64_t kb) {
  const int64_t w = block_rows + 1;
  TORCH_CHECK_VALUE(crow[0] == 0 && crow[e * w - 1] == nnz, "crow: expected to start at 0 and end at nnz=", nnz,
                    ", got ", crow[0], "..", crow[e * w - 1]);
  for (int64_t i = 1; i < e; ++i) {
    TORCH_CHECK_VALUE(crow[i * w] == crow[i * w - 1], "crow: expert ", i, " starts at ", crow[i * w], ", expected ",
                      crow[i * w - 1], " (where expert ", i - 1, " ends)");
  }
  uint32_t bad = 0;
  for (int64_t i = 0; i < e; ++i) {
    for (int64_t r = 0; r < block_rows; ++r) bad |= crow[i * w + r + 1] < crow[i * w + r];
  }
  if (bad) {
    for (int64_t i = 0; i < e; ++i) {
      for (int64_t r = 0; r < block_rows; ++r) {
        TORCH_CHECK_VALUE(crow[i * w + r + 1] >= crow[i * w + r], "crow: decreases at expert ", i, " block row ", r);
      }
    }
  }
  // crow now runs from 0 to nnz without a step back: every read below is in bounds.
  const uint32_t ukb = static_cast<uint32_t>(kb);  // a negative col wraps to a huge unsigned value
  for (int64_t i = 0; i < nnz; ++i) bad |= static_cast<uint32_t>(col[i]) >= ukb;
  int64_t drops = 0, row_starts = 0;
  for (int64_t i = 1; i < nnz; ++i) drops += col[i] <= col[i - 1];
  for (int64_t i = 0; i < e; ++i) {
    for (int64_t r = 0; r < block_rows; ++r) {
      const int64_t s = crow[i * w + r];
      if (s > 0 && s < crow[i * w + r + 1]) row_starts += col[s] <= col[s - 1];
    }
  }
  if (!bad && drops == row_starts) return;
  for (int64_t i = 0; i < nnz; ++i) {
    TORCH_CHECK_VALUE(col[i] >= 0 && col[i] < kb, "col: entry ", i, " is ", col[i], ", out of range 0..", kb - 1);
  }
  for (int64_t i = 0; i < e; ++i) {
    for (int64_t r = 0; r < block_rows; ++r) {
      for (int64_t j = crow[i * w + r] + 1; j < crow[i * w + r + 1]; ++j) {
        TORCH_CHECK_VALUE(col[j] > col[j - 1], "col: expert ", i, " block row ", r,
                          " has columns out of order or repeated at entry ", j);
      }
    }
  }
}

// sparsekern/ops_moe.py check_bsr_grouped_linear, check_offsets_values and the index values:
// x [T, K] on the CPU, blocks [nnz, bm, bk] of x's dtype, crow int32 [E, out/bm + 1], col int32
// [nnz], offsets int64 [E+1] on the CPU from 0 to T, non-decreasing.
inline void check_bsr_grouped_linear_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                          const at::Tensor& blocks, const at::Tensor& offsets) {
  check_float("blocks", blocks);
  check_tensor("crow", crow, {at::kInt});
  check_tensor("col", col, {at::kInt});
  TORCH_CHECK_VALUE(blocks.dim() == 3 && blocks.size(1) >= 1 && blocks.size(2) >= 1,
                    "blocks: expected [nnz, bm, bk] with bm, bk >= 1, got shape ", py_shape(blocks.sizes()));
  const int64_t nnz = blocks.size(0), bk = blocks.size(2);
  TORCH_CHECK_VALUE(crow.dim() == 2 && crow.size(0) >= 1 && crow.size(1) >= 1,
                    "crow: expected [experts >= 1, out/bm + 1], got shape ", py_shape(crow.sizes()));
  TORCH_CHECK_VALUE(col.dim() == 1 && col.size(0) == nnz, "col: expected shape ", py_shape({nnz}),
                    " (one entry per block), got ", py_shape(col.sizes()));
  check_same_device("crow", crow, blocks, "blocks");
  check_same_device("col", col, blocks, "blocks");
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D [tokens, in_features] tensor, got shape ", py_shape(x.sizes()));
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected device cpu (a CPU kernel), got ", x.device());
  check_same("blocks", blocks, x, "x");
  TORCH_CHECK_VALUE(x.size(1) % bk == 0, "x: last dimension ", x.size(1), " is not divisible by the block width ",
                    bk);
  const int64_t e = crow.size(0);
  check_offsets(offsets, e);
  check_offsets_values(offsets, e, x.size(0));
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();  // the scans read flat arrays
  check_bsr_grouped_indices(crow_c.data_ptr<int32_t>(), e, crow.size(1) - 1, col_c.data_ptr<int32_t>(), nnz,
                            x.size(1) / bk);
}

}  // namespace sparsekern
#endif
