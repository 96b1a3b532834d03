"""`hf://org/name` handles: download a checkpoint from the Hugging Face Hub.

The download goes through `huggingface_hub` into its usual cache, and the
local directory is then read exactly like any other checkpoint directory.
Only the files conversion reads are fetched: configs, safetensors and
tokenizer files; pickled weights are never downloaded.
"""

from pathlib import Path

HF_PREFIX = "hf://"
# What a transformers checkpoint needs; `*.bin` and friends are left out.
CHECKPOINT_PATTERNS = (
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.txt",
)


def is_hub_handle(path):
    """Whether `path` is an `hf://org/name` handle.

    Example:

    >>> is_hub_handle("hf://mistralai/Mixtral-8x7B-v0.1"), is_hub_handle("./dir")
    (True, False)
    """
    return isinstance(path, str) and path.startswith(HF_PREFIX)


def parse_handle(handle):
    """`(repo_id, revision)` from `hf://org/name` or `hf://org/name@revision`.

    Example:

    >>> parse_handle("hf://Qwen/Qwen1.5-MoE-A2.7B@main")
    ('Qwen/Qwen1.5-MoE-A2.7B', 'main')
    """
    name = handle[len(HF_PREFIX) :]
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
    if name.count("/") != 1 or not all(name.split("/")):
        raise ValueError(
            "A Hugging Face handle is `hf://org/name` (optionally "
            f"`@revision`). Received: {handle!r}"
        )
    return name, revision


def download(handle, patterns=CHECKPOINT_PATTERNS):
    """Download a Hub repository (the files matching `patterns`).

    Args:
        handle: `hf://org/name` or `hf://org/name@revision`.
        patterns: glob patterns of the files to fetch.

    Returns:
        The local directory, a `pathlib.Path`.
    """
    repo_id, revision = parse_handle(handle)
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError(
            f"Loading {handle!r} needs `huggingface_hub`: "
            "`pip install huggingface_hub`."
        ) from error
    directory = huggingface_hub.snapshot_download(
        repo_id=repo_id, revision=revision, allow_patterns=list(patterns)
    )
    return Path(directory)
