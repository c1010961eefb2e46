"""The PyTorch side of the peer benchmark: data pipeline, model, the raw floor and mlpug (used by
``torch_peers.py`` and ``keras_torch.py``; see ``common.py`` for the job and ``run.py`` for how to run).

Data pipeline, the same for every PyTorch framework: the batches of ``overhead_pytorch.make_batches`` (the
training set in a fixed permutation, ``torch.randperm`` seeded 0, cut into slices of 64; the last one has 32
samples) served by one ``torch.utils.data.DataLoader`` over a dataset whose items are those batches
(``batch_size=1``, a ``collate_fn`` that returns the batch itself, no workers, no shuffling), so that the
frameworks that need a ``DataLoader`` (accelerate, pytorch-accelerated) get one and all iterate the same batches at
the same (small) cost. Model and optimizer: ``overhead_pytorch.make_model`` (``torch.manual_seed(0)``, so every
PyTorch framework starts from the same weights and sees the same batches in the same order).
"""

import shutil
import tempfile

import torch
from common import LOG_PERIOD, Run, Variant
from overhead_pytorch import TrainModel, make_batches, make_model

import mlpug.pytorch as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist

LOSS = torch.nn.CrossEntropyLoss()


class Batches(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole pre-built batches."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def the_batch(items):
    """``collate_fn`` of a ``DataLoader(Batches(...), batch_size=1)``: the one item is already a batch."""
    return items[0]


class TorchData:
    def __init__(self, max_batches=None):
        self.batches = make_batches(64)[:max_batches]
        self.train_images = torch.cat([images for images, _ in self.batches])
        self.train_labels = torch.cat([labels for _, labels in self.batches])
        data = load_fashion_mnist()
        self.test_images = torch.from_numpy(data.test_images).float().div_(255.0).reshape(-1, 784)
        self.test_labels = torch.from_numpy(data.test_labels).long()

    def dataset(self):
        return Batches(self.batches)

    def loader(self):
        return torch.utils.data.DataLoader(self.dataset(), batch_size=1, shuffle=False, collate_fn=the_batch)

    def evaluate(self, predict):
        """(training-set loss, test accuracy) of ``predict(images) -> logits``, without gradients."""
        with torch.no_grad():
            loss = LOSS(predict(self.train_images), self.train_labels).item()
            accuracy = (predict(self.test_images).argmax(dim=1) == self.test_labels).float().mean().item()
        return loss, accuracy

    def evaluate_module(self, model):
        model.eval()
        return self.evaluate(model)


def temporary_directory():
    """A fresh directory and the cleanup that removes it."""
    path = tempfile.mkdtemp(prefix="mlpug-peers-")
    return path, lambda: shutil.rmtree(path, ignore_errors=True)


def raw_floor(data):
    """The hand-written loop of ``overhead_pytorch.run_raw`` over the common DataLoader."""

    def setup():
        model, optimizer = make_model()
        loader = data.loader()

        def train():
            running_loss, count = torch.zeros(()), 0
            for step, (images, labels) in enumerate(loader, start=1):
                optimizer.zero_grad(set_to_none=True)
                loss = LOSS(model(images), labels)
                loss.backward()
                optimizer.step()
                running_loss += loss.detach()
                count += 1
                if step % LOG_PERIOD == 0:
                    print(f"batch {step}: mean loss {running_loss.item() / count:.3f}")
                    running_loss, count = torch.zeros(()), 0

        return Run(train, lambda: data.evaluate_module(model))

    return Variant(
        "raw PyTorch",
        "floor",
        "zero_grad / loss / backward / step, mean loss printed every 200 batches (one .item() each)",
        setup,
    )


def mlpug_variants(data):
    def make(callbacks_for):
        def setup():
            model, optimizer = make_model()
            trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=model)
            evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
            callbacks, cleanup = callbacks_for(evaluator)
            manager = mlp.trainers.TrainingManager(trainer, data.loader(), num_epochs=1, callbacks=callbacks)
            trainer.set_training_model(TrainModel(model))
            return Run(manager.start_training, lambda: data.evaluate_module(model), cleanup)

        return setup

    def no_callbacks(evaluator):
        return [], lambda: None

    def standard(evaluator):
        # the "standard callbacks" of overhead_pytorch.run_mlpug
        return [
            mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
            mlp.callbacks.LogProgress(log_period=LOG_PERIOD, set_names=["training"]),
        ], lambda: None

    def standard_and_checkpoint(evaluator):
        path, cleanup = temporary_directory()
        checkpoints = mlp.callbacks.CheckpointManager(checkpoints_path=path, metric_to_monitor=None)
        return standard(evaluator)[0] + [checkpoints], cleanup

    return [
        Variant("mlpug", "lean", "DefaultTrainer + TrainingManager, no callbacks", make(no_callbacks)),
        Variant(
            "mlpug",
            "default",
            "standard callbacks: TrainingMetricsLogger + LogProgress(log_period=200)",
            make(standard),
        ),
        Variant(
            "mlpug",
            "default+ckpt",
            "standard callbacks + CheckpointManager at the epoch end (latest model + training checkpoint, "
            "background write, into a temp dir)",
            make(standard_and_checkpoint),
        ),
    ]


def set_one_thread():
    torch.set_num_threads(1)


def check_one_thread(variant):
    """After every run: a framework that changed the thread count would make the next runs incomparable."""
    threads = torch.get_num_threads()
    if threads != 1:
        raise RuntimeError(f"{variant.name} changed torch's thread count to {threads}")
