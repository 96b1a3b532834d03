"""How busy the machine is: the CPU other processes take while we measure.

Timings on a shared machine measure the competition as much as the code, so
every benchmark reports the cores that other processes kept busy while it
timed (read from /proc/stat, minus the benchmark's own CPU time), checks the
machine before it starts, and warns when the figures are disturbed.
"""

import os
import resource
import time

# Other processes' cores above which timings are reported as disturbed:
# ratios are only meaningful when this is near zero.
BUSY_CORES = 0.1


def busy_cpu_seconds():
    """CPU time every process on the machine has used since boot."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, _, _, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf(
        "SC_CLK_TCK"
    )


def own_cpu_seconds(who):
    """CPU time of this process (`"self"`) or its ended children."""
    usage = resource.getrusage(
        resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN
    )
    return usage.ru_utime + usage.ru_stime


class OtherCpuLoad:
    """Measures, over a `with` block, the CPU that other processes used.

    Args:
        own: whose CPU time is ours: `"children"` (the block runs worker
            subprocesses and waits for them) or `"self"` (it measures in
            this process).

    After the block: `core_seconds` (CPU seconds used by anything but us),
    `wall_s` and `cores` (their ratio: the cores kept busy on average).
    """

    def __init__(self, own="children"):
        self.own = own
        self.core_seconds = self.wall_s = self.cores = 0.0

    def __enter__(self):
        self._busy = busy_cpu_seconds()
        self._own = own_cpu_seconds(self.own)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info):
        self.wall_s = time.perf_counter() - self._started
        self.core_seconds = max(
            0.0,
            (busy_cpu_seconds() - self._busy)
            - (own_cpu_seconds(self.own) - self._own),
        )
        self.cores = self.core_seconds / max(self.wall_s, 1e-9)


def check_idle(refuse=False, sample_s=1.0, busy_cores=BUSY_CORES):
    """Sample the machine before measuring; warn (or stop) when it is busy.

    Args:
        refuse: exit instead of warning when the machine is busy.
        sample_s: how long to watch the machine.
        busy_cores: cores other processes may keep busy.

    Returns:
        the cores other processes kept busy during the sample.
    """
    with OtherCpuLoad(own="self") as load:
        time.sleep(sample_s)
    if load.cores > busy_cores:
        message = (
            f"other processes keep {load.cores:.2f} of {os.cpu_count()} cores "
            f"busy; timings on a busy machine measure the competition"
        )
        if refuse:
            raise SystemExit(f"Refusing to run: {message} (--require-idle).")
        print(f"WARNING: {message}.", flush=True)
    return load.cores


def warn_if_busy(cores_by_name, busy_cores=BUSY_CORES):
    """Print the cores others used while timing; warn when above the bound.

    Args:
        cores_by_name: dict name (e.g. a backend) -> cores kept busy.
        busy_cores: the bound.
    """
    print("\nCPU used by other processes while timing (cores, average): "
          + ", ".join(f"{name} {cores:.2f}"
                      for name, cores in cores_by_name.items()))
    if any(cores > busy_cores for cores in cores_by_name.values()):
        print("WARNING: the machine was not idle; timings may be disturbed. "
              "Re-run on an idle machine.")


def add_idle_argument(parser):
    """The `--require-idle` flag every timing benchmark takes."""
    parser.add_argument(
        "--require-idle", action="store_true",
        help="stop instead of warning when other processes keep the CPU "
        "busy before the run",
    )
