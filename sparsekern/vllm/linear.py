"""``SparsekernLinearMethod``: a vLLM linear layer whose weight is N:M or block-sparse.

vLLM builds the layer (column / row parallel, fused ``qkv_proj`` / ``gate_up_proj``,
replicated) and calls :meth:`create_weights`; its model loader then feeds the checkpoint's
tensors, named as the HF layers they came from (``q_proj.values`` arrives at ``qkv_proj``
with shard id ``"q"``), to the parameters' weight loaders; :meth:`process_weights_after_loading`
checks what arrived; :meth:`apply` computes. The computing is sparsekern's: a
:class:`~sparsekern.nn.linear.SparseLinear` over the loaded tensors, so vLLM and transformers
run the same kernels with the same dispatch (``torch.ops.sparsekern.*``).

Tensor parallelism:

- N:M: ``values [out, K*n/m]`` and ``meta [out, words]`` are vLLM ``ModelWeightParameter``s;
  vLLM's loaders cut their rows (column parallel, fused shards) and their columns (row parallel)
  as for a dense weight. A row-parallel cut must fall between groups (``K/tp`` a multiple of
  ``m``); ``meta`` is re-packed on the cut, since a word may hold indices of both sides.
- BSR: see :mod:`sparsekern.vllm.bsr_shard` (block count depends on the data). Quantized blocks'
  ``scales`` / ``zeros`` (``[nnz, bm, groups]``) are cut with their blocks.

A split that would cut an N:M group or a block is refused when the layer is built.
"""

from __future__ import annotations

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import ChannelQuantScaleParameter, GroupQuantScaleParameter, ModelWeightParameter
from vllm.model_executor.utils import set_weight_attrs

from sparsekern.formats.bsr import BlockSparseWeight, check_block, check_group_size
from sparsekern.formats.nm import NMSparseWeight, check_nm, meta_words, pack_meta, unpack_meta
from sparsekern.hugepages import rehome
from sparsekern.nn.linear import SparseLinear
from sparsekern.vllm import bsr_shard

_QKV = {"q": 0, "k": 1, "v": 2}
_INDEX = ("meta", "crow_indices", "col_indices")


def rehome_params(layer: torch.nn.Module, names) -> None:
    """Moves the layer's ``names`` parameters to 2 MiB pages (values unchanged), as ``sparsify``
    does: vLLM allocated them on 4 KiB pages, and decode streams them every token."""
    for name in names:
        param = getattr(layer, name)
        param.data = rehome(param.data)


def expect_tensor(
    tensor: str, got: torch.Tensor, want: list[int | None], dtype_ok: bool, where: str, dtype=None
) -> None:
    """A checkpoint tensor as its layer's ``quantization_config`` entry needs it (``None`` in
    ``want``: any length, e.g. a BSR weight's block count; ``dtype`` names the one wanted), else a
    ValueError naming it (``where``), its shape and dtype, and what was needed."""
    if got.dim() != len(want) or any(w is not None and g != w for g, w in zip(got.shape, want)) or not dtype_ok:
        shape = [("nnz" if w is None else w) for w in want]
        dtype = str(dtype).removeprefix("torch.") if dtype else "int32" if tensor in _INDEX else "a float dtype"
        raise ValueError(
            f"checkpoint tensor {where}: shape {list(got.shape)} dtype {got.dtype}; the layer's "
            f"quantization_config entry needs shape {shape}, {dtype}"
        )


class MetaParameter(ModelWeightParameter):
    """Packed N:M ``meta``: rows split like a dense weight; a split of K re-packs the words."""

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        if self.tp_size == 1:
            return super().load_row_parallel_weight(loaded_weight)
        kept = self.kept  # per rank; set by create_weights
        idx = unpack_meta(loaded_weight, self.m, kept * self.tp_size)
        part = pack_meta(idx[:, self.tp_rank * kept : (self.tp_rank + 1) * kept], self.m)
        assert self.data.shape == part.shape  # the loader checked loaded_weight's shape
        self.data.copy_(part)


@register_weight_loader_v2_supported_method
class SparsekernLinearMethod(LinearMethodBase):
    """One per sparse vLLM layer: ``names`` are the checkpoint layers fused into it, ``entries``
    their ``quantization_config.layers`` entries (one pattern, checked by the config)."""

    def __init__(self, prefix: str, names: list[str], entries: list[dict]) -> None:
        self.prefix, self.names, self.entries = prefix, names, entries
        first = entries[0]
        self.kind = first["kind"]
        self.in_features = first["in_features"]
        self._loaded: dict[str, list[int]] = {}
        self._pending: dict = {}  # BSR: tensors of a shard until all arrived
        self._pieces: list[tuple] = []  # BSR: this rank's blocks of each shard
        self._linear: SparseLinear | None = None
        self._bias = None
        self.quant, self.group_size, self.act_block, self.zeros = None, 0, 0, False  # set by create_weights
        self._quant_tensors: tuple = ()

    # -- building ----------------------------------------------------------------------------

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        loader = extra_weight_attrs.pop("weight_loader")
        for name, e in zip(self.names, self.entries):
            if e["in_features"] != input_size:
                raise ValueError(
                    f"quantization_config.layers[{name!r}].in_features: {e['in_features']}, but vLLM's "
                    f"{self.prefix} takes {input_size} inputs"
                )
        if len(self.names) == 1 and self.entries[0]["out_features"] != output_size:
            raise ValueError(
                f"quantization_config.layers[{self.names[0]!r}].out_features: {self.entries[0]['out_features']}, "
                f"but vLLM's {self.prefix} has {output_size} outputs"
            )
        rows, k = sum(output_partition_sizes), input_size_per_partition
        self._local = (rows, k)  # this rank's share (ReplicatedLinear has no *_per_partition fields)
        tp = f"{input_size} inputs split {input_size // max(k, 1)} ways" if k != input_size else f"{k} inputs"
        if self.kind == "nm":
            self.n, self.m = self.entries[0]["n"], self.entries[0]["m"]
            self._wrap(check_nm, self.n, self.m)
            if k % self.m:
                raise ValueError(
                    f"{self.prefix}: {self.n}:{self.m} groups of {self.m} inputs would straddle a shard boundary "
                    f"({tp}: {k} per rank); use a tensor-parallel size that divides {input_size // self.m} groups"
                )
            kept = k // self.m * self.n
            self._quant_args(k, kept, tp)
            cols, vdtype = self._values_layout(kept, params_dtype)
            values = ModelWeightParameter(
                data=torch.empty(rows, cols, dtype=vdtype),
                input_dim=1,
                output_dim=0,
                weight_loader=self._checked(loader, "values"),
            )
            meta = MetaParameter(
                data=torch.empty(rows, meta_words(kept, self.m), dtype=torch.int32),
                input_dim=1,
                output_dim=0,
                weight_loader=self._checked(loader, "meta"),
            )
            meta.m, meta.kept = self.m, kept
            params = {"values": values, "meta": meta}
            if self.quant:
                params.update(self._quant_params(rows, k, params_dtype, loader))
        else:
            self.bm, self.bk = self._wrap(check_block, tuple(self.entries[0]["block"]))
            bad = [s for s in output_partition_sizes if s % self.bm]
            if k % self.bk or bad:
                raise ValueError(
                    f"{self.prefix}: {self.bm}x{self.bk} blocks would straddle a shard boundary ({tp}: {k} per "
                    f"rank; output rows per rank and shard {output_partition_sizes}); each must be a multiple of "
                    "the block side"
                )
            self._loader = loader
            self._block_quant_args()
            cols, bdtype = self._values_layout(self.bk, params_dtype)
            params = {
                "crow_indices": torch.zeros(rows // self.bm + 1, dtype=torch.int32),
                "col_indices": torch.zeros(0, dtype=torch.int32),
                "blocks": torch.zeros(0, self.bm, cols, dtype=bdtype),
            }
            if self.quant:  # per block: [nnz, bm, groups]; whole blocks land on a rank, so their groups too
                params["scales"] = torch.zeros(0, self.bm, self._block_groups(), dtype=params_dtype)
                if self.zeros:
                    params["zeros"] = torch.zeros(0, self.bm, self._block_groups(), dtype=torch.int8)
            params = {t: Parameter(d, requires_grad=False) for t, d in params.items()}
            for t, p in params.items():
                set_weight_attrs(p, {"weight_loader": self._stash_loader(layer, t)})
        for t, p in params.items():
            layer.register_parameter(t, p)
            set_weight_attrs(p, extra_weight_attrs)

    # -- quantized values (int8 / int4 N:M values or blocks, with scales, optional zero points) ----

    def _read_quant(self) -> None:
        """The entry's quantization (``quant`` None: float values or blocks)."""
        e = self.entries[0]
        self.quant = e.get("quant")
        self.group_size, self.act_block = (e.get("group_size", 0), e.get("act_block", 0)) if self.quant else (0, 0)
        self.zeros = bool(e.get("zeros")) if self.quant else False

    def _quant_args(self, k: int, kept: int, tp: str) -> None:
        """:meth:`_read_quant`, checked against this rank's share of the inputs: a scale group, an
        int4 byte or an x block never straddles a shard."""
        self._read_quant()
        for size, what in ((self.group_size, "scale groups"), (self.act_block, "int8-activation blocks")):
            if size and k % size:
                raise ValueError(
                    f"{self.prefix}: {what} of {size} inputs would straddle a shard boundary ({tp}: {k} per rank); "
                    f"use a tensor-parallel size that divides {self.in_features // size} groups"
                )
        if self.quant == "int4" and kept % 2:
            raise ValueError(
                f"{self.prefix}: int4 values are packed two to a byte; {kept} kept weights per rank ({tp}) "
                "would split a byte"
            )

    def _block_quant_args(self) -> None:
        """:meth:`_read_quant` for blocks, with the scale group checked against the block width: a
        group lies inside a block, so any split that keeps blocks whole keeps the groups whole."""
        self._read_quant()
        if self.quant:
            self._wrap(check_group_size, self.group_size, self.bk)

    def _block_groups(self) -> int:
        """Scale groups per row of a quantized block (``scales`` / ``zeros``: ``[nnz, bm, groups]``)."""
        return self.bk // self.group_size if self.group_size else 1

    def _values_layout(self, kept: int, params_dtype: torch.dtype | None) -> tuple[int, torch.dtype | None]:
        """Columns and dtype of ``kept`` stored weights of a row (N:M values, or a block's row):
        int8 one per byte, int4 two per byte, float values in ``params_dtype``."""
        if self.quant == "int8":
            return kept, torch.int8
        if self.quant == "int4":
            return kept // 2, torch.uint8
        return kept, params_dtype

    def _quant_params(self, rows: int, k: int, params_dtype: torch.dtype, loader) -> dict:
        """``scales [rows, groups]`` (per row: one column, whole on every row-parallel rank) and
        ``zeros`` (int8, same shape) where the checkpoint has them."""
        groups = k // self.group_size if self.group_size else 1

        def param(tensor: str, dtype: torch.dtype):
            data = torch.empty(rows, groups, dtype=dtype)
            kw = {"data": data, "output_dim": 0, "weight_loader": self._checked(loader, tensor)}
            return GroupQuantScaleParameter(input_dim=1, **kw) if self.group_size else ChannelQuantScaleParameter(**kw)

        params = {"scales": param("scales", params_dtype)}
        if self.zeros:
            params["zeros"] = param("zeros", torch.int8)
        return params

    def _wrap(self, fn, *args):
        try:
            return fn(*args)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"quantization_config.layers[{self.names[0]!r}]: {exc}") from None

    # -- loading -----------------------------------------------------------------------------

    def _parts(self, shard: tuple) -> list[int]:
        """Indices into ``names`` of the checkpoint layers a load with shard id ``shard`` carries."""
        sid = shard[0] if shard else None
        if sid is None:
            return list(range(len(self.names)))  # unfused, or fused on disk
        idx = [_QKV.get(sid, sid)] if not isinstance(sid, tuple) else list(sid)
        if len(self.names) == 1 or not all(isinstance(i, int) and 0 <= i < len(self.names) for i in idx):
            raise ValueError(f"{self.prefix}: shard id {sid!r} does not name one of {self.names}")
        return idx

    def _name(self, parts: list[int]) -> str:
        """The checkpoint layer a load carries (vLLM's name when several arrive fused)."""
        return self.names[parts[0]] if len(parts) == 1 else self.prefix

    def _where(self, parts: list[int], tensor: str) -> str:
        return f"{self._name(parts)}.{tensor}"

    def _record(self, tensor: str, parts: list[int], where: str) -> None:
        seen = self._loaded.setdefault(tensor, [])
        if set(seen) & set(parts):
            raise ValueError(f"checkpoint tensor {where} arrived twice")
        seen.extend(parts)

    def _checked(self, loader, tensor: str):
        """``loader`` (vLLM's, for this layer) after checking the checkpoint tensor's shape."""

        def load(param, loaded_weight: torch.Tensor, *shard) -> None:
            parts = self._parts(shard)
            where = self._where(parts, tensor)
            out = sum(self.entries[i]["out_features"] for i in parts)
            kept = self.in_features // self.m * self.n
            groups = self.in_features // self.group_size if self.group_size else 1
            cols, vdtype = self._values_layout(kept, None)  # None: any float dtype
            want, dtype = {
                "values": ([out, cols], vdtype),
                "meta": ([out, meta_words(kept, self.m)], torch.int32),
                "scales": ([out, groups], None),
                "zeros": ([out, groups], torch.int8),
            }[tensor]
            ok = loaded_weight.dtype == dtype if dtype else loaded_weight.is_floating_point()
            expect_tensor(tensor, loaded_weight, want, ok, where, dtype)
            self._record(tensor, parts, where)
            loader(param, loaded_weight, *shard)

        return load

    def _stash_loader(self, layer: torch.nn.Module, tensor: str):
        """BSR: keep each shard's tensors until all have arrived, then cut this rank's share."""

        def load(param, loaded_weight: torch.Tensor, *shard) -> None:
            parts = self._parts(shard)
            where = self._where(parts, tensor)
            self._record(tensor, parts, where)
            got = self._pending.setdefault(tuple(parts), {"shard": shard})
            got[tensor] = loaded_weight
            if len(got) == 1 + len(self._tensors()):
                del self._pending[tuple(parts)]
                self._pieces.append(self._cut(layer, parts, got))

        return load

    def _cut(self, layer: torch.nn.Module, parts: list[int], got: dict) -> tuple:
        out = sum(self.entries[i]["out_features"] for i in parts)
        crow, col, blocks = got["crow_indices"], got["col_indices"], got["blocks"]
        nnz = blocks.shape[0] if blocks.dim() else -1
        expect_tensor(
            "crow_indices", crow, [out // self.bm + 1], crow.dtype == torch.int32, self._where(parts, "crow_indices")
        )
        expect_tensor("col_indices", col, [nnz], col.dtype == torch.int32, self._where(parts, "col_indices"))
        bm = self.bm
        cols, dtype = self._values_layout(self.bk, None)  # None: any float dtype
        ok = blocks.dtype == dtype if dtype else blocks.is_floating_point()
        expect_tensor("blocks", blocks, [None, bm, cols], ok, self._where(parts, "blocks"), dtype)
        quant = ()
        if self.quant:
            groups = self._block_groups()
            scales, zeros = got["scales"], got.get("zeros")
            where = self._where(parts, "scales")
            expect_tensor("scales", scales, [nnz, bm, groups], scales.is_floating_point(), where)
            if zeros is not None:
                where = self._where(parts, "zeros")
                expect_tensor("zeros", zeros, [nnz, bm, groups], zeros.dtype == torch.int8, where, torch.int8)
            quant = (scales, zeros)
        where = self._name(parts)
        if out % self.bm:
            raise ValueError(f"{where}: {out} rows are not a whole number of {self.bm}-row blocks")
        try:
            full = BlockSparseWeight(crow, col, blocks, (out, self.in_features), *quant).validate()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"checkpoint layer {where}: {exc}") from None
        row_map, col_map = bsr_shard.probe(layer, self._loader, got["shard"], self._local, (out, self.in_features))
        return bsr_shard.select(full, row_map, col_map, where)

    def _tensors(self) -> tuple[str, ...]:
        """The checkpoint tensors of each layer this method loads."""
        tensors = ("values", "meta") if self.kind == "nm" else ("crow_indices", "col_indices", "blocks")
        if self.quant:
            tensors += ("scales", "zeros") if self.zeros else ("scales",)
        return tensors

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        tensors = self._tensors()
        for t in tensors:
            missing = [self.names[i] for i in range(len(self.names)) if i not in self._loaded.get(t, [])]
            if missing:
                raise ValueError(f"checkpoint: tensors {[f'{n}.{t}' for n in missing]} are missing ({self.prefix})")
        rows, k = self._local
        if self.kind == "nm":
            rehome_params(layer, tensors)
            self._quant_tensors = ()  # the op's trailing quantization arguments (apply passes them)
            if self.quant:
                zeros = layer.zeros.data if self.zeros else None
                self._quant_tensors = (layer.scales.data, zeros, self.group_size, self.act_block)
            weight = NMSparseWeight(layer.values.data, layer.meta.data, self.n, self.m, (rows, k), *self._quant_tensors)
        else:
            crow, col, per_block = bsr_shard.assemble(self._pieces, rows // self.bm, k // self.bk, self.prefix)
            self._pieces = []
            layer.crow_indices.data, layer.col_indices.data = crow, col
            for t, data in zip(tensors[2:], per_block):  # blocks, then scales and zeros when quantized
                getattr(layer, t).data = data.to(getattr(layer, t).dtype)
            rehome_params(layer, tensors)
            self._quant_tensors = ()
            if self.quant:
                self._quant_tensors = (layer.scales.data, layer.zeros.data if self.zeros else None)
            blocks = (layer.crow_indices.data, layer.col_indices.data, layer.blocks.data)
            weight = BlockSparseWeight(*blocks, (rows, k), *self._quant_tensors)
        try:
            weight.validate()
        except ValueError as exc:
            raise ValueError(f"checkpoint layer(s) {self.names}: {exc}") from None
        bias = getattr(layer, "bias", None)
        self._bias = None if bias is None or getattr(layer, "skip_bias_add", False) else bias
        # The SparseLinear shares the layer's tensors (no copy); it is this method's, not a
        # submodule, so vLLM sees only the parameters it loaded.
        self._linear = SparseLinear(weight, self._bias)

    # -- computing ---------------------------------------------------------------------------

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is self._bias:
            return self._linear(x)
        # Row-parallel ranks > 0 and skip_bias_add layers pass no bias: the op, with the bias asked for.
        if self.kind == "nm":
            return torch.ops.sparsekern.nm_linear(
                x, layer.values, layer.meta, self.n, self.m, bias, *self._quant_tensors
            )
        return torch.ops.sparsekern.bsr_linear(
            x, layer.crow_indices, layer.col_indices, layer.blocks, bias, *self._quant_tensors
        )
