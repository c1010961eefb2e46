"""``SavedShards``: the shards of a sharded training checkpoint being written (:mod:`mlpug.checkpointing.sharded`)."""

from __future__ import annotations

from typing import NamedTuple

from mlpug.checkpointing.sharded import Wait


class SavedShards(NamedTuple):
    """The shards of a training checkpoint being written: their directory, and the wait until they are durable."""

    directory: str
    wait: Wait
