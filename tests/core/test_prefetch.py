"""``BackgroundPrefetcher``: same batches in the same order, loader errors in the training loop, no thread left
behind, and through the manager the exact resume of a resumable dataset."""

import copy
import gc
import threading
import time

import pytest

from mlpug.callbacks import Callback
from mlpug.data import ResumableBatchSampler
from mlpug.prefetch import BackgroundPrefetcher
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import make_batches, make_trainer


def prefetch_threads():
    return [thread for thread in threading.enumerate() if thread.name == "mlpug-prefetch" and thread.is_alive()]


def wait_for_no_threads(timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return prefetch_threads()


class SlowBatches:
    """Batches that take ``delay_s`` each to load; raises at ``fail_at`` when given."""

    def __init__(self, num_batches, delay_s=0.002, fail_at=None):
        self.batches, self.delay_s, self.fail_at = make_batches(num_batches), delay_s, fail_at
        self.loaded = 0

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            time.sleep(self.delay_s)
            if index == self.fail_at:
                raise OSError(f"cannot read batch {index}")
            self.loaded += 1
            yield batch

    def __len__(self):
        return len(self.batches)


def test_the_same_batches_in_the_same_order_and_no_thread_afterwards():
    source = SlowBatches(20)
    prefetcher = BackgroundPrefetcher(source, num_prefetch=3)
    assert len(prefetcher) == 20
    for _ in range(2):  # every iter() is a new pass
        assert list(prefetcher) == source.batches
    assert wait_for_no_threads() == []


def test_it_loads_ahead_at_most_num_prefetch_batches():
    source = SlowBatches(20, delay_s=0.0)
    iterator = iter(BackgroundPrefetcher(source, num_prefetch=3))
    next(iterator)
    time.sleep(0.2)
    assert source.loaded <= 1 + 3 + 1  # the one taken, the queue, and one waiting to be put
    iterator.close()
    assert wait_for_no_threads() == []


def test_a_loader_error_surfaces_at_its_batch_with_its_traceback():
    iterator = iter(BackgroundPrefetcher(SlowBatches(10, fail_at=3)))
    assert [next(iterator) for _ in range(3)] == make_batches(10)[:3]
    with pytest.raises(OSError, match="cannot read batch 3") as raised:
        next(iterator)
    assert any(frame.name == "__iter__" for frame in __import__("traceback").extract_tb(raised.value.__traceback__))
    assert wait_for_no_threads() == []


def test_an_iterator_dropped_early_stops_its_thread():
    iterator = iter(BackgroundPrefetcher(SlowBatches(1000, delay_s=0.0)))
    next(iterator)
    del iterator
    gc.collect()
    assert wait_for_no_threads() == []


def test_bad_arguments():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_prefetch must be an int >= 1"):
            BackgroundPrefetcher([], num_prefetch=bad)
    with pytest.raises(TypeError, match="dataset must be an iterable of batches, got int"):
        BackgroundPrefetcher(3)


class ResumableFakeBatches:
    """The fake backend's batches in a ResumableBatchSampler order (shuffled by seed and epoch)."""

    def __init__(self, num_batches=6):
        self.samples = [pair for batch in make_batches(num_batches) for pair in batch]
        self.batch_sampler = ResumableBatchSampler(len(self.samples), 4, shuffle=True, seed=3)

    def __iter__(self):
        for indices in self.batch_sampler:
            yield [self.samples[i] for i in indices]

    def __len__(self):
        return len(self.batch_sampler)


def train(dataset_factory, resume_from=None, capture_at=None):
    class Capture(Callback):
        state = None

        def on_batch_checkpoint(self, logs):
            if logs["current"]["global_iter"] == capture_at:
                Capture.state = copy.deepcopy(self.training_manager.get_state())
            return True

    trainer, model = make_trainer()
    manager = TrainingManager(
        trainer, dataset_factory(), num_epochs=2, callbacks=[Capture("Capture")], resume_from=resume_from
    )
    manager.start_training()
    return (model.w, model.b), Capture.state


def test_through_the_manager_training_and_a_mid_epoch_resume_are_exact(caplog):
    """The prefetched resumable dataset trains the same model as the plain one; a run resumed mid-epoch (after
    global iteration 3 of 12) from the captured state ends with the same weights: the manager set the start
    batch on the wrapped sampler: no batch was skipped by loading and dropping it (which warns)."""
    plain, _ = train(ResumableFakeBatches)
    prefetched, state = train(lambda: BackgroundPrefetcher(ResumableFakeBatches()), capture_at=3)
    assert prefetched == plain
    assert state["data"] == {"order": ResumableFakeBatches().batch_sampler.get_state()}
    resumed, _ = train(lambda: BackgroundPrefetcher(ResumableFakeBatches()), resume_from=state)
    assert resumed == plain
    assert "skipped by loading and dropping them" not in caplog.text
    assert wait_for_no_threads() == []


def test_an_error_in_the_training_loop_leaves_no_thread_behind():
    """A callback raises mid-epoch: the manager closes the epoch's prefetching iterator, although the error's
    traceback keeps its frames (and the iterator) alive."""

    class Fail(Callback):
        def on_batch_training_completed(self, training_batch, logs):
            if logs["current"]["global_iter"] == 2:
                raise RuntimeError("callback fails on purpose")
            return True

    trainer, _ = make_trainer()
    manager = TrainingManager(trainer, BackgroundPrefetcher(SlowBatches(50, delay_s=0.0)), callbacks=[Fail("Fail")])
    with pytest.raises(RuntimeError, match="callback fails on purpose"):
        manager.start_training()
    assert wait_for_no_threads() == []


def test_the_first_batch_of_a_pass_is_taken_on_the_callers_thread():
    class Threads:
        def __init__(self):
            self.loaded_on = []

        def __iter__(self):
            for batch in make_batches(3):
                self.loaded_on.append(threading.current_thread().name)
                yield batch

    source = Threads()
    assert list(BackgroundPrefetcher(source)) == make_batches(3)
    assert source.loaded_on[0] == threading.current_thread().name
    assert source.loaded_on[1:] == ["mlpug-prefetch", "mlpug-prefetch"]
