"""Mapping Networks: train any torch.nn.Module through a small latent vector."""
