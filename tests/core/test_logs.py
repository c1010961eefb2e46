import pytest

from mlpug.logs import Deferred, MetricValues, did_you_mean, get_value_at, keras_equivalents, resolve, set_value_at


def test_deferred_values_are_computed_once_on_first_read():
    calls = []

    def compute():
        calls.append(1)
        return 0.5

    values = MetricValues(loss=Deferred(compute))
    assert calls == []
    assert values["loss"] == 0.5 and values.get("loss") == 0.5 and dict(values.items()) == {"loss": 0.5}
    assert values.copy() == {"loss": 0.5} and values.values() == [0.5]
    assert calls == [1]


def test_every_copy_of_metric_values_holds_resolved_values():
    def values():
        return MetricValues(loss=Deferred(lambda: 0.25))

    assert dict(values()) == {"loss": 0.25}
    assert {**values()} == {"loss": 0.25}
    target = {}
    target.update(values())
    assert target == {"loss": 0.25}
    lazy = MetricValues()
    lazy.update_deferred(values())
    assert type(dict.__getitem__(lazy, "loss")) is Deferred


def test_get_value_at_reads_dotted_paths_and_resolves():
    logs = {"current": {"validation": {"dataset": MetricValues(loss=Deferred(lambda: 1.25))}}}
    assert get_value_at(logs, "current.validation.dataset.loss") == 1.25
    assert get_value_at(logs, "current.training.batch.loss", default=None) is None


def test_unknown_dotted_path_lists_available_paths():
    logs = {"current": {"training": {"batch": MetricValues(loss=1.0)}, "epoch": 0}}
    with pytest.raises(KeyError) as raised:
        get_value_at(logs, "current.validation.dataset.loss")
    message = str(raised.value)
    assert "'current.validation.dataset.loss' does not exist (missing key 'validation')" in message
    assert "Available paths: current.epoch, current.training.batch.loss" in message


@pytest.mark.parametrize(
    "path,suggestion",
    [
        ("val_loss", "Did you mean 'validation.dataset.loss'?"),
        ("val_acc", "Did you mean 'validation.dataset.accuracy'?"),
        ("loss", "Did you mean 'training.window_average.loss' or 'training.batch.loss'?"),
        ("validation.dataset.los", "Did you mean 'validation.dataset.loss'"),
        ("lr", "Did you mean 'training_params.batch.lr'?"),
    ],
)
def test_a_missing_path_suggests_the_keras_equivalent_or_a_close_spelling(path, suggestion):
    """Issue 25 item 8. Broken on purpose (no did_you_mean in get_value_at), only the list of paths: this test fails."""
    current = {
        "training": {"batch": MetricValues(loss=1.0), "window_average": MetricValues(loss=1.0)},
        "validation": {"dataset": MetricValues(loss=1.0, accuracy=0.5)},
        "training_params": {"batch": MetricValues(lr=0.1)},
    }
    with pytest.raises(KeyError) as raised:
        get_value_at(current, path)
    message = str(raised.value)
    assert suggestion in message and message.index(suggestion) < message.index("Available paths")
    assert did_you_mean("epoch_count_of_nothing", ["training.batch.loss"]) == ""
    assert "The Keras name 'val_loss' is 'validation.dataset.loss'" in did_you_mean("val_loss", ["training.batch.loss"])


@pytest.mark.parametrize("prefix", ["val_", "train_", "val__"])
def test_a_bare_prefix_is_no_keras_name(prefix):
    """A prefix such as ``val_`` (a metric name left out) means no path: no Keras equivalent is claimed for it.
    Broken on purpose (every undotted name a training metric), "val_" is said to mean 'training.window_average.val_':
    this test fails."""
    known = ["training.window_average.loss", "training.batch.loss", "validation.dataset.loss"]
    assert keras_equivalents(prefix) == []
    message = did_you_mean(prefix, known)
    assert f".{prefix}'" not in message and "The Keras name" not in message
    assert did_you_mean(prefix, ["training.batch.loss"]) == ""


def test_resolve_makes_plain_copy():
    logs = {"current": {"training": {"batch": MetricValues(loss=Deferred(lambda: 2.0))}}}
    plain = resolve(logs)
    assert plain == {"current": {"training": {"batch": {"loss": 2.0}}}}
    assert type(plain["current"]["training"]["batch"]) is dict


def test_set_value_at_creates_intermediate_dicts():
    logs = {}
    set_value_at(logs, "current.validation.dataset.loss", 0.3)
    assert logs == {"current": {"validation": {"dataset": {"loss": 0.3}}}}
