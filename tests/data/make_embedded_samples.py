"""Wrote embedded_samples.safetensors with the pre-adapter engine (commit 3d37458), 2 CPU threads."""
import torch, dydit
torch.set_num_threads(2)
from dydit.dynamic import DynamicContext
from dydit.sampling import sample
from safetensors.torch import save_file
import dydit.assets as A, os
root = os.path.dirname(A.__file__)
out = {}
labels = [0, 3, 7]
for name in ["fmnist_dit", "fmnist_dydit_0.7", "fmnist_dydit_0.5"]:
    m = dydit.load(os.path.join(root, name)).eval()
    dyn = DynamicContext("fast") if getattr(m, "dynamic_config", None) is not None else None
    torch.manual_seed(0)
    out[name] = sample(m, labels, "ddim", 8, cfg_scale=4.0, seed=3, dyn=dyn)
    if dyn is not None:
        out[name + ".masked"] = sample(m, labels, "ddim", 8, cfg_scale=4.0, seed=3, dyn=DynamicContext("masked"))
    print(name, out[name].shape, getattr(m, "dynamic_config", None))
save_file({k: v.contiguous() for k, v in out.items()}, "tests/data/embedded_samples.safetensors")
