import cProfile
import io
import pstats
import time

import torch

torch.set_num_threads(1)
try:
    from ntk_bench.bench.execution.worker import _keep_freed_memory
except ImportError:
    from ntk_bench.bench.worker import _keep_freed_memory
_keep_freed_memory()
from ntk_bench.implementations import get

try:
    from ntk_bench.bench.zoo import architectures
except ImportError:
    from ntk_bench.bench import architectures
arch = architectures.build("resnet18", image=224, out=10)
x = architectures.inputs(arch, 4)
run, _ = get("structured").prepare(arch.model, x, None, "full")
for i in range(2):
    c0 = time.process_time(); run(); print("call", i, round(time.process_time() - c0, 3), flush=True)
pr = cProfile.Profile(); pr.enable(); run(); run(); pr.disable()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30); print(s.getvalue())
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45); print(s.getvalue())
