"""Mapping Networks: train any torch.nn.Module through a small latent vector.

import mapnet
mapped = mapnet.wrap(model, mapnet.MappingConfig(latent_dim=2048))
optimizer = torch.optim.Adam(mapped.parameters(), lr=1e-2)   # only the latent
"""

from mapnet.checkpoint import CheckpointError, load, save
from mapnet.core import MappedModule, MappingConfig, wrap

__all__ = ["CheckpointError", "MappedModule", "MappingConfig", "load", "save", "wrap"]
__version__ = "0.1.0"
