"""Process (a) of the peer benchmark: mlpug beside PyTorch Lightning, PyTorch-Ignite, HF accelerate and
pytorch-accelerated, all on one PyTorch job, against the raw PyTorch loop of the same process.

Job, data pipeline and rounds: see ``common.py`` and ``torch_job.py``. Every framework trains the same
``torch.nn.Sequential`` (same initial weights) with ``torch.optim.Adam(lr=1e-3)`` on the same batches; timed is
the call that trains (``trainer.fit``, ``engine.run``, ``trainer.train``, the loop over the prepared DataLoader,
``manager.start_training``); building the trainer objects is setup (reported apart, not timed). Configurations:

* Lightning lean: ``Trainer(barebones=True)`` (no progress bar, logger, checkpointing, model summary, sanity
  check); default: ``Trainer(max_epochs=1, default_root_dir=<temp dir>)`` as a new user gets it (here: the
  RichProgressBar, since rich is installed; TensorBoardLogger, since tensorboard is; ModelCheckpoint at the epoch
  end; model summary) and ``self.log("train_loss", loss)`` in ``training_step`` as in Lightning's quick start.
* Ignite lean: ``create_supervised_trainer`` and nothing attached (its default ``output_transform`` still does
  ``loss.item()`` every step); default: + ``RunningAverage`` of the loss + ``ProgressBar`` showing it (Ignite
  has no default handlers; this is its idiom for progress with a smoothed loss, the counterpart of mlpug's
  standard callbacks).
* accelerate lean: the quick-tour loop (``Accelerator()``, ``prepare(model, optimizer, loader)``,
  ``accelerator.backward``); default: + the floor's logging (mean loss every 200 batches, ``accelerator.print``)
  (accelerate has no callbacks or logging of its own).
* pytorch-accelerated lean: ``Trainer(callbacks=[])``; default: ``Trainer`` with its ``DEFAULT_CALLBACKS``
  (device placement, NaN check, printed progress, tqdm progress bar, printed metrics). The common DataLoader is
  requested through ``train(collate_fn=..., train_dataloader_kwargs=...)``; without that it would build a shuffling
  DataLoader with ``os.cpu_count()`` worker processes.
* mlpug lean: no callbacks; default: ``TrainingMetricsLogger`` + ``LogProgress(log_period=200)`` (the standard
  callbacks of ``overhead_pytorch.py``); default+ckpt: + ``CheckpointManager`` at the epoch end, the counterpart of
  Lightning's default checkpoint.

    .venv-peers/bin/python benchmarks/peers/torch_peers.py --rounds 8 --out /tmp/torch_peers.json
"""

import common
import ignite.engine
import ignite.handlers
import ignite.metrics
import lightning
import pytorch_accelerated
import torch
import torch_job
from accelerate import Accelerator
from common import LEARNING_RATE, LOG_PERIOD, Run, Variant
from overhead_pytorch import make_model

import mlpug.pytorch as mlp


class LitClassifier(lightning.LightningModule):
    def __init__(self, classifier, log_loss):
        super().__init__()
        self.classifier = classifier
        self.log_loss = log_loss

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = torch_job.LOSS(self.classifier(images), labels)
        if self.log_loss:
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=LEARNING_RATE)


def lightning_variants(data):
    def lean():
        model, _ = make_model()  # Lightning makes its optimizer in configure_optimizers (the same Adam)
        module = LitClassifier(model, log_loss=False)
        trainer = lightning.Trainer(barebones=True, max_epochs=1)
        loader = data.loader()
        return Run(lambda: trainer.fit(module, train_dataloaders=loader), lambda: data.evaluate_module(model))

    def default():
        model, _ = make_model()
        module = LitClassifier(model, log_loss=True)
        path, cleanup = torch_job.temporary_directory()
        trainer = lightning.Trainer(max_epochs=1, default_root_dir=path)
        loader = data.loader()
        return Run(lambda: trainer.fit(module, train_dataloaders=loader), lambda: data.evaluate_module(model), cleanup)

    return [
        Variant("Lightning", "lean", "Trainer(barebones=True), no self.log", lean),
        Variant(
            "Lightning",
            "default",
            "Trainer defaults: RichProgressBar, TensorBoardLogger, ModelCheckpoint, model summary; "
            'self.log("train_loss", loss)',
            default,
        ),
    ]


def ignite_variants(data):
    def make(with_progress):
        def setup():
            model, optimizer = make_model()
            engine = ignite.engine.create_supervised_trainer(model, optimizer, torch_job.LOSS)
            if with_progress:
                ignite.metrics.RunningAverage(output_transform=lambda loss: loss).attach(engine, "loss")
                ignite.handlers.ProgressBar().attach(engine, metric_names=["loss"])
            loader = data.loader()
            return Run(lambda: engine.run(loader, max_epochs=1), lambda: data.evaluate_module(model))

        return setup

    return [
        Variant("Ignite", "lean", "create_supervised_trainer, no handlers", make(False)),
        Variant("Ignite", "default", "+ RunningAverage(loss) + ProgressBar", make(True)),
    ]


def accelerate_variants(data):
    def make(log):
        def setup():
            model, optimizer = make_model()
            accelerator = Accelerator()
            prepared_model, optimizer, loader = accelerator.prepare(model, optimizer, data.loader())

            def train():
                running_loss, count = torch.zeros(()), 0
                for step, (images, labels) in enumerate(loader, start=1):
                    optimizer.zero_grad()
                    loss = torch_job.LOSS(prepared_model(images), labels)
                    accelerator.backward(loss)
                    optimizer.step()
                    if log:
                        running_loss += loss.detach()
                        count += 1
                        if step % LOG_PERIOD == 0:
                            accelerator.print(f"batch {step}: mean loss {running_loss.item() / count:.3f}")
                            running_loss, count = torch.zeros(()), 0

            return Run(train, lambda: data.evaluate_module(model))

        return setup

    return [
        Variant("accelerate", "lean", "Accelerator + prepare + accelerator.backward loop, no logging", make(False)),
        Variant("accelerate", "default", "+ mean loss printed every 200 batches (accelerator.print)", make(True)),
    ]


def pytorch_accelerated_variants(data):
    def make(callbacks):
        def setup():
            model, optimizer = make_model()
            trainer = pytorch_accelerated.Trainer(model, torch_job.LOSS, optimizer, callbacks=callbacks)

            def train():
                trainer.train(
                    train_dataset=data.dataset(),
                    num_epochs=1,
                    per_device_batch_size=1,  # items of the dataset are whole batches of 64
                    collate_fn=torch_job.the_batch,
                    train_dataloader_kwargs={"shuffle": False, "num_workers": 0},
                )

            return Run(train, lambda: data.evaluate_module(model))

        return setup

    return [
        Variant("pytorch-accelerated", "lean", "Trainer(callbacks=[])", make([])),
        Variant(
            "pytorch-accelerated",
            "default",
            "Trainer default callbacks (device, NaN check, printed progress, tqdm bar, printed metrics)",
            make(pytorch_accelerated.trainer.DEFAULT_CALLBACKS),
        ),
    ]


def main():
    args = common.parse_args(__doc__)
    torch_job.set_one_thread()
    mlp.logging.set_level("WARNING")
    data = torch_job.TorchData(args.max_batches)
    floor = torch_job.raw_floor(data)
    variants = [floor] + common.select(
        torch_job.mlpug_variants(data)
        + lightning_variants(data)
        + ignite_variants(data)
        + accelerate_variants(data)
        + pytorch_accelerated_variants(data),
        args.only,
    )
    common.progress(
        f"process (a) PyTorch: {len(variants)} variants, {len(data.batches)} batches, 1 + {args.rounds} rounds"
    )
    common.run_rounds(variants, args.rounds, check=torch_job.check_one_thread)
    common.write_results(
        args,
        "PyTorch",
        floor,
        variants,
        {"torch_threads": torch.get_num_threads(), "num_batches": len(data.batches)},
    )


if __name__ == "__main__":
    main()
