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
run(); run()
from torch.profiler import ProfilerActivity, profile

with profile(activities=[ProfilerActivity.CPU]) as prof:
    run(); run()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
