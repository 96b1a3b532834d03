"""examples/tensorboard_screenshot.py renders TensorBoard's router pages.

The script trains a small model with `RouterStats`, serves the logs with a
real `tensorboard` and screenshots its pages in headless Chromium; here it
runs in its fast mode and the PNG files are checked: the requested size,
not a blank page, and the heatmap's colours on the Images page. What it
does is the same on every backend, so it runs in the TensorFlow pytest run
only (`tests/script_backends.py`). Chromium is a requirement of the test suite (`make install` installs
Debian's `chromium`); without it the test fails, saying how to install it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from script_backends import runs_on

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "tensorboard_screenshot.py"
DOC_IMAGES = ("router_stats_heatmap.png", "router_stats_scalars.png")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
WIDTH, HEIGHT = 900, 560
# The darkest and the brightest colour of the heatmap's scale (viridis).
VIRIDIS_ENDS = np.array([[68, 1, 84], [253, 231, 37]])


def load_png(path):
    from PIL import Image

    with open(path, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int64)


def pixels_near(image, colour, tolerance=24):
    return int(np.sum(np.all(np.abs(image - colour) <= tolerance, axis=-1)))


@runs_on("tensorflow")
def test_screenshots_show_the_router_pages(tmp_path):
    if not any(shutil.which(name) for name in CHROMIUM_NAMES):
        pytest.fail(
            "headless Chromium is missing: install it with `apt-get install -y "
            "--no-install-recommends chromium` (Debian, Ubuntu), or run "
            "`make install`, which does it where apt-get is available"
        )
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--fast",
            f"--out-dir={tmp_path}",
            f"--width={WIDTH}",
            f"--height={HEIGHT}",
        ],
        env=dict(os.environ, KERAS_BACKEND=keras.backend.backend()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "TensorBoard stopped" in result.stdout

    images = {}
    for page in ("heatmap", "scalars"):
        path = tmp_path / f"router_stats_{page}.png"
        assert path.exists(), f"{path.name} not written:\n{result.stdout}"
        image = load_png(path)
        assert image.shape == (HEIGHT, WIDTH, 3), page
        # A page that did not render is one or two flat colours.
        colours = np.unique(image.reshape(-1, 3), axis=0)
        assert len(colours) > 100, f"{page}: {len(colours)} colours, a blank page?"
        assert image.std() > 20, f"{page}: nearly uniform, a blank page?"
        images[page] = image

    # The heatmap and its colour bar: both ends of the scale, in blocks of
    # pixels that TensorBoard's own orange and grey never produce.
    for colour in VIRIDIS_ENDS:
        assert pixels_near(images["heatmap"], colour) > 200, (
            f"the Images page shows no heatmap (no pixels near {colour})"
        )
        assert pixels_near(images["scalars"], colour) == 0


def test_the_readme_and_the_guide_show_the_committed_screenshots():
    readme = (ROOT / "README.md").read_text()
    guide = (ROOT / "guides" / "router_stats_tensorboard.py").read_text()
    for name in DOC_IMAGES:
        path = ROOT / "docs" / "images" / name
        assert path.exists(), f"docs/images/{name} is missing"
        assert path.stat().st_size < 300_000, f"docs/images/{name} is too large"
        assert f"](docs/images/{name})" in readme
        assert f"/main/docs/images/{name})" in guide
