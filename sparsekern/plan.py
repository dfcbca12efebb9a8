"""Plans: the backend and per-weight state of one linear weight, chosen once per row bucket.

``dispatch.plan(op, *args)`` (:func:`make`) runs every argument check, asks the dispatcher which
backend runs ``args`` and lets that backend build what it keeps per weight (the dense fallback's
decompressed copy). The result, a :class:`Plan`, is called with the op's arguments and runs that
backend with only x's last dimension checked per call, plus the NaN/Inf policy: rows holding
NaN/Inf are recomputed with dense semantics unless the backend is ``nonfinite_exact``.

The public linears (``sparsekern.ops``) and ``SparseLinear`` both call plans through
:func:`linear`: eager calls run the plan, calls needing gradients get one autograd node whose
backward is the op's own formula, and ``torch.compile``, tracing and tensor subclasses take
``torch.ops.sparsekern.*`` (whose implementation runs plans too). Nobody else picks a backend.

A weight's plans (:class:`Plans`, one per (row bucket, dtype, device, K)) are re-made, and the
stale ones dropped, when the weight changes (identity, storage, version or dtype of its tensors,
the bias's identity) or :func:`dispatch.state` does (a forced backend, ``SPARSEKERN_BACKEND`` /
``SPARSEKERN_DISPATCH``, a new registration or stored choice). Inference tensors carry no version:
for those nothing is kept per weight and the checks that read the weight run on every call. ``SparseLinear`` holds its own;
the op keeps one per weight here, weakly keyed on the weight's values / blocks tensor.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sparsekern import dispatch


@dataclass(frozen=True)
class LinearOp:
    """What a plan needs of one linear op; ``sparsekern.ops`` fills :data:`LINEARS`."""

    name: str
    op: Callable  # torch.ops.sparsekern.<name>: the path for compile, tracing and subclasses
    check: Callable  # (x, *weight args): every argument check, raising ValueError/TypeError
    recheck: Callable | None  # (x2, *weight args): the checks that read the weight (BSR indices)
    reference: Callable  # the op with dense semantics, for rows holding NaN/Inf
    backward: Callable  # the op's backward(ctx, grad); ctx has .args and .needs_input_grad
    param: int  # index among the weight args of the floating weight (values / blocks)
    tensors: int  # leading weight args that are tensors (stamped)
    bias: int  # index among the weight args of the bias; tensors after it (scales, zeros) are stamped too


LINEARS: dict[str, LinearOp] = {}
# (op, backend) -> hook called once per weight when a plan picks that backend, with the op's
# arguments: returns ``(fn, held)``, fn with the op's signature holding what the backend keeps per
# weight (the dense fallback's decompressed copy), held the tensors it keeps alive.
_HOOKS: dict[tuple[str, str], Callable] = {}


def register_hook(op: str, backend: str, hook: Callable) -> None:
    """Let ``backend`` build per-weight state for ``op``'s plans (see :data:`_HOOKS`)."""
    _HOOKS[(op, backend)] = hook


# -- NaN/Inf policy ------------------------------------------------------------------------------


def all_finite(x: torch.Tensor) -> bool:
    """True when no element of ``x`` is NaN/Inf; may say False for finite values whose sum
    overflows (callers then take their exact path, so that costs time, never correctness).

    NOTE: one sum is ~2.5 us per decode call against ~13 us for isfinite/all/any; the dtype
    argument (for half types, whose sums overflow at 65504) alone costs ~1 us, so fp32 skips it.
    """
    s = x.sum() if x.dtype == torch.float32 else x.sum(dtype=torch.float32)
    return math.isfinite(s.item())


def propagate_nonfinite(out: torch.Tensor, x2: torch.Tensor, dense_rows: Callable) -> torch.Tensor:
    """Sparse kernels skip pruned weights, but the dense op computes 0 * inf = nan: rows of x
    holding NaN/Inf are recomputed densely so they propagate exactly as in ``F.linear``."""
    if out.numel() == 0 or all_finite(x2):
        return out
    bad = ~torch.isfinite(x2).all(dim=1)
    if bad.any():
        out[bad] = dense_rows(x2[bad])
    return out


# -- one plan ------------------------------------------------------------------------------------


class Plan:
    """``op`` on one weight, for x of one row bucket, dtype, device and K: call it with the op's
    arguments. ``backend`` says which backend runs; ``held`` the tensors it keeps alive."""

    __slots__ = ("op", "backend", "run", "k", "exact", "held", "state", "stamp", "__weakref__")

    def __init__(self, op: LinearOp, backend: str, run: Callable, k: int, exact: bool, held: tuple) -> None:
        self.op, self.backend, self.run, self.k, self.exact, self.held = op, backend, run, k, exact, held
        # What a cached plan was made under (set by run()): dispatch.state() and the weight stamp.
        self.state = self.stamp = None

    def __call__(self, x: torch.Tensor, *args) -> torch.Tensor:
        return _call(self, x, args)

    def __repr__(self) -> str:
        return f"Plan({self.op.name}, backend={self.backend!r}, k={self.k})"


def _call(p: Plan, x: torch.Tensor, args: tuple) -> torch.Tensor:
    # NOTE: a plain function: the hot path calling it instead of Plan.__call__ saves ~1 us a call.
    shape = x.shape
    if not shape or shape[-1] != p.k:
        raise ValueError(f"x: expected last dimension {p.k} (in_features), got shape {tuple(shape)}")
    x2 = x if len(shape) == 2 else x.reshape(-1, p.k)
    out = p.run(x2, *args)
    if not p.exact:
        out = propagate_nonfinite(out, x2, lambda rows: p.op.reference(rows, *args))
    return out if len(shape) == 2 else out.reshape(*shape[:-1], out.shape[-1])


# Every plan alive, for :func:`dense_copy_bytes`.
_live: weakref.WeakSet[Plan] = weakref.WeakSet()


def _untracked(args, op: LinearOp) -> bool:
    weight = (*args[: op.tensors], *args[op.bias + 1 :])  # bias excluded: it is stamped by identity
    return any(t.is_inference() for t in weight if isinstance(t, torch.Tensor))


def make(name: str, args: tuple, dense: bool = True) -> Plan:
    """The plan for ``args`` (the op's arguments, x first). Every check runs here, before the
    dispatcher times anything. ``dense=False``: no backend that keeps a dense copy of the weight
    (:func:`select_without_dense`)."""
    op = LINEARS[name]
    x, wargs = args[0], args[1:]
    op.check(*args)
    x2 = x.reshape(-1, x.shape[-1])
    if op.recheck is not None:
        op.recheck(x2, *wargs)
    chosen = dispatch.select(name, x2, *wargs) if dense else select_without_dense(name, (x2, *wargs))
    # The registered Impl, not a per-call wrapper the dispatcher may have handed out.
    impl = dispatch.implementations(name).get(chosen.backend, chosen)
    run, held = impl.fn, ()
    if _untracked(wargs, op):
        # Inference tensors carry no version: an in-place write could not be seen, so nothing is
        # kept per weight and the checks that read the weight run on every call.
        if op.recheck is not None:
            fn, recheck = impl.fn, op.recheck

            def run(x2, *a):
                recheck(x2, *a)
                return fn(x2, *a)

    elif (name, impl.backend) in _HOOKS:
        run, held = _HOOKS[(name, impl.backend)](x2, *wargs)
    # Under measured auto dispatch, 1 call in dispatch.SAMPLE_EVERY is timed against the stored
    # figure: a choice that drifted (made on a busy moment) is measured again, and the new
    # choice bumps dispatch.state(), which re-makes this plan.
    run = dispatch.probe(name, (x2, *wargs), impl, run)
    p = Plan(op, impl.backend, run, int(x.shape[-1]), impl.nonfinite_exact, tuple(held))
    _live.add(p)
    return p


def select_without_dense(name: str, args: tuple) -> dispatch.Impl:
    """:func:`dispatch.select` for a weight that may not have a dense copy: ``"dense"`` is no
    candidate, and among the sparse kernels the first (policy ``first``, or only one) or the
    fastest on ``args`` wins; the reference (no copy: it decompresses per call) only when no
    sparse kernel can run them. Forcing ``"dense"`` is an error."""
    forced = dispatch.current_backend()
    if forced == "dense":
        raise ValueError(
            "backend: 'dense' keeps a dense copy of the weight; this one was made with dense_fallback=False"
        )
    if forced != "auto":
        return dispatch.select(name, *args)
    found = [i for i in dispatch.candidates(name, *args) if i.backend != "dense"]
    sparse = [i for i in found if i.backend != "reference"]
    if not sparse:
        if not found:
            raise RuntimeError(f"sparsekern: no backend but 'dense' can run {name} on these inputs")
        return found[0]
    if len(sparse) == 1 or dispatch.policy() == "first":
        return sparse[0]
    times = dispatch.time_impls(sparse, args)
    return next(i for i in sparse if i.backend == min(times, key=times.get)) if times else sparse[0]


# -- a weight's plans ----------------------------------------------------------------------------


class Plans:
    """The plans of one weight by (row bucket, dtype, device, K). ``dense``: whether a plan may
    keep a dense copy of the weight."""

    __slots__ = ("by_key", "dense", "__weakref__")

    def __init__(self, dense: bool = True) -> None:
        self.by_key: dict[tuple, Plan] = {}
        self.dense = dense

    def __len__(self) -> int:
        return len(self.by_key)

    def values(self):
        return self.by_key.values()


_BUCKETS: dict[int, str] = {}


def _bucket(rows: int) -> str:
    b = _BUCKETS.get(rows)
    if b is None:
        b = dispatch.row_bucket(rows)
        if rows <= 4096:
            _BUCKETS[rows] = b
    return b


def _stamp(args: tuple, n: int, p: int, bi: int) -> tuple:
    """Identity, data pointer and version of each weight tensor, the dtype of the floating one
    (``.data`` swapped for a view of another dtype keeps the pointer), the bias's identity and,
    for a quantized weight, its scales and zeros."""
    # NOTE: written out, not a generator, since this runs on every call (a generator expression
    # costs ~1 us more).
    a, b = args[0], args[1]
    try:
        if n == 2:
            st = (id(a), a.data_ptr(), a._version, id(b), b.data_ptr(), b._version, args[p].dtype, id(args[bi]))
        else:
            c = args[2]
            st = (
                id(a), a.data_ptr(), a._version, id(b), b.data_ptr(), b._version,
                id(c), c.data_ptr(), c._version, args[p].dtype, id(args[bi]),
            )  # fmt: skip
        if len(args) > bi + 1 and args[bi + 1] is not None:  # quantized: scales, zeros, N:M's group and act_block
            sc, z = args[bi + 1], args[bi + 2]
            st += (id(sc), sc.data_ptr(), sc._version, sc.dtype, id(z), *args[bi + 3 :])
            if z is not None:
                st += (z.data_ptr(), z._version)
        return st
    except RuntimeError:  # inference tensors carry no version counter
        return tuple(
            (id(t), t.data_ptr(), t.dtype, -1 if t.is_inference() else t._version) if isinstance(t, torch.Tensor) else t
            for t in (*args[:n], *args[bi:])
        )
    except AttributeError:  # not tensors: make() says what is wrong
        return (object(),)


def run(op: LinearOp, x: torch.Tensor, args: tuple, plans: Plans) -> torch.Tensor:
    """``op(x, *args)`` through the plan for x's bucket, made first if there is none."""
    shape = x.shape
    nd = len(shape)
    rows = shape[0] if nd == 2 else (math.prod(shape[:-1]) if nd else 0)
    key = (_BUCKETS.get(rows) or _bucket(rows), x.dtype, x.device, shape[-1] if nd else -1)
    state, stamp = dispatch.state(), _stamp(args, op.tensors, op.param, op.bias)
    p = plans.by_key.get(key)
    # Each plan carries what it was made under: a thread whose use_backend differs never runs
    # another thread's plan.
    if p is None or p.state != state or p.stamp != stamp:
        if p is not None:
            plans.by_key.clear()  # the weight or the state changed: the other buckets' plans are stale too
        p = make(op.name, (x, *args), plans.dense)
        p.state, p.stamp = state, stamp
        plans.by_key[key] = p
    return _call(p, x, args)


# id(values or blocks tensor) -> (weakref to it, its plans): the op's plans, per weight.
_by_weight: dict[int, tuple[weakref.ref, Plans]] = {}
# Weights whose plans may keep no dense copy (SparseLinear(dense_fallback=False)).
_no_dense: WeakIdKeyDictionary = WeakIdKeyDictionary()


def plans_for(key: torch.Tensor) -> Plans:
    """The op's plans for the weight whose values / blocks tensor is ``key``; they die with it."""
    kid = id(key)
    hit = _by_weight.get(kid)
    if hit is not None and hit[0]() is key:
        return hit[1]
    plans = Plans(dense=key not in _no_dense)

    def drop(ref, kid=kid):
        if _by_weight.get(kid, (None,))[0] is ref:
            del _by_weight[kid]

    _by_weight[kid] = (weakref.ref(key, drop), plans)
    return plans


def set_dense_fallback(key: torch.Tensor, allowed: bool) -> None:
    """Whether the op's plans for the weight whose values / blocks tensor is ``key`` may keep a
    dense copy; its plans made so far are dropped."""
    if allowed:
        _no_dense.pop(key, None)
    else:
        _no_dense[key] = True
    _by_weight.pop(id(key), None)


def dense_allowed(key: torch.Tensor) -> bool:
    """Whether backends may keep a dense copy of the weight whose values tensor is ``key``."""
    return key not in _no_dense


def dense_copy_bytes() -> int:
    """Bytes of the tensors live plans keep per weight (dense copies), each storage counted once."""
    seen: dict[int, int] = {}
    for p in list(_live):
        for t in p.held:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# -- the call path of the public linears and SparseLinear ----------------------------------------


class _Autograd(torch.autograd.Function):
    """A planned call with gradients: forward runs the plan, backward is the op's own formula.

    Only x, the floating weight and the bias are inputs of the node. NOTE: every argument of
    ``apply`` costs ~1 us of functorch unwrapping: the rest travels as one tuple.
    """

    @staticmethod
    def forward(ctx, x, p, bias, call):
        op, args, plans = call
        ctx.save_for_backward(x, p, bias)
        ctx.op, ctx.args = op, args
        return run(op, x, args, plans)

    @staticmethod
    def backward(ctx, grad):
        x, p, bias = ctx.saved_tensors
        op = ctx.op
        args = list(ctx.args)
        args[op.param], args[op.bias] = p, bias
        need = [False] * (len(args) + 1)
        need[0], need[1 + op.param], need[1 + op.bias] = ctx.needs_input_grad[:3]
        grads = op.backward(SimpleNamespace(args=(x, *args), needs_input_grad=tuple(need)), grad)
        return grads[0], grads[1 + op.param], grads[1 + op.bias], None


def linear(op: LinearOp, x, args: tuple, plans: Plans | None = None) -> torch.Tensor:
    """``op(x, *args)``: eager calls through ``plans`` (default: the op's, :func:`plans_for`);
    compile, tracing and tensor subclasses take the op."""
    if type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return op.op(x, *args)
    if plans is None:
        plans = plans_for(args[op.param])
    if torch.is_grad_enabled():
        p, bias = args[op.param], args[op.bias]
        if x.requires_grad or getattr(p, "requires_grad", False) or getattr(bias, "requires_grad", False):
            return _Autograd.apply(x, p, bias, (op, args, plans))
    return run(op, x, args, plans)
