"""mlpug's PyTorch training gives exactly the weights of a hand-written PyTorch loop."""

import torch

import mlpug.pytorch as mlp


def make_mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def make_batches(num_batches, batch_size=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(batch_size, 28, 28, generator=generator), torch.randint(0, 10, (batch_size,), generator=generator))
        for _ in range(num_batches)
    ]


class TrainModel(torch.nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.loss_func = torch.nn.CrossEntropyLoss()

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        images, labels = batch_data
        return self.loss_func(self.classifier(images), labels)


def test_weights_identical_to_hand_written_loop():
    batches = make_batches(25)

    loss_func = torch.nn.CrossEntropyLoss()
    classifier = make_mlp(seed=7)
    trainer = mlp.trainers.DefaultTrainer(
        optimizers=torch.optim.Adam(classifier.parameters(), lr=1e-3), model_components=classifier
    )
    losses = []

    class CollectLosses(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            losses.append(logs["current"]["training"]["batch"]["loss"])

    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    manager = mlp.trainers.TrainingManager(
        trainer,
        batches,
        num_epochs=2,
        num_batches_per_epoch=10,
        callbacks=[mlp.callbacks.TrainingMetricsLogger(evaluator), CollectLosses()],
    )
    # 2 epochs of 10 batches re-iterate the list: batches 0..9 twice. Build the same order for the reference.
    trainer.set_training_model(TrainModel(classifier))
    manager.start_training()

    reference2 = make_mlp(seed=7)
    optimizer2 = torch.optim.Adam(reference2.parameters(), lr=1e-3)
    reference_losses = []
    for images, labels in batches[:10] * 2:
        optimizer2.zero_grad(set_to_none=True)
        loss = loss_func(reference2(images), labels)
        loss.backward()
        optimizer2.step()
        reference_losses.append(loss.item())

    for mine, theirs in zip(classifier.parameters(), reference2.parameters()):
        assert torch.equal(mine, theirs)
    assert losses == reference_losses
    assert not any(torch.equal(a, b) for a, b in zip(classifier.parameters(), make_mlp(seed=7).parameters()))
