# Fine-tune a transformer through 256 numbers: one scale per output row of every Linear weight.
import sys
import tempfile

import torch
from transformers import AutoModel, BertConfig, BertModel

import mapnet

tiny = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


class Classifier(torch.nn.Module):  # an encoder (pretrained: argv[1], a folder), mean-pooled
    def __init__(self) -> None:  # here a tiny BERT from a config, seeded: no download
        super().__init__()
        torch.manual_seed(0)
        load = AutoModel.from_pretrained
        self.encoder = load(sys.argv[1]) if sys.argv[1:] else BertModel(tiny, False)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, 3)  # new, trained directly

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, 3)
        return self.head(self.encoder(input_ids=ids).last_hidden_state.mean(1))


config = mapnet.MappingConfig(latent_dim=256, update="multiplicative", group_size="row",
                              target_types=["Linear"], parameter_names=["weight"],
                              train_directly=["head"])  # fmt: skip
mapped = mapnet.wrap(Classifier(), config)  # θ_pre: the encoder's weights, left untouched
groups = mapped.parameter_groups()  # the latent and the head, each at its own rate
optimizer = torch.optim.Adam([{"params": groups["latents"], "lr": 3e-2},
                              {"params": groups["direct"], "lr": 1e-2}])  # fmt: skip
ids = torch.randint(0, 100, (64, 12))  # your tokens here, and your labels
for _ in range(30):
    loss = torch.nn.functional.cross_entropy(mapped(ids), ids[:, 0] % 3)
    optimizer.zero_grad(), loss.backward(), optimizer.step()
with tempfile.TemporaryDirectory() as folder:  # a few KB: the latent, the head, tensor digests
    again, mapped = mapnet.load(mapnet.save(mapped, folder), Classifier()).eval(), mapped.eval()
    same = torch.equal(again(ids), mapped(ids))  # eval(): no dropout
print(f"loss {loss.item():.3f}; reloaded outputs identical: {same}")
