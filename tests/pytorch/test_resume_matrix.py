"""The exact-resume matrix on PyTorch (see tests/resume_matrix.py): every data source resumes bit-exactly,
mid-epoch and at an epoch end, with dropout and batch-level validation over a DataLoader.

Deliberate breaks seen failing: evaluation without isolated random states (the validation DataLoader's
iterator moves torch's generator: every source diverges after the resume); no saved random states before the
data iterator (the shuffled DataLoader diverges after a mid-epoch resume)."""

import pytest
import torch

import mlpug.pytorch as mlp
from tests.contract.backends import make_numpy_data
from tests.resume_matrix import NUM_BATCHES, STOP_AT, Setup, check_cell

BATCH_SIZE = 8


class TrainModel(torch.nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        features, labels = batch_data
        return torch.nn.functional.cross_entropy(self.classifier(features), labels)


def tensors(num_batches, seed):
    features, labels = make_numpy_data(num_batches * BATCH_SIZE, seed)
    return torch.utils.data.TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))


SOURCES = {
    "DataLoader": lambda dataset: torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE),
    "DataLoader(shuffle=True)": lambda dataset: torch.utils.data.DataLoader(dataset, BATCH_SIZE, shuffle=True),
    "resumable_data_loader": lambda dataset: mlp.data.resumable_data_loader(dataset, BATCH_SIZE, seed=3),
    "ResumableArrayBatches": lambda dataset: mlp.data.ResumableArrayBatches(dataset.tensors, BATCH_SIZE, seed=3),
}


def builder(source):
    def build(init_seed):
        torch.manual_seed(init_seed)
        classifier = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
        )
        trainer = mlp.trainers.DefaultTrainer(torch.optim.Adam(classifier.parameters(), lr=0.01), classifier)
        trainer.set_training_model(TrainModel(classifier))
        validation = torch.utils.data.DataLoader(tensors(3, 9), batch_size=BATCH_SIZE, shuffle=True)
        return Setup(
            mlp, trainer, SOURCES[source](tensors(NUM_BATCHES, 5)), validation,
            lambda: [p.detach().numpy().copy() for p in classifier.parameters()],
        )  # fmt: skip

    return build


@pytest.mark.parametrize("resume_point", sorted(STOP_AT))
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_resume_is_exact(source, resume_point, tmp_path, caplog):
    check_cell(builder(source), tmp_path, resume_point, "exact", caplog)
