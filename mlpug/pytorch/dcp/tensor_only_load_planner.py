"""The DCP load planner that loads tensor entries only: bytes entries (pickled non-tensor values) are refused, never
unpickled."""

from __future__ import annotations

import io

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import ReadItem

from mlpug.checkpointing import CheckpointError


class TensorOnlyLoadPlanner(dcp.DefaultLoadPlanner):
    """A ``DefaultLoadPlanner`` that refuses bytes entries (pickled non-tensor values) instead of unpickling them.

    DCP asks the planner for a bytes entry only for a key of the state dict being loaded whose checkpoint metadata
    says "bytes"; entries of keys not being loaded are never read. Tensor entries load as with
    ``DefaultLoadPlanner``.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Refuses the entry.

        Raises:
            mlpug.checkpointing.CheckpointError: Always, naming the entry's fully qualified name.
        """
        raise CheckpointError(
            f"The sharded checkpoint entry {read_item.dest_index.fqn!r} is a bytes entry (a pickled non-tensor "
            "value): mlpug's sharded checkpoints hold only tensors, and bytes entries are not unpickled"
        )
