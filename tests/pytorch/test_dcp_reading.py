"""Reading DCP sharded checkpoints without unpickling: real checkpoints load, hostile ones are refused unexecuted.

The FSDP2 test runs this file as a script (``python test_dcp_reading.py fsdp2 DIR PORT``): one rank on a gloo
process group on 127.0.0.1, in a subprocess with a bounded time-out.
"""

from __future__ import annotations

import builtins
import os
import pathlib
import pickle
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, Metadata

from mlpug.checkpointing import CheckpointError
from mlpug.pytorch.dcp_reading import ALLOWED_GLOBALS, SafeFileSystemReader, TensorOnlyLoadPlanner, load_sharded_tensors

ROOT = Path(__file__).resolve().parents[2]
FSDP2_TIMEOUT_S = 180
NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def save(state_dict: dict, directory) -> None:
    """``dcp.save`` in this process alone (no process group), without DCP's warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_DIST_WARNING)
        dcp.save(state_dict, checkpoint_id=str(directory), no_dist=True)


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "float32": torch.randn(3, 4, generator=generator),
        "bfloat16": torch.randn(5, generator=generator).to(torch.bfloat16),
        "int64": torch.randint(-(2**62), 2**62, (2, 3), generator=generator),
        "scalar": torch.tensor(2.5),
        "layers.0.weight": torch.randn(2, 2, generator=generator),
    }


class Payload:
    """Pickles to a call of ``function(*args)``; every payload of the tests creates the file ``marker``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.open": Payload(builtins.open, str(marker), "w"),
    }


PAYLOAD_NAMES = list(payloads(Path("marker")))
# How each payload's global is pickled (os.system is posix.system on POSIX)
PAYLOAD_GLOBALS = {
    "os.system": f"{os.system.__module__}.system",
    "subprocess.call": "subprocess.call",
    "builtins.exec": "builtins.exec",
    "builtins.open": f"{builtins.open.__module__}.open",
}


def raised_by(function, *args) -> BaseException | None:
    """What ``function(*args)`` raises (``None`` if nothing), so that a test checks the marker file first."""
    try:
        function(*args)
    except BaseException as error:  # DCP's CheckpointException is a BaseException
        return error
    return None


def test_tensors_load_back_bit_exactly_in_place(tmp_path):
    expected = tensors()
    save(expected, tmp_path / "checkpoint")
    state_dict = {key: torch.zeros_like(value) for key, value in expected.items()}
    targets = dict(state_dict)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_sharded_tensors(state_dict, str(tmp_path / "checkpoint"))
    assert [str(warning.message) for warning in caught if NO_DIST_WARNING in str(warning.message)] == []
    for key, value in expected.items():
        assert state_dict[key] is targets[key], key  # loaded in place
        assert state_dict[key].dtype == value.dtype and state_dict[key].shape == value.shape, key
        assert torch.equal(state_dict[key], value), key


def test_read_metadata_sets_load_id_and_reads_rank_local_metadata(tmp_path):
    save(tensors(), tmp_path)
    shutil.copy(tmp_path / ".metadata", tmp_path / "__1.metadata")
    reader = SafeFileSystemReader(str(tmp_path))
    metadata = reader.read_metadata()
    assert sorted(metadata.state_dict_metadata) == sorted(tensors())
    assert metadata.storage_meta is not None and metadata.storage_meta.load_id == reader.load_id
    assert sorted(reader.read_metadata(rank=1).state_dict_metadata) == sorted(tensors())
    with pytest.raises(CheckpointError, match=f"{tmp_path / '__0.metadata'} does not exist"):
        reader.read_metadata(rank=0)


def test_hostile_payloads_run_under_plain_pickle(tmp_path):
    """The payloads are live: plain ``pickle.loads`` (what DCP's FileSystemReader does) creates the marker."""
    for name, payload in payloads(tmp_path / "marker").items():
        pickle.loads(pickle.dumps(payload))
        assert (tmp_path / "marker").exists(), name
        (tmp_path / "marker").unlink()


def _hostile_metadata(kind: str, payload: Payload, genuine: Path) -> bytes:
    if kind == "alone":
        return pickle.dumps(payload)
    with open(genuine, "rb") as file:
        metadata = pickle.load(file)  # written by this test: trusted
    metadata.planner_data["scalar"] = payload  # deep inside an otherwise genuine DCP Metadata
    return pickle.dumps(metadata)


@pytest.mark.parametrize("kind", ["alone", "inside_genuine_metadata"])
@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_hostile_metadata_is_refused_without_running_code(tmp_path, name, kind):
    marker = tmp_path / "marker"
    directory = tmp_path / "checkpoint"
    save(tensors(), directory)
    metadata_path = directory / ".metadata"
    metadata_path.write_bytes(_hostile_metadata(kind, payloads(marker)[name], metadata_path))

    state_dict = {key: torch.zeros_like(value) for key, value in tensors().items()}
    error = raised_by(load_sharded_tensors, state_dict, str(directory))
    assert not marker.exists()
    assert isinstance(error, CheckpointError), repr(error)
    message = str(error)
    assert str(metadata_path) in message and PAYLOAD_GLOBALS[name] in message, message
    assert "not a DCP metadata file mlpug wrote" in message and "not unpickled" in message, message
    error = raised_by(SafeFileSystemReader(str(directory)).read_metadata)
    assert not marker.exists()
    assert isinstance(error, CheckpointError) and PAYLOAD_GLOBALS[name] in str(error), repr(error)


@pytest.mark.parametrize(
    "content, reason",
    [
        (lambda genuine: genuine[: len(genuine) // 2], "truncated"),
        (lambda genuine: genuine[:1], "truncated"),
        (lambda genuine: b"", "truncated"),
        (lambda genuine: bytes(range(7, 71)), "truncated"),
        (lambda genuine: b"PK\x03\x04 not a pickle", "truncated"),
        (lambda genuine: pickle.dumps({"state_dict_metadata": {}}), "holds a dict, not DCP Metadata"),
        (lambda genuine: pickle.dumps(torch.Size([2])), "holds a Size, not DCP Metadata"),
    ],
    ids=["half", "one_byte", "empty", "random", "zip", "a_dict", "allowed_global_not_metadata"],
)
def test_corrupt_metadata_is_a_checkpoint_error_naming_the_file(tmp_path, content, reason):
    save(tensors(), tmp_path)
    metadata_path = tmp_path / ".metadata"
    metadata_path.write_bytes(content(metadata_path.read_bytes()))
    with pytest.raises(CheckpointError) as raised:
        load_sharded_tensors({"scalar": torch.zeros(())}, str(tmp_path))
    assert str(metadata_path) in str(raised.value) and reason in str(raised.value), str(raised.value)


# Raw pickle opcodes, to write what no pickler writes (pickle protocol 4; see pickletools)
def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _text(text: str) -> bytes:
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


DCP_METADATA = "torch.distributed.checkpoint.metadata"
HACKED = b"}" + _text("hacked") + b"K\x01s"  # {"hacked": 1}
BUILD_STATES = {"dict": HACKED, "slot_pair": b"N" + HACKED + b"\x86"}  # {...} and (None, {...})
# What each BUILD target pushes (an object of the process, reachable through ALLOWED_GLOBALS), and that object
BUILD_TARGETS = {
    "path_class": (_global("pathlib", "PurePosixPath"), lambda: pathlib.PurePosixPath),
    "dcp_class": (_global(DCP_METADATA, "Metadata"), lambda: Metadata),
    "enum_class": (_global(DCP_METADATA, "_MEM_FORMAT_ENCODING"), lambda: _MEM_FORMAT_ENCODING),
    "enum_member": (
        _global(DCP_METADATA, "_MEM_FORMAT_ENCODING") + b"K\x00\x85R",  # _MEM_FORMAT_ENCODING(0): a shared member
        lambda: _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT,
    ),
    "layout_function": (
        _global("torch.serialization", "_get_layout"),
        lambda: ALLOWED_GLOBALS[("torch.serialization", "_get_layout")],
    ),
}


@pytest.mark.parametrize("state", list(BUILD_STATES))
@pytest.mark.parametrize("target", list(BUILD_TARGETS))
def test_build_on_a_shared_object_is_refused_and_changes_nothing(tmp_path, target, state):
    """BUILD (pickle's "set the state of the object on the stack") on an allowed class, function or shared Enum
    member would set attributes process-wide, even in a load that is refused afterwards."""
    pushed, shared = BUILD_TARGETS[target]
    metadata_path = tmp_path / ".metadata"
    metadata_path.write_bytes(b"\x80\x04" + pushed + BUILD_STATES[state] + b"b.")
    try:
        error = raised_by(SafeFileSystemReader(str(tmp_path)).read_metadata)
        assert "hacked" not in vars(shared()), f"{target} was changed"
    finally:
        if "hacked" in vars(shared()):
            delattr(shared(), "hacked")
    assert isinstance(error, CheckpointError), repr(error)
    message = str(error)
    assert str(metadata_path) in message and "sets the state of" in message, message


def _newobj(name: str) -> bytes:
    """A fresh instance of the DCP metadata class ``name``, memoized as 0 (``cls.__new__(cls)``)."""
    return _global(DCP_METADATA, name) + b")\x81\x94"


@pytest.mark.parametrize(
    "content, reason",
    [
        (_newobj("Metadata") + b"}" + _text("evil") + b"K\x01sb.", "'evil' is not a field of Metadata"),
        (_newobj("Metadata") + b"}K\x01K\x01sb.", "1 is not a field of Metadata"),
        (_newobj("ChunkStorageMetadata") + b"K\x01b.", "a value of type int, not a dict of its fields"),
        (_newobj("ChunkStorageMetadata") + b"K\x01N\x86b.", "a value of type int, not a dict of its fields"),
        (
            _newobj("ChunkStorageMetadata") + b"N}" + _text("evil") + b"K\x01s\x86b.",  # (None, slot state)
            "'evil' is not a field of ChunkStorageMetadata",
        ),
        (_newobj("ChunkStorageMetadata") + b"}b.", "lacks the fields ['offsets', 'sizes']"),
        (_newobj("ChunkStorageMetadata") + b".", "lacks the fields ['offsets', 'sizes']"),  # no BUILD at all
        (
            _newobj("BytesStorageMetadata") + b"}bh\x00}b.",  # BUILD twice on one object
            "sets the state of a BytesStorageMetadata a second time",
        ),
        (
            _global("pathlib", "PurePosixPath") + _text("x") + b"\x85R}b.",
            "sets the state of a value of type PurePosixPath",
        ),
        (_newobj("TensorProperties") + b"K\x01\x85b.", "TensorProperties takes"),
        (
            _newobj("TensorProperties") + b"(" + _global("torch", "float32") + b"\x88\x88\x88\x88tb.",
            "TensorProperties takes",
        ),
    ],
    ids=[
        "unknown_field",
        "key_not_a_string",
        "state_not_a_dict",
        "slot_pair_not_dicts",
        "slot_state_unknown_field",
        "missing_fields",
        "never_built",
        "build_twice",
        "path_instance",
        "tensor_properties_short",
        "tensor_properties_types",
    ],
)
def test_build_sets_only_the_fields_of_a_fresh_dcp_object(tmp_path, content, reason):
    metadata_path = tmp_path / ".metadata"
    metadata_path.write_bytes(b"\x80\x04" + content)
    error = raised_by(SafeFileSystemReader(str(tmp_path)).read_metadata)
    assert isinstance(error, CheckpointError), repr(error)
    assert str(metadata_path) in str(error) and reason in str(error), str(error)


def _rewrite_metadata(directory: Path, change) -> Path:
    """Rewrites the genuine ``.metadata`` of ``directory`` after ``change(metadata)``."""
    metadata_path = directory / ".metadata"
    with open(metadata_path, "rb") as file:
        metadata = pickle.load(file)  # written by this test: trusted
    change(metadata)
    metadata_path.write_bytes(pickle.dumps(metadata))
    return metadata_path


def _float32_entry(metadata):
    """The index and storage info of the ``"float32"`` tensor of :func:`tensors`."""
    return next((index, info) for index, info in metadata.storage_data.items() if index.fqn == "float32")


def _set_storage(**fields):
    def change(metadata):
        _, info = _float32_entry(metadata)
        for name, value in fields.items():
            setattr(info, name, value)

    return change


SHARD_NAME = "of the form __<rank>_<number>.distcp"


@pytest.mark.parametrize(
    "change, reason",
    [
        (_set_storage(relative_path="/dev/zero"), SHARD_NAME),
        (_set_storage(relative_path="../__0_0.distcp"), SHARD_NAME),
        (_set_storage(relative_path="sub/__0_0.distcp"), SHARD_NAME),
        (_set_storage(relative_path="data.bin"), SHARD_NAME),
        (_set_storage(relative_path="__\u0661_0.distcp"), SHARD_NAME),  # a non-ASCII digit
        (_set_storage(relative_path=pathlib.PurePosixPath("__0_0.distcp")), "a PurePosixPath, not a str"),
        (_set_storage(relative_path="__0_7.distcp"), "does not exist"),
        (_set_storage(relative_path="__0_8.distcp"), "not a regular file"),  # a FIFO
        (_set_storage(relative_path="__0_9.distcp"), "not a regular file"),  # a symbolic link to a file
        (_set_storage(relative_path="__0_10.distcp"), "not a regular file"),  # a directory
        (_set_storage(offset=-1), "offset -1"),
        (_set_storage(length=-1), "length -1"),
        (_set_storage(offset="0"), "offset '0', which is not an int"),
        (_set_storage(length=True), "length True, which is not an int"),
        (_set_storage(length=10**6), "beyond the end of"),
        (_set_storage(transform_descriptors=["stream.zstd"]), "transform descriptors ['stream.zstd']"),
        (lambda metadata: metadata.storage_data.update({_float32_entry(metadata)[0]: "x"}), "a str, not"),
        (lambda metadata: setattr(metadata, "storage_data", []), "storage data is a list, not a dict"),
    ],
    ids=[
        "absolute",
        "parent",
        "subdirectory",
        "not_a_shard_name",
        "non_ascii_digit",
        "not_a_str",
        "missing",
        "fifo",
        "symlink",
        "directory",
        "negative_offset",
        "negative_length",
        "offset_not_an_int",
        "length_a_bool",
        "beyond_the_file",
        "transform",
        "not_storage_info",
        "not_a_dict",
    ],
)
def test_storage_entries_outside_the_shard_files_are_refused(tmp_path, change, reason):
    directory = tmp_path / "checkpoint"
    save(tensors(), directory)
    os.mkfifo(directory / "__0_8.distcp")
    (tmp_path / "outside.distcp").write_bytes(bytes(10**6))
    os.symlink(tmp_path / "outside.distcp", directory / "__0_9.distcp")
    os.mkdir(directory / "__0_10.distcp")
    metadata_path = _rewrite_metadata(directory, change)
    error = raised_by(SafeFileSystemReader(str(directory)).read_metadata)
    assert isinstance(error, CheckpointError), repr(error)
    message = str(error)
    assert str(metadata_path) in message and reason in message, message
    if "storage data is" not in reason:
        assert "'float32' (offset (0, 0))" in message, message


def test_a_refused_storage_entry_fails_the_load_with_a_checkpoint_error(tmp_path):
    save(tensors(), tmp_path)
    metadata_path = _rewrite_metadata(tmp_path, _set_storage(relative_path="/dev/zero"))
    error = raised_by(load_sharded_tensors, {"float32": torch.zeros(3, 4)}, str(tmp_path))
    assert isinstance(error, CheckpointError), repr(error)
    assert str(metadata_path) in str(error) and "'/dev/zero'" in str(error), str(error)


def test_missing_directory_or_metadata_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=f"directory {tmp_path / 'absent'} does not exist"):
        load_sharded_tensors({"scalar": torch.zeros(())}, str(tmp_path / "absent"))
    save(tensors(), tmp_path)
    (tmp_path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=f"directory {tmp_path} has no .metadata file"):
        load_sharded_tensors({"scalar": torch.zeros(())}, str(tmp_path))
    with pytest.raises(CheckpointError, match=f"{tmp_path / '.metadata'} does not exist"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()


def test_non_tensor_values_to_load_are_a_type_error(tmp_path):
    with pytest.raises(TypeError, match=r"\{'note': 'dict'\}"):
        load_sharded_tensors({"x": torch.zeros(2), "note": {"a": 1}}, str(tmp_path))


def test_bytes_entries_are_refused_by_the_planner_without_unpickling(tmp_path):
    marker = tmp_path / "marker"
    save(
        {"x": torch.arange(3.0), "note": {"a": 1}, "evil": payloads(marker)["os.system"]},
        tmp_path / "checkpoint",
    )
    directory = str(tmp_path / "checkpoint")
    assert not marker.exists()  # saving pickles the payload; it does not run it
    for key in ("evil", "note.a"):  # a caller expecting a tensor where the checkpoint has a bytes entry
        error = raised_by(load_sharded_tensors, {"x": torch.zeros(3), key: torch.zeros(())}, directory)
        assert not marker.exists()
        assert isinstance(error, CheckpointError), repr(error)
        message = str(error)
        assert repr(key) in message and "hold only tensors" in message and "not unpickled" in message, message

    with warnings.catch_warnings():  # the planner alone, in DCP's own load
        warnings.filterwarnings("ignore", message=NO_DIST_WARNING)
        with pytest.raises(BaseException) as raised_by_dcp:
            dcp.load(
                {"evil": torch.zeros(())},
                storage_reader=SafeFileSystemReader(directory),
                planner=TensorOnlyLoadPlanner(),
                no_dist=True,
            )
    failures = raised_by_dcp.value.failures  # DCP's CheckpointException
    assert isinstance(failures[0][0], CheckpointError) and "'evil'" in str(failures[0][0])
    assert not marker.exists()

    state_dict = {"x": torch.zeros(3)}  # keys not being loaded are never read
    load_sharded_tensors(state_dict, directory)
    assert torch.equal(state_dict["x"], torch.arange(3.0))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_fsdp2_sharded_model_and_optimizer_state_round_trip(tmp_path):
    command = [sys.executable, str(Path(__file__)), "fsdp2", str(tmp_path / "checkpoint"), str(_free_port())]
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    try:
        result = subprocess.run(
            command,
            env=environment,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=FSDP2_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the FSDP2 worker did not end within {FSDP2_TIMEOUT_S} s:\n{error.output}")
    assert result.returncode == 0 and "FSDP2 round trip: OK" in result.stdout, result.stdout


def _fsdp2_worker(directory: str, port: int) -> None:
    """One rank: FSDP2 (``fully_shard``) model and Adam state as DTensors, saved with DCP and loaded into a model
    of other weights with :func:`load_sharded_tensors` under the process group."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    mesh = init_device_mesh("cpu", (1,))

    def trained_state(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        model(torch.randn(3, 4)).square().sum().backward()
        optimizer.step()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        flat = {f"model.{key}": value for key, value in model_state.items()}
        for parameter, state in optimizer_state["state"].items():  # param_groups (not tensors) are left out
            flat.update({f"optimizer.{parameter}.{key}": value for key, value in state.items()})
        assert all(isinstance(value, torch.Tensor) for value in flat.values())
        return model, flat

    def full(value: torch.Tensor) -> torch.Tensor:
        return value.full_tensor() if isinstance(value, DTensor) else value

    _, saved = trained_state(seed=0)
    assert any(isinstance(value, DTensor) for value in saved.values())
    expected = {key: full(value).clone() for key, value in saved.items()}
    dcp.save(saved, checkpoint_id=directory)

    model, state_dict = trained_state(seed=1)
    assert not all(torch.equal(full(state_dict[key]), value) for key, value in expected.items())
    types = {key: type(value) for key, value in state_dict.items()}
    load_sharded_tensors(state_dict, directory)
    assert {key: type(value) for key, value in state_dict.items()} == types
    for key, value in expected.items():
        assert torch.equal(full(state_dict[key]), value), key
    for name, parameter in model.named_parameters():  # FSDP2's state dict shares the sharded parameters
        assert torch.equal(full(parameter.detach()), expected[f"model.{name}"]), name
    dist.destroy_process_group()
    print("FSDP2 round trip: OK", flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp2"]:
    _fsdp2_worker(sys.argv[2], int(sys.argv[3]))
