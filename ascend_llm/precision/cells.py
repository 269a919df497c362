"""Cell surgery shared by the precision converters: replace a sub-cell by path, restore full Parameter names,
and the communicator size (for the FP8 amax reduction). No dtype policy here.
"""

from __future__ import annotations

from mindspore import nn


def replace_cell(model: nn.Cell, path: str, new: nn.Cell) -> None:
    """Set the sub-cell at dotted `path` (integer parts index CellList/SequentialCell) to `new`. Parameter names
    are not fixed here: call `sync_parameter_names` after the last replacement."""
    parent = model
    *parents, leaf = path.split(".")
    for name in parents:
        parent = parent[int(name)] if isinstance(parent, (nn.CellList, nn.SequentialCell)) else getattr(parent, name)
    if isinstance(parent, (nn.CellList, nn.SequentialCell)):
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def sync_parameter_names(model: nn.Cell) -> None:
    """Give every Parameter its full path again (assigning a cell into a parent renames its Parameters to
    `<attr>.<name>`); checkpoints, optimizers and name maps key on these names."""
    for name, param in model.parameters_and_names():
        if param.name != name:
            param.name = name


def world_size() -> int:
    """Size of the world group (every rank, whatever the parallel layout) if `mindspore.communication` is
    initialised, else 1."""
    try:
        from mindspore.communication import get_group_size

        return int(get_group_size())
    except (RuntimeError, ValueError, ImportError):
        return 1
