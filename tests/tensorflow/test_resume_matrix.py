"""The exact-resume matrix on TensorFlow (see tests/resume_matrix.py), compiled steps, with Keras dropout and
batch-level validation over a tf.data pipeline: array batches, tf.data without and with a seeded shuffle resume
bit-exactly mid-epoch and at an epoch end; a shuffle without any seed is warned about at the start.

Deliberate break seen failing: the TensorFlow data source without the replay of earlier epochs' iterators (the
seeded reshuffle gives another order after a resume at an epoch end)."""

import pytest
import tensorflow as tf

import mlpug.tensorflow as mlp
from tests.contract.backends import make_numpy_data
from tests.resume_matrix import NUM_BATCHES, STOP_AT, Setup, check_cell

BATCH_SIZE, DATA_SEED = 8, 17


class TrainModel(tf.keras.Model):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        features, labels = batch_data
        return self.loss_function(labels, self.classifier(features, training=not inference_mode))


def pipeline(shuffle):
    def make():
        tf.random.set_seed(None if shuffle == "unseeded" else DATA_SEED)  # the seeds the pipeline is built with
        dataset = tf.data.Dataset.from_tensor_slices(make_numpy_data(NUM_BATCHES * BATCH_SIZE, 5))
        if shuffle:
            dataset = dataset.shuffle(NUM_BATCHES * BATCH_SIZE, seed=None if shuffle == "unseeded" else 3)
        return dataset.batch(BATCH_SIZE)

    return make


SOURCES = {
    "ResumableArrayBatches": lambda: mlp.data.ResumableArrayBatches(
        make_numpy_data(NUM_BATCHES * BATCH_SIZE, 5), BATCH_SIZE, seed=3
    ),
    "tf.data": pipeline(None),
    "tf.data.shuffle(seed)": pipeline("seeded"),
    "tf.data.shuffle()": pipeline("unseeded"),
    "tf.data.repeat()": lambda: (
        tf.data.Dataset.from_tensor_slices(make_numpy_data(6 * BATCH_SIZE, 5)).batch(BATCH_SIZE).repeat()
    ),  # infinite: one iterator for the run, each epoch continuing where the last one ended
}
SOURCES["tf.data.shuffle().repeat()"] = lambda: pipeline("unseeded")().repeat()  # infinite and unseeded
EXPECTED = {
    "tf.data.shuffle()": "The training tf.data pipeline shuffles without a seed",
    "tf.data.shuffle().repeat()": "The training tf.data pipeline shuffles without a seed",
}


def builder(source):
    def build(init_seed):
        training_data = SOURCES[source]()  # before the model: its seeds must not depend on the model's
        tf.keras.utils.set_random_seed(init_seed)
        classifier = tf.keras.Sequential(
            [tf.keras.Input(shape=(6,)), tf.keras.layers.Dense(16, activation="relu"), tf.keras.layers.Dropout(0.3),
             tf.keras.layers.Dense(3)]
        )  # fmt: skip
        trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.Adam(0.01), classifier)
        trainer.set_training_model(TrainModel(classifier))
        validation = tf.data.Dataset.from_tensor_slices(make_numpy_data(3 * BATCH_SIZE, 9)).batch(BATCH_SIZE)
        return Setup(mlp, trainer, training_data, validation, lambda: [w.numpy().copy() for w in classifier.weights])

    return build


@pytest.mark.parametrize("resume_point", sorted(STOP_AT))
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_resume_is_exact_or_warned_at_the_start(source, resume_point, tmp_path, caplog):
    check_cell(builder(source), tmp_path, resume_point, EXPECTED.get(source, "exact"), caplog)


def test_an_infinite_tf_data_dataset_continues_across_epochs():
    """Like Keras' steps_per_epoch: epoch 1 starts where epoch 0 ended instead of at the first batch again."""
    dataset = tf.data.Dataset.range(6).map(lambda i: (tf.fill([2, 6], tf.cast(i, tf.float32)), tf.fill([2], i % 3)))
    seen = []
    setup = builder("ResumableArrayBatches")(0)

    class Record(mlp.callbacks.Callback):
        def on_batch_training_start(self, training_batch, logs):
            seen.append(int(training_batch[0][0][0]))

    manager = mlp.trainers.TrainingManager(
        setup.trainer, dataset.repeat(), num_epochs=3, num_batches_per_epoch=4, callbacks=[Record()]
    )
    manager.start_training()
    assert seen == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
