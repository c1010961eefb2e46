"""``mlp.Trainer`` on 2 local gloo processes (``mlp.distributed.launch``): every rank saves its final weights and
validation loss to ``<out>/rank<k>.pt``. Run: ``python one_call_ddp.py OUT_DIR``."""

import os
import sys

import torch

import mlpug.pytorch as mlp


def train(out_dir):
    mlp.set_random_seed(0)
    inputs = torch.randn(96, 6, generator=torch.Generator().manual_seed(1))
    targets = (inputs[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    trainer = mlp.Trainer(
        model, torch.nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=0.01),
        metrics={"accuracy": mlp.metrics.accuracy},
    )  # fmt: skip
    history = trainer.train(
        (inputs[:64], targets[:64]), (inputs[64:], targets[64:]), num_epochs=2, batch_size=8, progress="log",
        checkpoints_path=os.path.join(out_dir, "checkpoints"),
    )  # fmt: skip
    validation_set = torch.utils.data.TensorDataset(inputs[64:], targets[64:])  # a map-style validation dataset
    evaluated = mlp.Trainer(model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0)).train(
        (inputs[:64], targets[:64]), validation_set, num_epochs=1, batch_size=8, progress="log"
    )  # lr 0: the same weights, evaluated on the shards of the torch Dataset
    distributed = trainer.manager.distributed
    torch.save(
        {
            "world_size": distributed.world_size,
            "global_iter": trainer.manager.global_iter,
            "weights": [p.detach().clone() for p in model.parameters()],
            "validation_loss": history.rows[-1]["validation.dataset.loss"],
            "dataset_validation_loss": evaluated.rows[-1]["validation.dataset.loss"],
        },
        os.path.join(out_dir, f"rank{distributed.rank}.pt"),
    )


if __name__ == "__main__":
    mlp.distributed.launch(train, sys.argv[1], num_processes=2)
