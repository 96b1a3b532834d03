"""Every guide runs top to bottom, and its notebook matches its script.

The guides in `guides/` are jupytext percent-format scripts, each with the
`.ipynb` generated from it (`jupytext --to ipynb guides/NAME.py`). Here each
one runs as a script in a subprocess with `KERAS_MOE_GUIDE_FAST=1`, the
guides' fast mode (fewer steps, smaller models, no download), in a scratch
directory.

Running a guide costs tens of seconds, so each guide runs in one backend's
pytest run (`GUIDE_BACKENDS`, spread over the three runs; see
`tests/script_backends.py`); every run checks the notebooks, badges and
links, which cost nothing.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from script_backends import runs_on

ROOT = Path(__file__).resolve().parent.parent
GUIDES_DIR = ROOT / "guides"
GUIDES = sorted(path.stem for path in GUIDES_DIR.glob("*.py"))
FAST_MODE_VARIABLE = "KERAS_MOE_GUIDE_FAST"
COLAB_PREFIX = "https://colab.research.google.com/github/keras-moe/keras-moe/blob/main/guides/"

# What each guide must print, beyond running without error: evidence that
# its central step happened.
EXPECTED_OUTPUT = {
    "getting_started": ["moe_aux_loss", "SoftMoE"],
    "train_mixtral_small": ["Validation loss", "Reloaded"],
    "routing_strategies": ["expert_choice", "maxvio"],
    "router_stats_tensorboard": ["router/expert_load_heatmap", "collapsed"],
    "distributed_training": ["8 devices", "expert parallel 2x4"],
    "checkpoint_conversion": ["max |logits difference|"],
    "switch_seq2seq": ["fine-tuning", "Exact match", "dropped_fraction"],
}


# The pytest run that executes each guide (JAX compiles the large guides'
# models slowly on a CPU, so it gets the one that needs JAX).
GUIDE_BACKENDS = {
    "getting_started": "tensorflow",
    "train_mixtral_small": "torch",
    "routing_strategies": "torch",
    "router_stats_tensorboard": "tensorflow",
    "distributed_training": "jax",
    "checkpoint_conversion": "torch",
    "switch_seq2seq": "torch",
}


def test_the_guides_are_the_published_set():
    assert set(GUIDES) == set(EXPECTED_OUTPUT) == set(GUIDE_BACKENDS)


@pytest.mark.parametrize(
    "guide",
    [
        pytest.param(guide, marks=runs_on(GUIDE_BACKENDS.get(guide, "jax")))
        for guide in GUIDES
    ],
)
def test_guide_runs_in_fast_mode(guide, tmp_path):
    backend = keras.backend.backend()
    env = dict(os.environ, KERAS_BACKEND=backend, **{FAST_MODE_VARIABLE: "1"})
    # The guides import the checkout's keras_moe, wherever they run.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env.setdefault("MPLBACKEND", "Agg")
    result = subprocess.run(
        [sys.executable, str(GUIDES_DIR / f"{guide}.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"{guide}.py failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    for expected in EXPECTED_OUTPUT[guide]:
        assert expected in output, (
            f"{guide}.py did not print {expected!r}:\n{result.stdout[-3000:]}"
        )


@pytest.mark.parametrize("guide", GUIDES)
def test_notebook_is_generated_from_the_script(guide):
    jupytext = pytest.importorskip("jupytext")
    script = jupytext.read(GUIDES_DIR / f"{guide}.py")
    notebook_path = GUIDES_DIR / f"{guide}.ipynb"
    assert notebook_path.exists(), (
        f"guides/{guide}.ipynb is missing: jupytext --to ipynb guides/{guide}.py"
    )
    notebook = jupytext.read(notebook_path)
    as_cells = lambda nb: [(c.cell_type, c.source) for c in nb.cells]  # noqa
    assert as_cells(script) == as_cells(notebook), (
        f"guides/{guide}.ipynb is out of date: "
        f"jupytext --update --to ipynb guides/{guide}.py"
    )
    # Committed without outputs, so that Colab runs it fresh.
    raw = json.loads(notebook_path.read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{guide}.ipynb has outputs"


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_opens_in_colab_and_installs_keras_moe(guide):
    jupytext = pytest.importorskip("jupytext")
    cells = jupytext.read(GUIDES_DIR / f"{guide}.py").cells
    assert cells[0].cell_type == "markdown"
    assert cells[0].source.startswith("# "), "the first cell holds the title"
    assert f"{COLAB_PREFIX}{guide}.ipynb" in cells[0].source
    first_code = next(c.source for c in cells if c.cell_type == "code")
    assert "pip" in first_code and "install" in first_code
    assert "keras_moe" in first_code  # Installs only when it is missing.
    source = (GUIDES_DIR / f"{guide}.py").read_text()
    assert FAST_MODE_VARIABLE in source


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_is_linked_from_the_readmes(guide):
    for readme in (ROOT / "README.md", GUIDES_DIR / "README.md"):
        links = re.findall(r"\]\(([^)]+)\)", readme.read_text())
        assert any(
            link.rstrip("/").endswith(f"{guide}.ipynb")
            or link.rstrip("/").endswith(f"{guide}.py")
            for link in links
        ), f"{readme.relative_to(ROOT)} does not link the {guide} guide"
