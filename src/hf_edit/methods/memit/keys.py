"""Reading activations at token positions: MEMIT's keys (``compute_ks``) and the block outputs its residuals need.

Rows are tokenised texts with one position each.  :func:`read_at_positions` runs them through the model in
right-padded batches and returns, for every requested module, its input or output at each row's position, stopping
the forward pass as soon as every requested module has run.  :func:`average_keys` turns per-row keys into MEMIT's
per-request keys: the mean of the template groups' means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...hooks import StopForward, as_batch_seq
from ...templates import encode_templated, fact_position  # re-exported: MEMIT's keys are read at these positions
from ...tokens import pad_batch

__all__ = ["PositionedRows", "encode_templated", "fact_position", "group_weights", "read_at_positions",
           "read_all_positions"]

Where = str  # "input" or "output"


@dataclass(frozen=True)
class PositionedRows:
    """Token ids of several texts and one position in each.

    Attributes:
        ids: one id list per row.
        positions: the position read in each row.
    """

    ids: tuple[tuple[int, ...], ...]
    positions: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.positions):
            raise ValueError("PositionedRows needs one position per row.")

    def __len__(self) -> int:
        return len(self.ids)


def _first(output: object) -> torch.Tensor:
    """The hidden states of a module output (a tensor, or the first element of a block's tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[index]


@torch.no_grad()
def read_at_positions(model: nn.Module, rows: PositionedRows, reads: Mapping[str, tuple[nn.Module, Where]], *,
                      pad_id: int, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Each module's input or output at each row's position, as float32 ``(len(rows), width)`` tensors.

    Args:
        model: the model to run (as it is: adapters and temporary hooks active).
        rows: the texts and positions.
        reads: name → (module, ``"input"`` or ``"output"``).  A decoder block's output is its hidden states.
        pad_id: padding id (rows are right-padded; positions index the unpadded text).
        batch_size: rows per forward pass.
    """
    if not reads:
        return {}
    device = next(model.parameters()).device
    results: dict[str, list[torch.Tensor]] = {name: [] for name in reads}
    for start in range(0, len(rows), batch_size):
        ids = rows.ids[start:start + batch_size]
        batch = pad_batch(ids, pad_id, device)
        shape = tuple(batch["input_ids"].shape)
        index = (torch.arange(len(ids), device=device),
                 torch.tensor(rows.positions[start:start + batch_size], device=device))
        seen: dict[str, torch.Tensor] = {}
        handles = []

        def make_hook(name: str, where: Where, seen=seen, shape=shape, index=index):
            def hook(_module: nn.Module, args: tuple, output: object) -> None:
                value = args[0] if where == "input" else _first(output)
                seen[name] = as_batch_seq(value.detach(), shape)[index[0], index[1].to(value.device)].float()
                if len(seen) == len(reads):
                    raise StopForward
            return hook

        try:
            for name, (module, where) in reads.items():
                handles.append(module.register_forward_hook(make_hook(name, where)))
            try:
                model(**batch, use_cache=False)
            except StopForward:
                pass
        finally:
            for handle in handles:
                handle.remove()
        missing = set(reads) - set(seen)
        if missing:
            raise RuntimeError(f"The modules {sorted(missing)} did not run in the forward pass.")
        for name in reads:
            results[name].append(seen[name].to("cpu"))
    return {name: torch.cat(parts) for name, parts in results.items()}


@torch.no_grad()
def read_all_positions(model: nn.Module, rows: Sequence[Sequence[int]], module: nn.Module, *, pad_id: int,
                       batch_size: int = 128) -> list[torch.Tensor]:
    """``module``'s input at every (unpadded) position of every row: one float32 ``(len(row), width)`` tensor per
    row.  The forward pass stops once the module has run."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        chunk = [tuple(r) for r in rows[start:start + batch_size]]
        batch = pad_batch(chunk, pad_id, device)
        shape = tuple(batch["input_ids"].shape)
        seen: dict[str, torch.Tensor] = {}

        def hook(_module: nn.Module, args: tuple, _output: object, seen=seen, shape=shape) -> None:
            seen["x"] = as_batch_seq(args[0].detach(), shape).float()
            raise StopForward

        handle = module.register_forward_hook(hook)
        try:
            model(**batch, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
        out += [seen["x"][i, :len(row)].to("cpu") for i, row in enumerate(chunk)]
    return out


def group_weights(n_units: int, rows_per_unit: int, groups: Sequence[int]) -> torch.Tensor:
    """The (n_units, n_units · rows_per_unit) float64 matrix that averages each unit's rows MEMIT's way.

    Rows are laid out unit after unit; within a unit, template after template, and ``groups`` gives each
    template's group.  A unit's key is the mean over groups of the mean over the group's templates.
    """
    groups = list(groups)
    if len(groups) != rows_per_unit:
        raise ValueError("groups must give one group per template row.")
    sizes = {g: groups.count(g) for g in set(groups)}
    per_row = torch.tensor([1.0 / (len(sizes) * sizes[g]) for g in groups], dtype=torch.float64)
    weights = torch.zeros(n_units, n_units * rows_per_unit, dtype=torch.float64)
    for unit in range(n_units):
        weights[unit, unit * rows_per_unit:(unit + 1) * rows_per_unit] = per_row
    return weights
