"""What every benchmark script here shares; each script keeps what it measures.

- `processes`: one worker subprocess per Keras backend (`spawn_worker`,
  `emit`), the backends' names;
- `load`: the CPU other processes take (`OtherCpuLoad`), checked before a
  run (`check_idle`) and reported after it (`warn_if_busy`);
- `timing`: warm-up, candidates timed side by side in rounds
  (`time_rounds`), medians, quartiles and paired ratios;
- `steps`: compiled (or eager) steps per backend: `gradient_step`,
  `sgd_step`, `function_steps`;
- `memory`: peak memory of one step, bytes of variables;
- `profile`: JAX op time attributed to source functions;
- `report`: ratio targets, tables, JSON output;
- `layer_workload`: the sizes, seed and inputs of the layer benchmarks.

Scripts run as `python benchmarks/<script>.py`, which puts this folder on
`sys.path`, so they `import harness`. Nothing here imports a backend at
module level: the parent process of a benchmark never loads one.
"""

from harness.layer_workload import SEED
from harness.layer_workload import Sizes
from harness.layer_workload import make_inputs
from harness.layer_workload import sizes_for
from harness.load import OtherCpuLoad
from harness.load import add_idle_argument
from harness.load import check_idle
from harness.load import warn_if_busy
from harness.memory import LOW_MMAP_MALLOC_ENV
from harness.memory import min_step_memory
from harness.memory import variable_bytes
from harness.processes import BACKENDS
from harness.processes import emit
from harness.processes import parse_backends
from harness.processes import single_thread_env
from harness.processes import spawn_worker
from harness.profile import profile_jax_step
from harness.report import Ratio
from harness.report import add_json_argument
from harness.report import format_table
from harness.report import markdown_table
from harness.report import mib
from harness.report import write_json
from harness.steps import function_steps
from harness.steps import gradient_step
from harness.steps import sgd_step
from harness.steps import training_loss
from harness.timing import median_ms
from harness.timing import meets
from harness.timing import quartiles
from harness.timing import time_rounds
from harness.timing import warm_up
