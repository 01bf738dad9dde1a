# torchrun --nproc-per-node 2 docs/examples/ddp_torchrun.py: DDP trains only the latent, so each
# step all-reduces d floats; every rank regenerates the fixed mapping from its seed (paper §2.2).
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import mapnet

dist.init_process_group("nccl" if (cuda := torch.cuda.is_available()) else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
mapped = mapnet.wrap(lambda: nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2)),
                     mapnet.MappingConfig(latent_dim=32)).to(device)  # fmt: skip
model = nn.parallel.DistributedDataParallel(mapped)  # no fixed tensor sent; the hook counts bytes
model.register_comm_hook(sent := [], lambda state, bucket: state.append(bucket.buffer().nbytes)
                         or allreduce_hook(None, bucket))  # fmt: skip
x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))  # the same data everywhere
x, y = x.tensor_split(world)[rank].to(device), (x[:, 0] > 0).long().tensor_split(world)[rank]
optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
for _ in range(30):
    loss = nn.functional.cross_entropy(model(x), y.to(device))  # y: my shard's labels
    optimizer.zero_grad(), loss.backward(), optimizer.step()
if rank == 0:  # one writer
    mapnet.save(mapped, os.environ.get("OUT", "ddp-run"))
    print(f"{world} ranks: loss {loss.item():.3f}, all-reduced {sent[-1]} bytes per step")
dist.barrier()  # no rank leaves while another still talks: gloo may abort at exit otherwise
dist.destroy_process_group()
