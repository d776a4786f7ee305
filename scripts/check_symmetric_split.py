"""On a GPU: the symmetric 3-block kernel of the MLP at N=512 against the float64 CPU kernel built without the split."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import torch

from ntk_bench import implementations
from ntk_bench.bench.zoo import architectures
from ntk_bench.implementations.core import contractions as base

torch.backends.cuda.matmul.allow_tf32 = False
a = architectures.build("mlp", seed=0, in_features=784, width=512, depth=2, out=10)
x = architectures.inputs(a, 512, seed=1)
base.SYMMETRIC_SPLIT_MIN_ROWS = 10**9
ref = implementations.get("explicit_mlp").compute(a.model.double(), x.double())
base.SYMMETRIC_SPLIT_MIN_ROWS = 2048
m = a.model.float().cuda()
for name in ("structured", "explicit_mlp"):
    k = implementations.get(name).compute(m, x.cuda()).double().cpu()
    print(name, "N=512 split vs unsplit float64: rel err %.2e" % float((k - ref).norm() / ref.norm()),
          "lower-left block %.2e" % float((k[256:, :256] - ref[256:, :256]).norm() / ref[256:, :256].norm()))
