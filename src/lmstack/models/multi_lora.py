"""Several LoRA adapters for one base, served side by side: each row of a batch uses its own
adapter, or none (S-LoRA / Punica's idea, in plain PyTorch).

Every targeted `nn.Linear` becomes a `MultiLoraLinear` holding each adapter's A [r, in] and B
[out, r] (the scaling folded into B) in stacks [slots, in, r_max] and [slots, r_max, out], ranks
zero-padded to the largest. Before a forward pass the caller sets each row's slot
(`MultiLora.set_rows`, -1 = the base). Each layer then lays the U adapters present in the batch
side by side, A as [in, U·r] and B as [U·r, out], and adds every row's update with two matrix
products, a mask keeping only the columns of the row's own adapter:

    y = W x + bias + ((x A_U) * mask_row) B_U

which equals running each row on the base with its adapter alone. The work grows with the
number of different adapters in the batch, not with the rows (gathering a matrix per row would
read as much memory as the base weight once rows x rank reach its width), and the side-by-side
matrices are kept until the batch's adapters change, so a decoding step mostly gathers nothing.
Adapters come and go at run time (`install`, `remove`); a slot freed by `remove` is reused.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import InputError
from lmstack.models.lora import adapter_updates, lora_modules


class _Rows:
    """The batch's adapters, shared by every layer: `slots` [U] the adapter slots present, `column`
    [B] each row's place among them (-1: the base), and a version that tells layers to gather again."""

    def __init__(self):
        self.key: tuple | None = None  # each row's slot; None: no row has an adapter
        self.slots: torch.Tensor | None = None
        self.column: torch.Tensor | None = None
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
        self.A: torch.Tensor | None = None  # [slots, in, r]
        self.B: torch.Tensor | None = None  # [slots, r, out]
        self._gathered: tuple | None = None  # (version, A_U, B_U, mask)

    def restack(self, slots: int) -> None:
        """Stack the adapters into [slots, ...] tensors (zeros for a slot this layer has none of)."""
        self._gathered = None
        if not self.updates:
            self.A = self.B = None
            return
        r = max(a.shape[0] for a, _ in self.updates.values())
        dtype = next(iter(self.updates.values()))[0].dtype
        self.A = self.weight.new_zeros(slots, self.in_features, r, dtype=dtype)
        self.B = self.weight.new_zeros(slots, r, self.out_features, dtype=dtype)
        for slot, (a, b) in self.updates.items():
            self.A[slot, :, : a.shape[0]] = a.t()
            self.B[slot, : a.shape[0]] = b.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.rows.key is None or self.A is None:
            return y
        A, B, mask = self._gather()
        z = (x if x.dtype == A.dtype else x.to(A.dtype)) @ A
        z = z.view(x.shape[0], -1, A.shape[1]).mul_(mask)  # [B, T, U·r]: each row keeps its own adapter's columns
        if y.dtype == A.dtype:
            return torch.addmm(y.reshape(-1, self.out_features), z.view(-1, A.shape[1]), B).view_as(y)
        return y + (z @ B).view_as(y).to(y.dtype)

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's adapters side by side: A [in, U·r], B [U·r, out], mask [B, 1, U·r]."""
        if self._gathered is None or self._gathered[0] != self.rows.version:
            slots, column = self.rows.slots, self.rows.column
            r = self.A.shape[2]
            A = self.A[slots].permute(1, 0, 2).reshape(self.in_features, -1)
            B = self.B[slots].reshape(-1, self.out_features)
            place = torch.arange(len(slots), device=column.device).repeat_interleave(r)
            mask = (column[:, None] == place).to(A.dtype)[:, None]
            self._gathered = (self.rows.version, A, B, mask)
        return self._gathered[1:]


class MultiLora:
    """The adapters served on one base model (wrapped in place, its outputs unchanged for rows
    without an adapter)."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise InputError(
                f"a {getattr(model, 'family', type(model).__name__)} model has no linear layers for LoRA "
                "adapters; serve adapters on a neural base (GPT, RNN, T5)"
            )
        if lora_modules(model):
            raise InputError(
                "this model already carries a LoRA adapter; merge it into the base first "
                "(lmstack.models.lora.merge_and_unload, or `lmstack lora merge`) to serve adapters on it"
            )
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
        self.rows.key = None  # rows are set again before the next forward
        self.rows.version += 1

    def set_rows(self, slots: list[int] | None) -> None:
        """Each row's adapter slot for the coming forward passes (-1: the base); None or all -1
        runs the base alone."""
        key = None if slots is None or all(s < 0 for s in slots) else tuple(slots)
        if key == self.rows.key:
            return
        self.rows.key = key
        self.rows.version += 1
        if key is not None:
            device = next(self.model.parameters()).device
            present = sorted({s for s in key if s >= 0})
            self.rows.slots = torch.tensor(present, device=device)
            self.rows.column = torch.tensor([present.index(s) if s >= 0 else -1 for s in key], device=device)
