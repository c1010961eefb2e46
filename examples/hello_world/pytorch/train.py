"""The Hello World of mlpug with PyTorch, as in the mlpug README; only the data loading differs
(Fashion-MNIST from local IDX files instead of torchvision)."""

import torch

import mlpug.pytorch as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist

num_epochs = 10
batch_size = 64
progress_log_period = 500

torch.random.manual_seed(0)

# ############# SETUP DATA ##############
data = load_fashion_mnist()
training_data = torch.utils.data.TensorDataset(
    torch.from_numpy(data.train_images).float().div_(255.0), torch.from_numpy(data.train_labels).long()
)
test_data = torch.utils.data.TensorDataset(
    torch.from_numpy(data.test_images).float().div_(255.0), torch.from_numpy(data.test_labels).long()
)

training_dataset = torch.utils.data.DataLoader(training_data, batch_size=batch_size, shuffle=False, num_workers=0)

# Using the test set as a validation set, just for demonstration purposes
validation_dataset = torch.utils.data.DataLoader(test_data, batch_size=batch_size, shuffle=False, num_workers=0)
# #######################################

classifier = torch.nn.Sequential(
    torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
)


class TrainModel(torch.nn.Module):
    def __init__(self, classifier):
        super(TrainModel, self).__init__()

        self.classifier = classifier
        self.loss_func = torch.nn.CrossEntropyLoss()

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        images, true_labels = batch_data

        logits = self.classifier(images)
        return self.loss_func(logits, true_labels)


train_model = TrainModel(classifier)

optimizer = torch.optim.Adam(classifier.parameters(), eps=1e-7)

trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=classifier)

# At minimum you want to log the loss in the training progress
# By default the batch loss and the moving average of the loss are calculated and logged
loss_evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
callbacks = [
    mlp.callbacks.TrainingMetricsLogger(metric_evaluator=loss_evaluator),
    # Calculate validation loss only once per epoch over the whole dataset
    mlp.callbacks.TestMetricsLogger(
        validation_dataset, "validation", metric_evaluator=loss_evaluator, batch_level=False
    ),
    mlp.callbacks.LogProgress(log_period=progress_log_period, set_names=["training", "validation"]),
]

manager = mlp.trainers.TrainingManager(trainer, training_dataset, num_epochs=num_epochs, callbacks=callbacks)

trainer.set_training_model(train_model)

manager.start_training()

print("\nUsing the classifier ...")
image, real_label = test_data[0]
logits = classifier(image.unsqueeze(0))
print(f"real label = {real_label.item()}, predicted label = {logits.argmax(dim=1).item()}")
