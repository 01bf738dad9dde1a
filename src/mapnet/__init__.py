"""Mapping Networks: train any torch.nn.Module through a small latent vector.

import mapnet
mapped = mapnet.wrap(lambda: MyNet(), mapnet.MappingConfig(latent_dim=2048))
optimizer = torch.optim.Adam(mapped.parameters(), lr=0.1)   # the latent (and any direct params)
mapnet.save(mapped, "run/ckpt"); mapnet.load("run/ckpt", lambda: MyNet())
"""

from mapnet._version import __version__ as __version__
from mapnet.checkpoint import load, load_into, save
from mapnet.config import MappingConfig
from mapnet.errors import CheckpointError
from mapnet.module import MappedModule, wrap
from mapnet.space import ModelSpace
from mapnet.trees import exclude_fixed_from_ddp, load_state_dict

__all__ = [
    "CheckpointError",
    "MappedModule",
    "MappingConfig",
    "ModelSpace",
    "exclude_fixed_from_ddp",
    "load",
    "load_into",
    "load_state_dict",
    "save",
    "wrap",
]
