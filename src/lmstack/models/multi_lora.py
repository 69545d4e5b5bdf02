"""Several LoRA adapters for one base, served side by side: each row of a batch uses its own
adapter, or none (S-LoRA / Punica's idea, in plain PyTorch).

Every targeted `nn.Linear` becomes a `MultiLoraLinear` holding each adapter's A [r, in] and B
[out, r] (the scaling folded into B) in stacks [slots, r_max, in] and [slots, r_max, out], ranks
zero-padded to the largest. Before a forward pass the caller sets each row's slot
(`MultiLora.set_rows`, -1 = the base), and the batch's rows are grouped by adapter: `index` [U·G]
lists the rows of each of the U adapters present (padded to the largest group G with zero rows).
Each layer then gathers those rows (into a buffer all layers share), runs two batched products
against the U adapters' own A and B and adds the result back to each row:

    y = W x + bias;   y[index[u]] += (x[index[u]] A_uᵀ) B_u   for each adapter u present

which equals running each row on the base with its adapter alone. The arithmetic is each adapted
row's own rank (Punica's SGMV, as one `bmm` per side; padding rows aside): a base row costs
nothing, and more adapters in the batch cost only the reading of their weights, once a step each
(laying the adapters side by side for every row computed U·r columns per row, 8x more for 8
cards). The batch's A and B are gathered once per change of its adapters, so a decoding step
gathers only the activations.
Adapters come and go at run time (`install`, `remove`); a slot freed by `remove` is reused.

A compiled one-token step (`GPT.compile_decoding`; CUDA graphs on a GPU) cannot group rows: the
groups' shapes change with the batch's adapters, and every change would compile again. Inside it
each row instead reads its own adapter from the stacks (Punica's BGMV: `per_row` [B] names each
row's slot, base rows a slot of zeros), so the step's shapes depend on the batch size alone.
"""

from __future__ import annotations

import math
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
        self.key: tuple | None = None  # the same; None where no row has an adapter
        self.per_row: torch.Tensor | None = None  # [B] each row's slot, the zero slot for base rows
        self.slots: torch.Tensor | None = None
        self.index: torch.Tensor | None = None
        self.padding: torch.Tensor | None = None  # positions in `index` that are padding, if any
        self.version = 0
        self._scratch: dict[str, torch.Tensor] = {}

    def scratch(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """A buffer reused by every layer (None where autograd records: it cannot write into one):
        a prompt's gathered activations are megabytes, and allocating them afresh in each layer
        costs page faults that outweigh the products (benchmarks/RESULTS.md, serving engine)."""
        if torch.is_grad_enabled():
            return None
        numel = math.prod(shape)
        buf = self._scratch.get(role)
        fits = buf is not None and buf.numel() >= numel and (buf.dtype, buf.device) == (like.dtype, like.device)
        if not fits or buf.is_inference() != torch.is_inference_mode_enabled():  # neither may write the other's
            buf = self._scratch[role] = like.new_empty(numel)
        return buf[:numel].view(shape)


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
            return y + self._per_row(x)
        if rows.key is None:
            return y
        A, B = self._gather()
        flat = x.reshape(x.shape[0], -1)  # [rows, T·in]
        xs = torch.index_select(flat, 0, rows.index, out=rows.scratch("x", (len(rows.index), flat.shape[1]), flat))
        if rows.padding is not None:
            xs.index_fill_(0, rows.padding, 0)
        xs = xs.view(A.shape[0], -1, self.in_features)  # [U, G·T, in]
        low = torch.bmm(xs if xs.dtype == A.dtype else xs.to(A.dtype), A.transpose(1, 2))  # [U, G·T, r]
        update = torch.bmm(low, B, out=rows.scratch("update", (A.shape[0], xs.shape[1], self.out_features), low))
        update = update.view(len(rows.index), -1)
        y.view(x.shape[0], -1).index_add_(0, rows.index, update if update.dtype == y.dtype else update.to(y.dtype))
        return y

    def _per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's update from its own adapter's A and B, gathered by `per_row`."""
        slot = self.rows.per_row
        low = torch.bmm(x.reshape(x.shape[0], -1, self.in_features).to(self.A.dtype), self.A[slot].transpose(1, 2))
        return torch.bmm(low, self.B[slot]).view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's adapters: A [U, r, in], B [U, r, out]."""
        if self._gathered is None or self._gathered[0] != self.rows.version:
            self._gathered = (self.rows.version, self.A[self.rows.slots], self.B[self.rows.slots])
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
        self.rows.assigned = self.rows.key = self.rows.per_row = None  # set again before the next forward
        self.rows.version += 1

    def set_rows(self, slots: list[int] | None) -> None:
        """Each row's adapter slot for the coming forward passes (-1: the base); None or all -1
        runs the base alone."""
        rows = self.rows
        assigned = None if slots is None else tuple(slots)
        if assigned == rows.assigned:
            return
        rows.assigned, rows.key, rows.per_row = assigned, None, None
        rows.version += 1
        if assigned is None:
            return
        device = next(self.model.parameters()).device
        zeros = len(self.used)  # the stacks' slot of zeros
        rows.per_row = torch.tensor([s if s >= 0 else zeros for s in assigned], device=device)
        if all(s < 0 for s in assigned):
            return
        rows.key = assigned
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(assigned):
            if slot >= 0:
                groups.setdefault(slot, []).append(row)
        width = max(map(len, groups.values()))
        index = [groups[s] + [None] * (width - len(groups[s])) for s in sorted(groups)]
        flat = [r for group in index for r in group]
        self.rows.slots = torch.tensor(sorted(groups), device=device)
        self.rows.index = torch.tensor([0 if r is None else r for r in flat], device=device)
        padding = [i for i, r in enumerate(flat) if r is None]
        self.rows.padding = torch.tensor(padding, device=device) if padding else None
