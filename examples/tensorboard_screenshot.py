"""Screenshots of the router statistics in TensorBoard, for the docs.

Trains a small model whose MoE layers route the same skewed tokens three
ways, with `keras_moe.callbacks.RouterStats` writing their statistics:
- `no_balancing` (`aux_loss_weight=0`): collapses onto a few experts,
- `switch_loss` (the Switch load-balancing loss, `aux_loss_weight=0.1`),
- `bias_balancing` (DeepSeek-V3's aux-loss-free bias, `bias_update_rate`),
the three side by side in one model (`x + moe_a(x) + moe_b(x) + moe_c(x)`),
so they see the same inputs. `tensorboard --logdir` runs on a free local
port meanwhile (started first, it starts up while the model trains); once
it serves the last write, headless Chromium (Debian's `chromium`) renders
its pages to PNG files, and the server is stopped:
- `router_stats_heatmap.png`: the Images dashboard, the layers x experts
  load heatmap (one row per layer; 1 = an expert's even share);
- `router_stats_scalars.png`: the Scalars dashboard filtered on `maxvio`.

`--log-dir` with existing logs skips the training and screenshots those.
Chromium: `apt-get install -y --no-install-recommends chromium` on Debian
and Ubuntu (`make install` does it where it can), or `--chromium PATH`.

Usage:

    python examples/tensorboard_screenshot.py
    python examples/tensorboard_screenshot.py --out-dir /tmp/shots --width 1000
    python examples/tensorboard_screenshot.py --log-dir logs/router_stats
    python examples/tensorboard_screenshot.py --help
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
INSTALL_HINT = (
    "headless Chromium is needed: `apt-get install -y --no-install-recommends "
    "chromium` (Debian, Ubuntu; `make install` does it where it can), or "
    "pass --chromium PATH"
)
# The dashboards: the URL fragment TensorBoard reads its state from, and
# a window size that holds what matters.
PAGES = {
    "heatmap": ("#images", (1200, 500)),
    "scalars": ("#scalars&tagFilter=maxvio&_smoothingWeight=0", (1200, 760)),
}
NUM_EXPERTS, HIDDEN = 8, 16


def positive_int(value):
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--out-dir",
        default=os.path.join(ROOT, "docs", "images"),
        help="where the PNG files go (default: docs/images)",
    )
    parser.add_argument(
        "--log-dir",
        help="screenshot these TensorBoard logs instead of training "
        "(default: train into a temporary directory)",
    )
    parser.add_argument(
        "--pages",
        default=",".join(PAGES),
        help=f"comma-separated, of {', '.join(PAGES)} (default: all)",
    )
    parser.add_argument("--steps", type=positive_int, default=300,
                        help="training steps, batches of 16 sequences (default: %(default)s)")
    parser.add_argument("--update-freq", type=positive_int, default=25,
                        help="RouterStats writes every that many steps (default: %(default)s)")
    parser.add_argument("--width", type=positive_int,
                        help="window width in pixels (default: per page)")
    parser.add_argument("--height", type=positive_int,
                        help="window height in pixels (default: per page)")
    parser.add_argument(
        "--render-ms",
        type=positive_int,
        default=8000,
        help="virtual time Chromium gives each page to load and render "
        "(default: %(default)s)",
    )
    parser.add_argument("--chromium", help="the browser binary (default: "
                        f"the first of {', '.join(CHROMIUM_NAMES)} on PATH)")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="a few steps and a short render time, for the tests",
    )
    args = parser.parse_args(argv)
    args.pages = [page.strip() for page in args.pages.split(",") if page.strip()]
    unknown = sorted(set(args.pages) - set(PAGES))
    if unknown or not args.pages:
        parser.error(f"--pages must name some of {', '.join(PAGES)}; got {unknown}")
    if args.fast:
        args.steps = min(args.steps, 40)
        args.update_freq = min(args.update_freq, 10)
        args.render_ms = min(args.render_ms, 3000)
    return args


def find_chromium(path=None):
    """The Chromium binary, or a `SystemExit` that says how to install it."""
    candidates = [path] if path else CHROMIUM_NAMES
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    raise SystemExit(f"No Chromium found ({', '.join(candidates)}): {INSTALL_HINT}.")


def skewed_tokens(rng, num_sequences, length=32):
    """Tokens sharing one strong direction: routers start out skewed."""
    shared = np.linspace(1.0, -1.0, HIDDEN) * 3.0
    x = rng.normal(size=(num_sequences, length, HIDDEN)) + shared
    mixing = np.random.default_rng(1234).normal(size=(HIDDEN, HIDDEN))
    return x.astype("float32"), np.sin(x @ mixing / 4.0).astype("float32")


def train(log_dir, steps, update_freq):
    """Train the three-router model with `RouterStats` writing to log_dir."""
    import keras

    from keras_moe.callbacks import RouterStats
    from keras_moe.callbacks import collect_router_stats
    from keras_moe.layers import SparseMoE

    keras.utils.set_random_seed(0)
    balancing = {
        "no_balancing": dict(aux_loss_weight=0.0),
        "switch_loss": dict(aux_loss_weight=0.1),
        "bias_balancing": dict(
            aux_loss_weight=0.0, score_function="sigmoid", bias_update_rate=0.01
        ),
    }
    inputs = keras.Input((None, HIDDEN))
    hidden = inputs
    for name, arguments in balancing.items():
        moe = SparseMoE(
            NUM_EXPERTS, 32, top_k=2, capacity_factor=None, name=name, **arguments
        )
        hidden = hidden + moe(inputs)
    model = keras.Model(inputs, keras.layers.Dense(HIDDEN)(hidden))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    x, y = skewed_tokens(np.random.default_rng(0), 16 * steps)
    print(f"Training {steps} steps on {keras.backend.backend()}, "
          f"router statistics every {update_freq} steps -> {log_dir}", flush=True)
    start = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[RouterStats(log_dir, update_freq=update_freq)],
    )
    print(f"  trained in {time.perf_counter() - start:.1f} s; last epoch:", flush=True)
    for path, stats in collect_router_stats(model).items():
        print(f"  {path:>15}: MaxVio {stats['maxvio']:.2f}, "
              f"router entropy {stats['router_entropy']:.2f}", flush=True)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tensorboard_command():
    beside = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if os.access(beside, os.X_OK):
        return [beside]
    return [sys.executable, "-m", "tensorboard.main"]


class TensorBoardServer:
    """`tensorboard --logdir` on a free local port, for a `with` block.

    With `reload_interval` (seconds) it keeps reading the logs, so it can be
    started before the training that writes them: its start-up (mostly
    imports) then overlaps the training. With 0 it reads them once.
    """

    def __init__(self, log_dir, cwd=None, reload_interval=0):
        self.log_dir = log_dir
        self.cwd = cwd
        self.reload_interval = reload_interval
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process = None
        self._log = None

    def __enter__(self):
        self._log = tempfile.TemporaryFile()
        command = tensorboard_command() + [
            "--logdir", self.log_dir,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--reload_interval", str(self.reload_interval),
        ]
        print(f"Starting TensorBoard on {self.url}", flush=True)
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd
        )
        return self

    def _get(self, route):
        with urllib.request.urlopen(self.url + route, timeout=5) as response:
            return json.loads(response.read())

    def _heatmap_steps(self):
        steps = []
        for run, tags in self._get("data/plugin/images/tags").items():
            for tag in tags:
                if tag.endswith("expert_load_heatmap"):
                    query = urllib.parse.urlencode(dict(run=run, tag=tag, sample=0))
                    images = self._get(f"data/plugin/images/images?{query}")
                    steps.extend(image["step"] for image in images)
        return steps

    def wait_for_heatmap(self, last_step=None, timeout=180):
        """Wait until the server serves a heatmap (of step `last_step`).

        The heatmap is the last summary of each `RouterStats` write, so
        everything written before it is loaded too.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.seek(0)
                output = self._log.read().decode(errors="replace")
                raise SystemExit(f"TensorBoard exited:\n{output[-3000:]}")
            try:
                steps = self._heatmap_steps()
            except (urllib.error.URLError, OSError, ValueError):
                steps = []  # Not up yet.
            if steps and (last_step is None or max(steps) >= last_step):
                return
            time.sleep(0.5)
        raise SystemExit(
            f"TensorBoard served no router heatmap"
            f"{'' if last_step is None else f' of step {last_step}'} "
            f"within {timeout} s (logs: {self.log_dir})"
        )

    def __exit__(self, *exc_info):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
        print("TensorBoard stopped", flush=True)


def screenshot(chromium, url, path, width, height, render_ms):
    """Render `url` in headless Chromium into the PNG file `path`."""
    if os.path.exists(path):
        os.remove(path)
    with tempfile.TemporaryDirectory() as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",  # Chromium refuses to run as root otherwise.
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--mute-audio",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={render_ms}",
            f"--screenshot={path}",
            url,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if result.returncode != 0 or not os.path.exists(path):
        raise SystemExit(
            f"Chromium failed ({result.returncode}) on {url}:\n"
            f"{result.stderr[-3000:]}"
        )


def main(argv=None):
    args = parse_args(argv)
    chromium = find_chromium(args.chromium)
    os.makedirs(args.out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        if args.log_dir is None:
            # Served as the relative `logs`, the name TensorBoard shows;
            # started first, so that it starts up while the model trains.
            server = TensorBoardServer("logs", cwd=scratch, reload_interval=1)
            last_step = args.steps // args.update_freq * args.update_freq
        elif os.path.isdir(args.log_dir):
            server = TensorBoardServer(os.path.abspath(args.log_dir))
            last_step = None
        else:
            raise SystemExit(f"--log-dir {args.log_dir!r} is not a directory")
        with server:
            if args.log_dir is None:
                train(os.path.join(scratch, "logs"), args.steps, args.update_freq)
            server.wait_for_heatmap(last_step)
            for page in args.pages:
                fragment, (width, height) = PAGES[page]
                path = os.path.join(args.out_dir, f"router_stats_{page}.png")
                start = time.perf_counter()
                screenshot(chromium, server.url + fragment, path,
                           args.width or width, args.height or height,
                           args.render_ms)
                print(f"  {page}: {path} ({os.path.getsize(path) / 1024:.0f} KB, "
                      f"{time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
