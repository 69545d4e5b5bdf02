"""Several LoRA adapters for one base, served side by side: each row of a batch uses its own
adapter, or none (S-LoRA / Punica's idea, in plain PyTorch).

Every targeted `nn.Linear` becomes a `MultiLoraLinear` holding the adapters' matrices stacked,
A as [slots + 1, in, r_max] and B as [slots + 1, r_max, out] (ranks zero-padded to the largest,
the scaling folded into B, the last slot all zeros for rows without an adapter). Before a forward
pass the caller sets each row's slot (`MultiLora.set_rows`, -1 = the base); each layer then adds
its rows' low-rank updates with two batched matrix products over the gathered matrices:

    y[b] = W x[b] + bias + x[b] A[slot b] B[slot b]

which equals running each row on the base with its adapter alone. The gathered matrices are kept
until the rows change, so a decoding step whose batch is unchanged gathers nothing. Adapters come
and go at run time (`install`, `remove`); a slot freed by `remove` is reused.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import InputError
from lmstack.models.lora import adapter_updates, lora_modules


class _Rows:
    """Each row's slot index into the stacks (the base's zero slot for -1), shared by every layer,
    with a version that tells the layers when to gather again."""

    def __init__(self):
        self.ids: torch.Tensor | None = None  # None: no row has an adapter
        self.key: tuple | None = None
        self.version = 0


class MultiLoraLinear(nn.Linear):
    """A frozen linear layer plus, for each row, the low-rank update of that row's adapter. It
    keeps the base's `weight` and `bias` objects, as `LoraLinear` does."""

    def __init__(self, base: nn.Linear, rows: _Rows):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rows = rows
        self.updates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A [r, in], s·B [out, r])
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def restack(self, slots: int) -> None:
        """Stack the adapters into [slots + 1, ...] tensors (the last slot is the base's zeros)."""
        self._gathered = None
        if not self.updates:
            self.A = self.B = None
            return
        r = max(a.shape[0] for a, _ in self.updates.values())
        dtype = next(iter(self.updates.values()))[0].dtype
        self.A = self.weight.new_zeros(slots + 1, self.in_features, r, dtype=dtype)
        self.B = self.weight.new_zeros(slots + 1, r, self.out_features, dtype=dtype)
        for slot, (a, b) in self.updates.items():
            self.A[slot, :, : a.shape[0]] = a.t()
            self.B[slot, : a.shape[0]] = b.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.rows.ids is None or self.A is None:
            return y
        A, B = self._gather()
        n = x.shape[0]
        z = torch.bmm(x.reshape(n, -1, self.in_features).to(A.dtype), A)  # [n, T, r]
        if y.dtype == A.dtype:
            return torch.baddbmm(y.reshape(n, -1, self.out_features), z, B).view_as(y)
        return y + torch.bmm(z, B).view_as(y).to(y.dtype)

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gathered is None or self._gathered[0] != self.rows.version:
            ids = self.rows.ids
            self._gathered = (self.rows.version, self.A[ids], self.B[ids])
        return self._gathered[1], self._gathered[2]


class MultiLora:
    """The adapters served on one base model (wrapped in place, its outputs unchanged for rows
    without an adapter)."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise InputError(f"a {getattr(model, 'family', type(model).__name__)} model has no linear layers for LoRA "
                             "adapters; serve adapters on a neural base (GPT, RNN, T5)")
        if lora_modules(model):
            raise InputError("this model already carries a LoRA adapter; merge it into the base first "
                             "(lmstack.models.lora.merge_and_unload, or `lmstack lora merge`) to serve adapters on it")
        self.model = model
        self.rows = _Rows()
        self.used: list[bool] = []  # per slot

    @property
    def layers(self) -> dict[str, MultiLoraLinear]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, MultiLoraLinear)}

    def read(self, adapter_dir: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """An adapter's updates, checked against the base (CheckpointError for another base's);
        reading touches nothing the model is computing with, so it may run beside a forward pass."""
        return adapter_updates(self.model, adapter_dir)

    @torch.no_grad()
    def install(self, updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> int:
        """Add an adapter (from `read`); returns its slot, the id rows name it by."""
        if False in self.used:
            slot = self.used.index(False)
            self.used[slot] = True
        else:
            slot = len(self.used)
            self.used.append(True)
        layers = self.layers
        for path, (A, B, scaling) in updates.items():
            if path not in layers:
                base = self.model.get_submodule(path)
                layers[path] = MultiLoraLinear(base, self.rows)
                parent, _, name = path.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, name, layers[path])
            dtype = torch.float32 if layers[path].weight.dtype in (torch.float16, torch.bfloat16) else layers[path].weight.dtype
            device = layers[path].weight.device
            layers[path].updates[slot] = (A.to(device, dtype), (B * scaling).to(device, dtype))
        self._restack(layers)
        return slot

    def remove(self, slot: int) -> None:
        """Drop the adapter in `slot` (no row may still use it); the slot is free again."""
        layers = self.layers
        for layer in layers.values():
            layer.updates.pop(slot, None)
        self.used[slot] = False
        self._restack(layers)

    def _restack(self, layers: dict[str, MultiLoraLinear]) -> None:
        for layer in layers.values():
            layer.restack(len(self.used))
        # the base's slot index moved with the stacks: rows are set again before the next forward
        self.rows.ids, self.rows.key = None, None
        self.rows.version += 1

    def set_rows(self, slots: list[int] | None) -> None:
        """Each row's adapter slot for the coming forward passes (-1: the base); None or all -1
        runs the base alone."""
        key = None if slots is None or all(s < 0 for s in slots) else tuple(slots)
        if key == self.rows.key:
            return
        self.rows.key = key
        self.rows.version += 1
        device = next(self.model.parameters()).device
        base = len(self.used)
        self.rows.ids = None if key is None else torch.tensor([base if s < 0 else s for s in key], device=device)
