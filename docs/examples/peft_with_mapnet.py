# LoRA (peft) on fc2 and a mapping (paper §2.2) generating fc1 in one model: peft goes first.
import tempfile
from collections import OrderedDict

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import mapnet


def model() -> nn.Module:
    layers = dict(fc1=nn.Linear(8, 32), act=nn.ReLU(), fc2=nn.Linear(32, 32), head=nn.Linear(32, 2))
    peft = get_peft_model(nn.Sequential(OrderedDict(layers)), LoraConfig(r=2, target_modules="fc2"))
    peft.base_model.model.fc1.requires_grad_(True)  # peft froze it; mapnet maps trainable ones
    return peft


config = mapnet.MappingConfig(latent_dim=16, target_modules="*.fc1", train_directly="*lora_*")
mapped = mapnet.wrap(model, config)  # it sees LoRA; unless trained directly, it would freeze it
x = torch.randn(64, 8)
optimizer = torch.optim.Adam(mapped.parameters(), lr=0.05)  # the latent and LoRA's A and B
for _ in range(20):
    loss = nn.functional.cross_entropy(mapped(x), (x[:, 0] > 0).long())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
with tempfile.TemporaryDirectory() as folder:  # one safetensors checkpoint: latent and LoRA
    same = torch.equal(mapnet.load(mapnet.save(mapped, folder), model)(x), mapped(x))
print(f"{mapped.num_trainable_parameters()} numbers trained; reloaded outputs identical: {same}")
