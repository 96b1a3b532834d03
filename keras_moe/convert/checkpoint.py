"""Reading Hugging Face checkpoint directories: config and safetensors.

Only safetensors files are read. Their header (tensor names, dtypes,
shapes and byte ranges) is parsed and checked against the file's size when
the checkpoint is opened, so a truncated or malformed file is refused
before any weight is built; each tensor is then read when asked for, with
plain file reads into one array of its stored dtype (bfloat16 stays
bfloat16, through `ml_dtypes`). Nothing is memory-mapped: pages of a
mapped file count in the process's resident memory while it stays mapped,
which would add the whole checkpoint to the peak memory of a conversion.
Pickled checkpoints (`pytorch_model.bin`, `*.pt`, `*.pth`, `*.ckpt`) are
refused: unpickling a file can run any code it contains.
"""

import json
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# The per-expert names of the gate, up and down projections in transformers
# checkpoints, unless a family names them otherwise.
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# safetensors dtype names; values are little-endian, as the format says.
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# The safetensors library refuses larger headers too.
MAX_HEADER_BYTES = 100_000_000
# One read call moves at most this many bytes (Linux caps a read near 2 GiB).
_READ_CHUNK = 1 << 30


class ConversionError(ValueError):
    """A checkpoint cannot be converted: a file, field or tensor is wrong.

    The message names what is wrong: the missing tensor, the tensor whose
    shape differs from what the config needs, the unsupported `model_type`
    or config field, or the pickled weight files that are not read.
    """


def read_config(directory):
    """The `config.json` of a Hugging Face checkpoint directory, as a dict.

    Args:
        directory: str or path of the checkpoint directory.

    Returns:
        The parsed JSON dict.

    Raises:
        FileNotFoundError: if the directory has no `config.json`.
        ConversionError: if it is not a JSON object.

    Example:

    >>> import json, pathlib, tempfile
    >>> directory = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (directory / "config.json").write_text(json.dumps({"hidden_size": 16}))
    >>> read_config(directory)["hidden_size"]
    16
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no {CONFIG_FILE}: a Hugging Face "
            "checkpoint directory holds config.json and *.safetensors."
        )
    with open(path, encoding="utf-8") as file:
        try:
            config = json.load(file)
        except json.JSONDecodeError as error:
            raise ConversionError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object.")
    return config


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory, read one at a time.

    Finds `model.safetensors`, or the shards listed in
    `model.safetensors.index.json` (sharded checkpoints), or else every
    `*.safetensors` file of the directory. Every file's header is read and
    checked against the file's size when the checkpoint is opened (see
    `SafetensorsFile`), and tensors come back as NumPy arrays of their stored
    dtype, read one at a time.

    A tensor asked for by its usual name is also found under the family's
    other spellings (`aliases`), and one expert's projection
    (`...experts.{j}.gate_proj.weight`) is read as a slice of experts
    stored stacked (`...experts.gate_up_proj [E, 2m, d]` and
    `...experts.down_proj [E, d, m]`, the layout of transformers >= 5).

    Args:
        directory: str or path of the checkpoint directory.
        aliases: `(name part, alternative)` pairs: a name holding the part
            is also looked up with the alternative in its place.
        expert_projections: the per-expert names of the gate, up and down
            projections.

    Raises:
        ConversionError: if the directory holds no safetensors file (the
            message names the pickled `.bin` files it found instead, which
            are never read), a shard the index lists is missing, or a file
            is truncated or malformed.

    Example:

    >>> import pathlib, tempfile
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> directory = pathlib.Path(tempfile.mkdtemp())
    >>> save_file({"w": np.ones((2, 3), "float32")}, directory / "model.safetensors")
    >>> checkpoint = SafetensorsCheckpoint(directory)
    >>> checkpoint.shape("w"), checkpoint.get("w").sum()
    ((2, 3), np.float32(6.0))
    """

    def __init__(self, directory, aliases=(), expert_projections=EXPERT_PROJECTIONS):
        self.directory = Path(directory)
        self._weight_map = _weight_map(self.directory)
        self._aliases = tuple(aliases)
        gate, up, down = expert_projections
        self._stacked_rows = {gate: 0, up: 1, down: None}
        names = "|".join(re.escape(name) for name in expert_projections)
        self._per_expert_name = re.compile(
            r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\."
            rf"(?P<projection>{names})\.weight$"
        )
        self._files = {}
        # The stored tensors read so far (what unused-tensor checks compare).
        self.read_names = set()
        try:
            for file_name in sorted(set(self._weight_map.values())):
                self._open(file_name)  # Checks its header and size now.
        except BaseException:
            self.close()
            raise

    def _source(self, name):
        """Where tensor `name` is stored: `(stored name, expert, rows)`.

        `expert` and `rows` are None for a tensor stored as it is, and
        locate one expert's slice in a stacked tensor otherwise.
        """
        candidates = [name] + [
            name.replace(old, new) for old, new in self._aliases if old in name
        ]
        for candidate in candidates:
            if candidate in self._weight_map:
                return candidate, None, None
        for candidate in candidates:
            fused = self._fused_source(candidate)
            if fused is not None:
                return fused
        return None

    def __contains__(self, name):
        return self._source(name) is not None

    def keys(self):
        """The names of the tensors stored in the checkpoint."""
        return list(self._weight_map)

    def file_of(self, name):
        """The file (relative to the directory) that stores tensor `name`."""
        return self._weight_map[name]

    def _open(self, file_name):
        if file_name not in self._files:
            self._files[file_name] = SafetensorsFile(self.directory / file_name)
        return self._files[file_name]

    def _fused_source(self, name):
        """`(stacked tensor name, expert, row slice)` for a per-expert name."""
        match = self._per_expert_name.match(name)
        if match is None:
            return None
        prefix, expert = match["prefix"], int(match["expert"])
        half = self._stacked_rows[match["projection"]]
        if half is not None:
            stacked = f"{prefix}.gate_up_proj"
            if stacked not in self._weight_map:
                return None
            rows = self._shape_of(stacked)[1] // 2
            start = half * rows
            return stacked, expert, slice(start, start + rows)
        stacked = f"{prefix}.down_proj"
        if stacked not in self._weight_map:
            return None
        return stacked, expert, slice(None)

    def _info(self, name):
        file = self._open(self._weight_map[name])
        try:
            return file.tensor(name)
        except KeyError:
            raise ConversionError(
                f"{INDEX_FILE} in {str(self.directory)!r} lists tensor "
                f"`{name}` in {self._weight_map[name]}, which does not hold it."
            ) from None

    def _shape_of(self, name):
        return self._info(name).shape

    def shape(self, name):
        """The shape of tensor `name`, read from the file header only."""
        stored, expert, rows = self._source(name)
        if expert is None:
            return self._shape_of(stored)
        shape = self._shape_of(stored)[1:]
        if rows.start is not None:
            shape = (rows.stop - rows.start,) + shape[1:]
        return shape

    def dtype(self, name):
        """The NumPy dtype tensor `name` is stored in (`bfloat16` from
        `ml_dtypes` for BF16), from the file header only."""
        stored, _, _ = self._source(name)
        return self._info(stored).dtype

    def get(self, name):
        """Tensor `name` as a NumPy array of its stored dtype, read now.

        Only its bytes are read (one expert's rows of a stacked tensor, for
        a per-expert name), into a new array that nothing else holds.
        """
        stored, expert, rows = self._source(name)
        self.read_names.add(stored)
        self._info(stored)
        file = self._open(self._weight_map[stored])
        if expert is None:
            return file.read(stored)
        return file.read(stored, expert, rows)

    def num_elements(self):
        """The number of values in all tensors, from the file headers."""
        return sum(self._info(name).size for name in self._weight_map)

    def largest_variable_size(self):
        """The values of the largest variable the tensors load into.

        Read from the file headers: routed experts are stacked into one
        variable per projection and layer (`E` per-expert tensors, or half
        of a stacked `gate_up_proj`); any other tensor is one variable.
        `from_transformers` adds its staging to the memory guard's need.
        """
        sizes = {}
        for name in self._weight_map:
            size = self._info(name).size
            match = self._per_expert_name.match(name)
            if match is not None:
                key = (match["prefix"], match["projection"])
                sizes[key] = sizes.get(key, 0) + size
            elif name.endswith(".experts.gate_up_proj"):
                sizes[name] = size // 2
            else:
                sizes[name] = size
        return max(sizes.values(), default=0)

    def close(self):
        """Close the files."""
        for file in self._files.values():
            file.close()
        self._files.clear()


class TensorInfo(NamedTuple):
    """Where a safetensors file stores one tensor.

    Attributes:
        dtype: the NumPy dtype of its values.
        shape: tuple of ints.
        offset: int, the file offset of its first byte.
        nbytes: int, its size in bytes.
    """

    dtype: np.dtype
    shape: tuple
    offset: int
    nbytes: int

    @property
    def size(self):
        """The number of values."""
        return math.prod(self.shape)


class SafetensorsFile:
    """One `.safetensors` file: its checked header, and tensors read on demand.

    The header is read and checked when the file is opened: known dtypes,
    byte ranges that match each shape and lie inside the file. A file cut
    short (an interrupted download or copy) is refused there, naming the
    first tensor it lacks, before any tensor is read. `read` then reads one
    tensor's bytes (or one expert's rows of a stacked tensor) straight into
    a new array of the stored dtype, with ordinary reads: no memory map, and
    no copy in another dtype.

    Args:
        path: str or path of the file.

    Raises:
        ConversionError: if the file is not a safetensors file, or its
            header describes bytes the file does not hold (the message
            names the file, and the tensor).

    Example:

    >>> import pathlib, tempfile
    >>> import ml_dtypes
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> values = np.arange(6).reshape(2, 3).astype(ml_dtypes.bfloat16)
    >>> save_file({"w": values}, path)
    >>> file = SafetensorsFile(path)
    >>> file.names(), file.tensor("w").shape
    (['w'], (2, 3))
    >>> file.read("w").dtype, file.read("w", 1).tolist()
    (dtype(bfloat16), [3.0, 4.0, 5.0])
    >>> file.close()
    """

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)
        try:
            self._tensors = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _refuse(self, reason):
        raise ConversionError(f"{str(self.path)!r} {reason}")

    def _read_header(self):
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            self._refuse(
                f"is not a safetensors file: it has {size} bytes, fewer than "
                "the 8 that give its header's size."
            )
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > MAX_HEADER_BYTES or 8 + header_bytes > size:
            self._refuse(
                f"is not a complete safetensors file: its header claims "
                f"{header_bytes:,} bytes but the file has {size:,} bytes in "
                "all (truncated, or not safetensors)."
            )
        try:
            header = json.loads(self._file.read(header_bytes).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            self._refuse(f"has a header that is not valid JSON: {error}")
        if not isinstance(header, dict):
            self._refuse("has a header that is not a JSON object.")
        header.pop("__metadata__", None)
        data_start = 8 + header_bytes
        available = size - data_start
        tensors = {}
        for name, entry in header.items():
            tensors[name] = self._tensor_info(name, entry, data_start, available)
        return tensors

    def _tensor_info(self, name, entry, data_start, available):
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            self._refuse(
                f"describes tensor `{name}` as {entry!r}: expected a dtype "
                f"among {', '.join(SAFETENSORS_DTYPES)}, a shape and two "
                "data_offsets."
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
            self._refuse(
                f"describes tensor `{name}` with shape {list(shape)} and "
                f"{entry['dtype']} values in bytes {begin}..{end}, which "
                "do not match."
            )
        if end > available:
            self._refuse(
                f"is truncated: tensor `{name}` ends at byte "
                f"{data_start + end:,} of a file of {data_start + available:,} "
                "bytes. Download or copy the file again."
            )
        return TensorInfo(dtype, shape, data_start + begin, nbytes)

    def names(self):
        """The names of the tensors, in header order."""
        return list(self._tensors)

    def tensor(self, name):
        """The `TensorInfo` of tensor `name` (raises `KeyError` if absent)."""
        return self._tensors[name]

    def read(self, name, index=None, rows=None):
        """Tensor `name`, or `[index]` of it, or `[index, rows]`, from disk.

        Args:
            name: str, the tensor.
            index: optional int, a position on its first axis.
            rows: optional `slice` (step 1) of the second axis, with `index`.

        Returns:
            A new NumPy array of the stored dtype.
        """
        info = self._tensors[name]
        shape, offset = info.shape, info.offset
        if index is not None:
            inner = shape[1:]
            offset += index * math.prod(inner) * info.dtype.itemsize
            shape = inner
            if rows is not None:
                start, stop, _ = rows.indices(shape[0])
                offset += start * math.prod(shape[1:]) * info.dtype.itemsize
                shape = (stop - start,) + shape[1:]
        array = np.empty(shape, dtype=info.dtype)
        self._read_into(array.reshape(-1).view(np.uint8), offset)
        return array

    def _read_into(self, buffer, offset):
        self._file.seek(offset)
        done, total = 0, buffer.nbytes
        view = memoryview(buffer)
        while done < total:
            count = self._file.readinto(view[done : done + _READ_CHUNK])
            if not count:
                self._refuse(
                    f"ended at byte {offset + done:,} while a tensor was read "
                    "(was it changed or cut short during loading?)."
                )
            done += count

    def close(self):
        """Close the file."""
        self._file.close()


def _weight_map(directory):
    """`{tensor name: file name}` for every tensor of the checkpoint."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        with open(index_path, encoding="utf-8") as file:
            try:
                index = json.load(file)
            except json.JSONDecodeError as error:
                raise ConversionError(
                    f"{index_path} is not valid JSON: {error}"
                ) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(
                f"{index_path} has no `weight_map` (tensor name -> shard file)."
            )
        missing = sorted(
            {shard for shard in weight_map.values()}
            - {path.name for path in directory.iterdir()}
        )
        if missing:
            raise ConversionError(
                f"The sharded checkpoint in {str(directory)!r} is missing "
                f"{', '.join(missing)}, listed in {INDEX_FILE}."
            )
        return dict(weight_map)
    files = [directory / SINGLE_FILE]
    if not files[0].is_file():
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        _refuse_without_safetensors(directory)
    weight_map = {}
    for path in files:
        file = SafetensorsFile(path)
        file.close()
        for name in file.names():
            weight_map[name] = path.name
    return weight_map


def _refuse_without_safetensors(directory):
    pickled = sorted(
        path.name
        for path in directory.iterdir()
        if path.suffix in PICKLE_SUFFIXES
    )
    if pickled:
        raise ConversionError(
            f"{str(directory)!r} holds only pickled weights "
            f"({', '.join(pickled)}), which keras-moe never reads: "
            "unpickling a file (`torch.load`) can run any code it contains. "
            "Convert the checkpoint to safetensors first, e.g. with "
            "transformers: `AutoModelForCausalLM.from_pretrained(directory)"
            ".save_pretrained(new_directory)` (safetensors is its default "
            "format), on a machine where you trust the file."
        )
    found = ", ".join(sorted(path.name for path in directory.iterdir()))
    raise ConversionError(
        f"{str(directory)!r} has no safetensors weights: expected "
        f"{SINGLE_FILE}, {INDEX_FILE} with its shards, or *.safetensors "
        f"files. Found: {found or 'nothing'}."
    )
