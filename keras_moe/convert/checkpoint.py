"""Reading Hugging Face checkpoint directories: config and safetensors.

Only safetensors files are read, through memory-mapped `safe_open`: a
tensor is read from disk when asked for, so a checkpoint is never held in
memory as a whole. Pickled checkpoints (`pytorch_model.bin`, `*.pt`,
`*.pth`, `*.ckpt`) are refused: unpickling a file can run any code it
contains.
"""

import json
import re
from pathlib import Path

import numpy as np

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# The per-expert names of the gate, up and down projections in transformers
# checkpoints, unless a family names them otherwise.
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


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
    `*.safetensors` file of the directory. Files are opened lazily with
    `safetensors.safe_open` and tensors come back as NumPy arrays.

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
            are never read), or a shard the index lists is missing.

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
            from safetensors import safe_open

            self._files[file_name] = safe_open(
                str(self.directory / file_name), framework="numpy"
            )
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

    def _shape_of(self, name):
        file = self._open(self._weight_map[name])
        return tuple(file.get_slice(name).get_shape())

    def shape(self, name):
        """The shape of tensor `name`, read from the file header only."""
        stored, expert, rows = self._source(name)
        if expert is None:
            return self._shape_of(stored)
        shape = self._shape_of(stored)[1:]
        if rows.start is not None:
            shape = (rows.stop - rows.start,) + shape[1:]
        return shape

    def get(self, name):
        """Tensor `name` as a NumPy array (read from disk now)."""
        stored, expert, rows = self._source(name)
        self.read_names.add(stored)
        file = self._open(self._weight_map[stored])
        if expert is None:
            return file.get_tensor(stored)
        return np.asarray(file.get_slice(stored)[expert])[rows]

    def num_elements(self):
        """The number of values in all tensors, from the file headers."""
        total = 0
        for name in self._weight_map:
            total += int(np.prod(self._shape_of(name), dtype="int64"))
        return total

    def close(self):
        """Release the memory maps."""
        self._files.clear()


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
    from safetensors import safe_open

    weight_map = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as file:
            for name in file.keys():
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
