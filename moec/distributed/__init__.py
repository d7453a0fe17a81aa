"""Expert parallelism on torch.distributed: one artifact, its experts sharded over ranks.

    # every rank, e.g. under `torchrun --nproc-per-node 4`:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    model = moec.load("mixtral.moec", ep_group=dist.group.WORLD)   # compiled with ep=True
    y = model(x_of_this_rank)          # == the single-process model on x_of_this_rank
    dist.destroy_process_group()       # before exit: gloo aborts the process otherwise

Each rank holds the shared weights and a contiguous range of experts; tokens travel with
torch.distributed's all-to-all (gloo on CPUs, NCCL on GPUs); every FLOP runs in the artifact's
TVM kernels. See docs/expert-parallel.md for the design and its limits.
"""

from moec.distributed.errors import DistributedError
from moec.distributed.exchange import LayerTimes, Timer
from moec.distributed.model import EPModel, load_ep
from moec.distributed.plan import shard_bounds

__all__ = ["DistributedError", "EPModel", "LayerTimes", "Timer", "load_ep", "shard_bounds"]
