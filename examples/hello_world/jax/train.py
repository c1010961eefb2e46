"""The Hello World of mlpug with JAX (Flax NNX and optax), as in the mlpug README for PyTorch and TensorFlow; only
the data loading differs (Fashion-MNIST from local IDX files)."""

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mlpug.jax as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist

num_epochs = 10
batch_size = 64
progress_log_period = 500

mlp.set_random_seed(0)

# ############# SETUP DATA ##############
data = load_fashion_mnist()
# images float32 [N, 28, 28] in [0, 1], labels int32 [N]; batches are tuples of NumPy arrays
training_data = (data.train_images.astype(np.float32) / 255.0, data.train_labels.astype(np.int32))
test_data = (data.test_images.astype(np.float32) / 255.0, data.test_labels.astype(np.int32))

training_dataset = mlp.data.ResumableArrayBatches(training_data, batch_size=batch_size, shuffle=False)

# Using the test set as a validation set, just for demonstration purposes
validation_dataset = mlp.data.ResumableArrayBatches(test_data, batch_size=batch_size, shuffle=False)
# #######################################


class Classifier(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(784, 128, rngs=rngs)
        self.output = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, images):
        features = images.reshape((images.shape[0], -1))
        return self.output(nnx.relu(self.hidden(features)))


classifier = Classifier(rngs=nnx.Rngs(0))


class TrainModel(nnx.Module):
    def __init__(self, classifier):
        self.classifier = classifier

    def __call__(self, batch_data, evaluate_settings, inference_mode=None):
        images, true_labels = batch_data

        logits = self.classifier(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, true_labels).mean()


train_model = TrainModel(classifier)

optimizer = optax.adam(learning_rate=1e-3)

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
    # The latest and the best model (lowest validation loss) and a training checkpoint, after every epoch
    mlp.callbacks.CheckpointManager(checkpoints_path="checkpoints", base_checkpoint_filename="hello-world-jax"),
]

manager = mlp.trainers.TrainingManager(trainer, training_dataset, num_epochs=num_epochs, callbacks=callbacks)

trainer.set_training_model(train_model)

manager.start_training()

print("\nUsing the classifier ...")
image, real_label = test_data[0][0], test_data[1][0]
logits = classifier(jnp.asarray(image[None, ...]))
print(f"real label = {real_label}, predicted label = {int(jnp.argmax(logits, axis=1)[0])}")
