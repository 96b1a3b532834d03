"""Finding and reading the preset JSON files."""

import copy
import difflib
import functools
import json
from pathlib import Path

# Every preset file holds these entries (`published`, `training`, `tokenizer`
# and `notes` are optional).
REQUIRED_ENTRIES = ("name", "description", "reference", "backbone")


def presets_directory():
    """The folder holding the preset JSON files.

    An installed wheel ships them inside the package, in
    `keras_moe/presets/data/`; a source checkout (editable install or not)
    reads the repository's top-level `presets/` folder.

    Returns:
        A `pathlib.Path`.

    Example:

    >>> from keras_moe.presets import presets_directory
    >>> (presets_directory() / "mixtral_small.json").is_file()
    True
    """
    packaged = Path(__file__).resolve().parent / "data"
    if any(packaged.glob("*.json")):
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "presets"
    if any(checkout.glob("*.json")):
        return checkout
    raise FileNotFoundError(
        "No preset files found: looked for *.json in "
        f"{packaged} (installed package) and {checkout} (source checkout). "
        "Reinstall keras-moe, or run from a complete checkout."
    )


def names():
    """The names of all presets, sorted.

    Returns:
        A list of str, each accepted by `config`, `count_params` and `load`.

    Example:

    >>> from keras_moe import presets
    >>> "mixtral_small" in presets.names()
    True
    >>> [name for name in presets.names() if name.startswith("deepseek")]
    ['deepseek_small', 'deepseek_v2', 'deepseek_v2_lite', 'deepseek_v3']
    """
    return sorted(_records())


def info(name):
    """The whole record of a preset: its JSON file, as a dict.

    Entries: `name`; `description`; `reference` (the paper or model card it
    reproduces); `backbone` (the `MoEBackbone` config, as `config(name)`);
    for full-size presets `published` (`total_params`, `active_params` and
    what the published active count includes); `training` (suggested
    defaults: `sequence_length`, `batch_size`, `learning_rate`, ...);
    `tokenizer` (`"byte"` for presets that ship the byte-level tokenizer);
    `notes` (what is and is not reproduced).

    Args:
        name: str, a preset name (see `names()`).

    Returns:
        A new dict (changing it does not change the preset).

    Raises:
        ValueError: if `name` is not a preset; the message lists the closest
            names.

    Example:

    >>> from keras_moe import presets
    >>> record = presets.info("mixtral_8x7b")
    >>> record["reference"]
    'https://arxiv.org/abs/2401.04088'
    >>> record["published"]["total_params"]
    46700000000
    """
    records = _records()
    if not isinstance(name, str) or name not in records:
        raise ValueError(_unknown_name_message(name, sorted(records)))
    return copy.deepcopy(records[name])


def config(name):
    """The `MoEBackbone` config of a preset, without building anything.

    Args:
        name: str, a preset name (see `names()`).

    Returns:
        A new dict of `MoEBackbone` constructor arguments.

    Raises:
        ValueError: if `name` is not a preset; the message lists the closest
            names.

    Example:

    >>> from keras_moe import presets
    >>> backbone_config = presets.config("deepseek_v3")
    >>> backbone_config["num_layers"], backbone_config["num_experts"]
    (61, 256)
    >>> backbone_config["moe_options"]["score_function"]
    'sigmoid'
    """
    return info(name)["backbone"]


def _unknown_name_message(name, available):
    message = f"Unknown preset {name!r}."
    if isinstance(name, str):
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        if close:
            message += " Did you mean " + " or ".join(map(repr, close)) + "?"
    return message + " Available presets: " + ", ".join(available) + "."


@functools.lru_cache(maxsize=None)
def _records_in(directory):
    records = {}
    for path in sorted(Path(directory).glob("*.json")):
        with open(path, encoding="utf-8") as file:
            try:
                record = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"Preset file {path} is not valid JSON: {error}"
                ) from error
        _check_record(record, path)
        records[path.stem] = record
    return records


def _records():
    return _records_in(str(presets_directory()))


def _check_record(record, path):
    if not isinstance(record, dict):
        raise ValueError(f"Preset file {path} must hold a JSON object.")
    missing = [entry for entry in REQUIRED_ENTRIES if entry not in record]
    if missing:
        raise ValueError(f"Preset file {path} lacks the entries {missing}.")
    if record["name"] != path.stem:
        raise ValueError(
            f"Preset file {path} names itself {record['name']!r}; a preset's "
            "name must be its file name without `.json`."
        )
    if not isinstance(record["backbone"], dict):
        raise ValueError(f"The `backbone` entry of {path} must be an object.")
