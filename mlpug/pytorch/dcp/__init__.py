"""The parts of reading ``torch.distributed.checkpoint`` (DCP) checkpoints without unpickling untrusted bytes, one
class a module; :func:`mlpug.pytorch.dcp_reading.load_sharded_tensors` puts them together.

* :mod:`~mlpug.pytorch.dcp.metadata_unpickler`: :class:`MetadataUnpickler`, the restricted unpickler of ``.metadata``
  files (its globals, :data:`ALLOWED_GLOBALS`, and which objects' state a file may set);
* :mod:`~mlpug.pytorch.dcp.safe_file_system_reader`: :class:`SafeFileSystemReader`, the storage reader that reads
  ``.metadata`` with it and refuses storage entries outside the checkpoint's shard files;
* :mod:`~mlpug.pytorch.dcp.tensor_only_load_planner`: :class:`TensorOnlyLoadPlanner`, the load planner that refuses
  bytes entries (pickled non-tensor values).
"""
