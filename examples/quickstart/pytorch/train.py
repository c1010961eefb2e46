"""Quickstart: Fashion-MNIST in one call, with validation, a progress bar and checkpoints (PyTorch)."""

import torch

import mlpug.pytorch as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist

mlp.set_random_seed(0)
data = load_fashion_mnist()  # NumPy arrays: images uint8 [N, 28, 28], labels [N]
train_set = (torch.from_numpy(data.train_images).float() / 255, torch.from_numpy(data.train_labels).long())
validation_set = (torch.from_numpy(data.test_images).float() / 255, torch.from_numpy(data.test_labels).long())

model = torch.nn.Sequential(
    torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
    torch.nn.Linear(256, 10),
)  # fmt: skip
optimizer = torch.optim.Adam(model.parameters(), fused=True)  # fused: one kernel per step (docs: performance)
trainer = mlp.Trainer(model, torch.nn.CrossEntropyLoss(), optimizer, metrics={"accuracy": mlp.metrics.accuracy})
history = trainer.train(train_set, validation_set, num_epochs=3, batch_size=64, checkpoints_path="checkpoints")
print(history.table())
