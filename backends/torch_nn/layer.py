"""Torch layers that add AdaLoRA SVD triplets to an existing layer (wrap, don't inherit).

An ``SVDLinear`` holds the original ``nn.Linear`` (or Hugging Face GPT-2
``Conv1D``) as ``base_layer`` and, per adapter name, the trainable triplet
``lora_A (r, in)``, ``lora_E (r, 1)``, ``lora_B (out, r)`` and the frozen
``ranknum (1,)``, in ``nn.ParameterDict``s keyed by adapter name as PEFT does
(state-dict keys ``...lora_A.default``). The forward is

    result = base_layer(x)
    result += (dropout(x) @ (A * E).T) @ B.T * c,    c = scaling / (ranknum + 1e-5)

added in place so ``result`` keeps the base dtype, by :class:`SVDDelta`: two
matmuls on the activations, as LoRA's, with ``E`` folded into the small
``A`` and ``c`` into the matmuls' ``alpha``. With ``exact_peft`` it is the
core's ``triplet.forward`` instead, PEFT's op order, bit-identical to PEFT.
``SVDConv2d`` does the same for ``nn.Conv2d`` with PEFT's SVDConv2d semantics
(``A (r, in_channels * kh * kw)``, the delta weight reshaped to the kernel).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from adalora_core.backends import get_backend
from torch import nn
from torch.nn import functional as F

from adalora_core import triplet
from adalora_core.config import AdaLoraConfig
from adalora_core.random import init_triplet

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def conv1d_class() -> type | None:
    """Hugging Face's GPT-2 ``Conv1D`` if transformers is installed (imported lazily)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is optional
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"conv2d"`` for a layer we can adapt, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def check_supported(name: str, module: nn.Module) -> None:
    """Raise a ValueError saying why ``module`` cannot carry an AdaLoRA triplet."""
    kind = layer_kind(module)
    if kind is None:
        raise ValueError(
            f"target module {name!r} is a {type(module).__name__}, which AdaLoRA cannot adapt; supported "
            "types are torch.nn.Linear, transformers' Conv1D and torch.nn.Conv2d (pick the linear "
            "layers inside it with target_modules)"
        )
    if kind == "conv2d":
        if module.groups != 1:
            raise ValueError(f"target module {name!r} is a Conv2d with groups={module.groups}; only groups=1 "
                             "is supported (the triplet's A has in_channels * kh * kw columns)")
        if module.padding_mode != "zeros":
            raise ValueError(f"target module {name!r} is a Conv2d with padding_mode={module.padding_mode!r}; "
                             "only 'zeros' is supported")
        if isinstance(module.padding, str):
            pass  # 'same' / 'valid' are handed to F.conv2d as they are
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim not in (2, 4):
        raise ValueError(f"target module {name!r} has no 2-d (or conv 4-d) weight")


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off where it is on: :class:`SVDDelta` picks its own dtypes (the adapter's)."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, alpha: float, like: torch.Tensor) -> torch.Tensor:
    """``alpha * (a @ b)`` in one GEMM, no separate scaling pass.

    ``addmm`` with ``beta=0`` ignores its input's values (documented; nothing
    is read or copied), so ``like`` only has to have the result's shape.
    """
    return torch.addmm(like, a, b, beta=0, alpha=alpha)


def _add_product(result: torch.Tensor, t: torch.Tensor, Bt: torch.Tensor, c: float) -> torch.Tensor:
    """``result + c * t @ Bt`` in ``result``'s shape and dtype, in place unless ``result`` is a view.

    In place, the add is fused into the GEMM (``addmm_``) where the dtypes
    agree. A view is not written to (autograd would copy it back into its
    base, twice over the activations): a new tensor is returned instead.
    """
    if result._base is None:
        if result.dtype == t.dtype and result.is_contiguous():
            result.view(-1, result.shape[-1]).addmm_(t, Bt, alpha=c)
        else:
            result.add_(torch.mm(t, Bt).view(result.shape), alpha=c)
        return result
    if result.dtype == t.dtype:
        return torch.addmm(result.reshape(-1, result.shape[-1]), t, Bt, alpha=c).view(result.shape)
    return torch.add(result, torch.mm(t, Bt).view(result.shape), alpha=c, out=torch.empty_like(result))


class SVDDelta(torch.autograd.Function):
    """``result + c * (x @ (A * E).T) @ B.T``, at LoRA's cost in kernels.

    Forward: ``A * E`` (an ``(r, in)`` multiply), ``x @ (A * E).T``, and the
    second matmul with the add and ``c`` fused into it (:func:`_add_product`;
    ``result`` is written in place unless it is a view). Backward: four matmuls
    (``c`` as their ``alpha``), ``dA = dW * E`` and ``dE`` as one batched
    row-dot: PEFT's LoRA issues as many (it scales the activations instead).
    Computes in the adapter's dtype whatever autocast says.
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, E: torch.Tensor,
                B: torch.Tensor, c: float) -> torch.Tensor:
        with _without_autocast(x.device):
            x2 = x.reshape(-1, x.shape[-1])
            w = A * E
            t = torch.mm(x2, w.T)
            out = _add_product(result, t, B.T, c)
        if out is result:
            ctx.mark_dirty(result)
        ctx.save_for_backward(x2, A, E, B, w, t)
        ctx.c, ctx.x_shape = c, x.shape
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, A, E, B, w, t = ctx.saved_tensors
        c = ctx.c
        need_result, need_x, need_A, need_E, need_B, _ = ctx.needs_input_grad
        dx = dA = dE = dB = None
        with _without_autocast(g.device):
            g2 = g.reshape(-1, g.shape[-1]).to(B.dtype)
            if need_B:
                dB = _mm_scaled(g2.T, t, c, like=B)
            if need_x or need_A or need_E:
                dt = _mm_scaled(g2, B, c, like=t)
                if need_x:
                    dx = torch.mm(dt, w).view(ctx.x_shape)
                if need_A or need_E:
                    dw = torch.mm(dt.T, x2)
                    if need_A:
                        dA = dw * E
                    if need_E:  # row-wise dot of dw and A, one batched (1 x in) @ (in x 1)
                        dE = torch.bmm(dw.unsqueeze(1), A.unsqueeze(2)).view(E.shape)
        return (g if need_result else None), dx, dA, dE, dB, None


class SVDLayer(nn.Module):
    """Common part of the SVD-triplet wrappers: the adapters, merge state and trainability."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer: Any = base_layer  # Linear, Conv1D, Conv2d or a quantized linear: attributes differ
        # Registration order as PEFT's (A, B, then E, ranknum): state dicts list keys alike.
        self.lora_A = nn.ParameterDict({})
        self.lora_B = nn.ParameterDict({})
        self.lora_dropout = nn.ModuleDict({})
        self.lora_E = nn.ParameterDict({})
        self.ranknum = nn.ParameterDict({})
        self.r: dict[str, int] = {}
        self.init_r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.exact_peft = False
        self.flat_input = False  # the base layer may be called on x flattened to (N, in)
        self._fold: dict[str, tuple[int, float]] = {}
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------- geometry

    @property
    def in_features(self) -> int:  # the triplet's `in` (A's columns)
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (PEFT's layers expose it too)."""
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    # ------------------------------------------------------------- adapters

    def update_layer(self, adapter_name: str, r: int, config: AdaLoraConfig, *, trainable: bool,
                     autocast_adapter_dtype: bool = True, init_r: int | None = None) -> None:
        """Create (or replace) adapter ``adapter_name`` at rank ``r``.

        The draws follow PEFT's ``update_layer`` on torch's default generator:
        ``A = randn(r, in)``, ``E = randn(r, 1)``, ``B = randn(out, r)``,
        ``ranknum = randn(1)`` filled with ``r``, then (``init_lora_weights``)
        ``E = 0, A ~ N(0, .02), B ~ N(0, .02)``; then a cast to the base
        weight's device and dtype, and back up to float32 for a float16/bfloat16
        base (PEFT's ``autocast_adapter_dtype``), so A and B are rounded
        through the base dtype exactly as PEFT's are. ``ranknum`` is
        ``init_r`` (``r`` unless given): it never changes after pruning.
        """
        rng = get_backend("torch").rng(None)
        dtype = torch.get_default_dtype()
        (A, E, B), ranknum = init_triplet(rng, r, self.in_features, self.out_features, dtype=dtype,
                                          init_lora_weights=config.init_lora_weights)
        if init_r is not None and init_r != r:
            ranknum = torch.full_like(ranknum, float(init_r))
        weight = self.base_layer.weight
        tensors = []
        for t in (A, E, B, ranknum):
            if weight.dtype.is_floating_point:
                t = t.to(weight.device, dtype=weight.dtype)
                if autocast_adapter_dtype and t.dtype in _LOW_PRECISION:
                    t = t.to(torch.float32)
            else:
                t = t.to(weight.device)
            tensors.append(t)
        A, E, B, ranknum = tensors
        self.lora_A[adapter_name] = nn.Parameter(A, requires_grad=trainable)
        self.lora_B[adapter_name] = nn.Parameter(B, requires_grad=trainable)
        self.lora_E[adapter_name] = nn.Parameter(E, requires_grad=trainable)
        self.ranknum[adapter_name] = nn.Parameter(ranknum, requires_grad=False)
        self.lora_dropout[adapter_name] = (nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0
                                           else nn.Identity())
        self.r[adapter_name] = r
        self.init_r[adapter_name] = config.init_r if init_r is None else init_r
        self.scaling[adapter_name] = config.scaling
        rank = r if init_r is None else init_r  # the value ranknum was filled with
        self._fold[adapter_name] = (self.ranknum[adapter_name]._version, config.scaling / (rank + triplet.EPS))

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; unmerge() first")
        for store in (self.lora_A, self.lora_B, self.lora_E, self.ranknum, self.lora_dropout):
            if adapter_name in store:
                del store[adapter_name]
        for d in (self.r, self.init_r, self.scaling, self._fold):
            d.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, names: Sequence[str]) -> None:
        self.active_adapters = list(names)

    def triplet(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]

    # --------------------------------------------------------------- forward

    def _factor(self, name: str) -> float:
        """``scaling / (ranknum + 1e-5)`` as a Python number, for the folded forward.

        Known when the adapter is created (no device read per forward); read
        again from ``ranknum`` only if ``ranknum`` was written since (its
        version counter moved, e.g. ``load_state_dict``).
        """
        ranknum = self.ranknum[name]
        version, c = self._fold[name]
        if version != ranknum._version:
            c = self.scaling[name] / (float(ranknum.detach().reshape(-1)[0]) + triplet.EPS)
            self._fold[name] = (ranknum._version, c)
        return c

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` plus adapter ``name``'s delta on ``x`` (added in place, keeping ``result``'s dtype)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        lead = None
        flat = self.flat_input and not self.exact_peft and not args and not kwargs
        if flat and x.dim() > 2 and x.is_contiguous():
            # an nn.Linear's output on (N, in) is its own tensor, not a view: the delta goes in in place
            lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        result = self.base_layer(x, *args, **kwargs)
        if not self.merged:
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                A = self.lora_A[name]
                xa = x if x.dtype == A.dtype else x.to(A.dtype)
                result = self._add_delta(result, self.lora_dropout[name](xa), name)
        return result if lead is None else result.view(*lead, result.shape[-1])

    # ----------------------------------------------------------------- merge

    def get_delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def to_merge(self, adapter_names: Sequence[str] | None = None) -> list[str]:
        """The adapters :meth:`merge` would merge: the active ones by default, not merged yet."""
        return [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                if n in self.lora_A and n not in self.merged_adapters]

    def merged_weight(self, names: Sequence[str], sign: int = +1) -> torch.Tensor:
        """The base weight with the adapters ``names`` added (``sign=-1``: subtracted); nothing is written.

        Raises a ValueError if the result would hold non-finite values.
        """
        W = self.base_layer.weight.detach()
        with torch.no_grad():
            for name in names:
                W = self._combined(W, name, sign)
        return W

    def commit_merge(self, weight: torch.Tensor, names: Sequence[str]) -> None:
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)
        self.merged_adapters.extend(names)

    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Add the adapters' ``ΔW`` to the base weight (the active adapters by default).

        Raises, with the weight unchanged, if the result would hold non-finite values.
        """
        names = self.to_merge(adapter_names)
        if names:
            self.commit_merge(self.merged_weight(names), names)

    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added, last merged first."""
        if not self.merged:
            warnings.warn("already unmerged; nothing to do", stacklevel=2)
            return
        names = [n for n in reversed(self.merged_adapters) if n in self.lora_A]
        weight = self.merged_weight(names, -1)
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)
        self.merged_adapters.clear()

    def _combined(self, W: torch.Tensor, name: str, sign: int) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.adapter_names())
        return f"adapters=({ranks}), active={self.active_adapters}"


class SVDLinear(SVDLayer):
    """An SVD triplet on an ``nn.Linear`` or GPT-2 ``Conv1D`` (``fan_in_fan_out``: weight is ``(in, out)``)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        kind = layer_kind(base_layer)
        if kind not in ("linear", "conv1d"):
            raise ValueError(f"SVDLinear wraps nn.Linear or Conv1D, not {type(base_layer).__name__}")
        self.fan_in_fan_out = kind == "conv1d"
        self.flat_input = kind == "linear"

    @property
    def in_features(self) -> int:
        # an nn.Linear's own sizes: a bitsandbytes 4-bit Linear's packed weight has another shape
        return int(self.base_layer.weight.shape[0] if self.fan_in_fan_out else self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base_layer.weight.shape[1] if self.fan_in_fan_out else self.base_layer.out_features)

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        if self.exact_peft:
            result += triplet.forward(x, A, E, B, self.scaling[name], self.ranknum[name])
            return result
        return SVDDelta.apply(result, x, A, E, B, self._factor(name))

    def get_delta_weight(self, name: str) -> torch.Tensor:
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        return triplet.delta_weight(A, E, B, self.scaling[name], self.ranknum[name], self.fan_in_fan_out)

    def _combined(self, W: torch.Tensor, name: str, sign: int) -> torch.Tensor:
        args = (*(t.detach() for t in self.triplet(name)), self.scaling[name], self.ranknum[name].detach(),
                self.fan_in_fan_out)
        return triplet.merge(W, *args) if sign > 0 else triplet.unmerge(W, *args)


class SVDConv2d(SVDLayer):
    """An SVD triplet on an ``nn.Conv2d`` (PEFT's SVDConv2d): ``ΔW = (B (A ⊙ E)).reshape(kernel)``."""

    def __init__(self, base_layer: nn.Module) -> None:
        check_supported(type(base_layer).__name__, base_layer)
        super().__init__(base_layer)
        self.fan_in_fan_out = False

    @property
    def in_features(self) -> int:
        b = self.base_layer
        return int(b.in_channels * b.kernel_size[0] * b.kernel_size[1])

    @property
    def out_features(self) -> int:
        return int(self.base_layer.out_channels)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        shape = self.base_layer.weight.shape
        if self.exact_peft:
            return triplet.delta_weight(A, E, B, self.scaling[name], self.ranknum[name]).reshape(shape)
        return (B @ (A * (E * self._factor(name)))).reshape(shape)

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        b = self.base_layer
        result += F.conv2d(x, self.get_delta_weight(name), stride=b.stride, padding=b.padding,
                           dilation=b.dilation, groups=b.groups)
        return result

    def _combined(self, W: torch.Tensor, name: str, sign: int) -> torch.Tensor:
        flat = W.reshape(W.shape[0], -1)
        args = (*(t.detach() for t in self.triplet(name)), self.scaling[name], self.ranknum[name].detach())
        new = triplet.merge(flat, *args) if sign > 0 else triplet.unmerge(flat, *args)
        return new.reshape(W.shape)


def wrap(module: nn.Module) -> SVDLayer:
    """The right SVD wrapper for ``module`` (already checked with :func:`check_supported`)."""
    return SVDConv2d(module) if layer_kind(module) == "conv2d" else SVDLinear(module)
