import torch

import mlpug.pytorch as mlp

torch.manual_seed(0)

# 48 samples with 8 features; the label says whether the first feature is positive
features = torch.randn(48, 8)
labels = (features[:, 0] > 0).long()
training_set = torch.utils.data.TensorDataset(features[:32], labels[:32])
validation_set = torch.utils.data.TensorDataset(features[32:], labels[32:])
training_data = torch.utils.data.DataLoader(training_set, batch_size=8)  # 4 batches per epoch
validation_data = torch.utils.data.DataLoader(validation_set, batch_size=8)


class TrainModel(torch.nn.Module):
    """Turns a batch into the loss; the logits go to the metric functions as auxiliary results."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.loss_func = torch.nn.CrossEntropyLoss()

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        inputs, targets = batch_data
        logits = self.classifier(inputs)
        return {"loss": self.loss_func(logits, targets), "auxiliary_results": logits}


def make_trainer(**trainer_options):
    """A DefaultTrainer of a fresh 2-layer MLP with Adam, its training model set."""
    classifier = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=classifier, **trainer_options)
    trainer.set_training_model(TrainModel(classifier))
    return trainer
