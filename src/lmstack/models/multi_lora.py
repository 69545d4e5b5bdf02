"""Several LoRA adapters for one base, served side by side: each row of a batch uses its own
adapter, or none (S-LoRA / Punica's idea, in plain PyTorch).

Every targeted `nn.Linear` becomes a `MultiLoraLinear` holding each adapter's A [r, in] and B
[out, r] (the scaling folded into B) in stacks [slots + 1, r_max, in] and [slots + 1, r_max, out],
ranks zero-padded to the largest, the last slot zeros. Before a forward pass the caller sets each
row's slot (`MultiLora.set_rows`, -1 = the base). A layer then adds each row's update, which
equals running the row on the base with its adapter alone, in one of two ways:

- A decoding step groups the rows by adapter (Punica's SGMV, as one `bmm` per side): `index`
  [U·G] lists the rows of each of the U adapters present (padded to the largest group G with
  zero rows); the layer gathers those rows, runs two batched products against the U adapters'
  own A and B (gathered once per change of the batch's adapters) and adds the result back:

      y = W x + bias;   y[index[u]] += (x[index[u]] A_uᵀ) B_u   for each adapter u present

  Each adapted row costs its own rank (padding aside), a base row nothing, and more adapters only
  the reading of their weights once a step (laying them side by side for every row computed U·r
  columns per row, 8x more for 8 cards).
- A prompt, and a compiled step, give each row its own adapter's A and B, gathered by `per_row`
  [B] (Punica's BGMV; base rows read the zero slot). A prompt's rows outweigh their adapters'
  weights, so gathering the weights moves fewer bytes than gathering the rows; a compiled step
  (`GPT.compile_decoding`; CUDA graphs on a GPU) cannot group rows, whose groups' shapes change
  with the batch's adapters and would compile again at every change, while `per_row` depends on
  the batch size alone.

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
    """The batch's adapters, shared by every layer: `slots` [U] the adapter slots present, `index`
    [U·G] the rows of each in turn, where each gathered row's update goes back too (padding names
    row 0: its gathered copies are zeroed at `padding`, so their updates add nothing), and a
    version that tells layers to gather their weights again."""

    def __init__(self):
        self.assigned: tuple | None = None  # each row's slot (-1: the base), as last set
        self.per_row: torch.Tensor | None = None  # [B] each row's slot, the zero slot for base rows
        self.slots: torch.Tensor | None = None
        self.index: torch.Tensor | None = None  # None where no row has an adapter
        self.padding: torch.Tensor | None = None  # positions in `index` that are padding, if any
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
        # [slots + 1, r, in] and [slots + 1, r, out], the last slot zeros (base rows in a compiled
        # step); buffers, so a compiled step reads them where they are instead of copying them in.
        self.register_buffer("A", None, persistent=False)  # each A row-major, as `bmm` reads it fastest
        self.register_buffer("B", None, persistent=False)
        self._gathered: tuple | None = None  # (version, A_U, B_U)

    def restack(self, slots: int) -> None:
        """Stack the adapters into [slots + 1, ...] tensors (zeros for a slot this layer has none of)."""
        self._gathered = None
        if not self.updates:
            self.A = self.B = None
            return
        r = max(a.shape[0] for a, _ in self.updates.values())
        dtype = next(iter(self.updates.values()))[0].dtype
        self.A = self.weight.new_zeros(slots + 1, r, self.in_features, dtype=dtype)
        self.B = self.weight.new_zeros(slots + 1, r, self.out_features, dtype=dtype)
        for slot, (a, b) in self.updates.items():
            self.A[slot, : a.shape[0]] = a
            self.B[slot, : a.shape[0]] = b.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        rows = self.rows
        if self.A is None or rows.per_row is None:
            return y
        if torch.compiler.is_compiling():
            return self._add_per_row(x, y)
        if rows.index is None:
            return y
        if x.numel() > x.shape[0] * self.in_features:  # a prompt: a row's adapter weighs less than its activations
            return self._add_per_row(x, y)
        At, B = self._gather()
        xs = torch.index_select(x.reshape(x.shape[0], -1), 0, rows.index)
        if rows.padding is not None:
            xs.index_fill_(0, rows.padding, 0)
        if xs.dtype != At.dtype:  # a half-precision base; the adapters compute in float32
            xs = xs.to(At.dtype)
        low = torch.bmm(xs.view(At.shape[0], -1, self.in_features), At)  # [U, G, r]
        update = torch.bmm(low, B).view(xs.shape[0], -1)  # [U·G, out]
        y.view(x.shape[0], -1).index_add_(0, rows.index, update if update.dtype == y.dtype else update.to(y.dtype))
        return y

    def _add_per_row(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus each row's update from its own adapter, whose A and B `per_row` gathers."""
        slot = self.rows.per_row
        x = x.reshape(x.shape[0], -1, self.in_features).to(self.A.dtype)
        # A x_bᵀ [B, r, T] rather than x_b Aᵀ: the same numbers, 3x faster on a CPU (MKL) for a
        # 32-token prompt, as the narrow side is then the product's rows, not its columns
        low = torch.bmm(self.A[slot], x.transpose(1, 2))
        y.view(x.shape[0], -1, self.out_features).baddbmm_(low.transpose(1, 2).to(y.dtype), self.B[slot].to(y.dtype))
        return y

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's adapters: Aᵀ [U, in, r] (a view of A [U, r, in]), B [U, r, out]."""
        if self._gathered is None or self._gathered[0] != self.rows.version:
            self._gathered = (self.rows.version, self.A[self.rows.slots].transpose(1, 2), self.B[self.rows.slots])
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
        self.rows.assigned = self.rows.per_row = self.rows.index = None  # set again before the next forward
        self.rows.version += 1

    def set_rows(self, slots: list[int] | None) -> None:
        """Each row's adapter slot for the coming forward passes (-1: the base); None or all -1
        runs the base alone."""
        rows = self.rows
        assigned = None if slots is None else tuple(slots)
        if assigned == rows.assigned:
            return
        rows.assigned, rows.per_row, rows.index = assigned, None, None
        rows.version += 1
        if assigned is None:
            return
        device = next(self.model.parameters()).device
        zeros = len(self.used)  # the stacks' slot of zeros
        rows.per_row = torch.tensor([s if s >= 0 else zeros for s in assigned], device=device)
        if all(s < 0 for s in assigned):
            return
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(assigned):
            if slot >= 0:
                groups.setdefault(slot, []).append(row)
        width = max(map(len, groups.values()))
        index = [groups[s] + [None] * (width - len(groups[s])) for s in sorted(groups)]
        flat = [r for group in index for r in group]
        rows.slots = torch.tensor(sorted(groups), device=device)
        rows.index = torch.tensor([0 if r is None else r for r in flat], device=device)
        padding = [i for i, r in enumerate(flat) if r is None]
        rows.padding = torch.tensor(padding, device=device) if padding else None
