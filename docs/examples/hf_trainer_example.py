# transformers' Trainer trains a tiny mapped BERT through its latent alone (paper §2.2).
import tempfile

import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import mapnet

size = dict(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
bert = lambda: BertForSequenceClassification(BertConfig(**size, intermediate_size=64))  # noqa: E731
torch.manual_seed(0)  # the data; the mapping is seeded by its config
ids, labels = torch.randint(6, 16, (512, 12)), torch.arange(512) % 2
ids[labels == 1, 0] = 5  # the task: does the sequence start with token 5?
rows = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
mapped = mapnet.wrap(bert, latent_dim=256)  # its 256 latent numbers are all the Trainer trains
settings = dict(max_steps=40, learning_rate=0.1, use_cpu=True, report_to="none")
with tempfile.TemporaryDirectory() as folder:
    # The Trainer finds label names on the model's class, whose forward takes (*args, **kwargs).
    args = TrainingArguments(folder, **settings, label_names=["labels"])
    trainer = Trainer(mapped, args, train_dataset=rows[:384], eval_dataset=rows[384:])
    trainer.train()
    trainer.save_model(folder)  # not a PreTrainedModel: mapped.state_dict() to model.safetensors
    fresh = mapnet.wrap(bert, latent_dim=256)
    fresh.load_state_dict(load_file(f"{folder}/model.safetensors"))  # strict, identity checked
    loss = trainer.evaluate()["eval_loss"]
logits = mapped.eval()(ids[384:]).logits
same = torch.equal(fresh.eval()(ids[384:]).logits, logits)
accuracy = (logits.argmax(-1) == labels[384:]).float().mean()
print(f"eval loss {loss:.3f}, accuracy {accuracy:.2f}; reloaded outputs identical: {same}")
