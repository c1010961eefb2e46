"""The wheel check of ``make package-check`` (not a pytest module).

* ``python wheel_check.py files WHEEL``: every file of ``mlpug/`` that git tracks is in the wheel (run in the checkout).
* ``python wheel_check.py run``: with the wheel's virtual environment, outside the source tree: mlpug and both of its
  backends' modules import from site-packages, and the one-call API trains a few samples with its default progress
  bar (tqdm is a dependency of the wheel, not of the checkout's venv).
"""

import subprocess
import sys
import zipfile
from pathlib import Path


def check_files(wheel: str) -> None:
    tracked = subprocess.run(["git", "ls-files", "mlpug"], capture_output=True, text=True, check=True).stdout.split()
    packaged = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(path for path in tracked if path not in packaged)
    if missing:
        sys.exit(f"wheel_check: {wheel} lacks {len(missing)} tracked file(s) of mlpug/: {missing}")
    print(f"wheel_check: {wheel} holds all {len(tracked)} tracked files of mlpug/")


def run_one_call() -> None:
    import torch

    import mlpug
    import mlpug.pytorch as mlp

    if "site-packages" not in mlpug.__file__:
        sys.exit(f"wheel_check: mlpug was imported from {mlpug.__file__}, not from the wheel")
    package = Path(mlpug.__file__).parent
    for module in ("tensorflow/one_call.py", "tensorflow/trainers/trainer.py", "py.typed"):  # TF is not installed
        if not (package / module).is_file():
            sys.exit(f"wheel_check: mlpug/{module} is not in the installed package {package}")
    mlp.set_random_seed(0)
    inputs = torch.randn(64, 8)
    targets = (inputs[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    trainer = mlp.Trainer(
        model, torch.nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=1e-2),
        metrics={"accuracy": mlp.metrics.accuracy},
    )  # fmt: skip
    history = trainer.train((inputs[:48], targets[:48]), (inputs[48:], targets[48:]), num_epochs=3, batch_size=16)
    if len(history.rows) != 3 or not 0.0 <= history.rows[-1]["validation.dataset.accuracy"] <= 1.0:
        sys.exit(f"wheel_check: unexpected history {history.rows}")
    print(f"wheel_check: the one-call API trained from {mlpug.__file__}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["files"]:
        check_files(sys.argv[2])
    else:
        run_one_call()
