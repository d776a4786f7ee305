import sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import numpy as np, torch, timm
from ntk_bench import reference
from ntk_bench.reference import translate
torch.manual_seed(0)
model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).double().eval()
x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
jax = reference._jax()
prog = translate.program(model, x)
reference._per_sample_forward(model, prog, x[:1])  # builds prog.forward (traced for N=1, not timed)
params, constants = translate.weights(model, prog)
xn = reference.to_numpy(x)
def t():
    return time.perf_counter(), time.process_time()
for opts in ({"xla_backend_optimization_level": 0}, {}, {"xla_backend_optimization_level": 0}, {}):
    w, c = t()
    low = prog.forward.lower(params, constants, xn); w1, c1 = t()
    comp = low.compile(opts); w2, c2 = t()
    y = np.asarray(comp(params, constants, xn)); w3, c3 = t()
    print(opts, f"lower {w1-w:.1f}/{c1-c:.1f} compile {w2-w1:.1f}/{c2-c1:.1f} run {w3-w2:.1f}/{c3-c2:.1f} (wall/cpu)", flush=True)
w, c = t(); reference._torch_forward64(model, x); w1, c1 = t()
print(f"torch forward64 {w1-w:.1f}/{c1-c:.1f}", flush=True)
