"""Which variables each optimizer of the TensorFlow ``DefaultTrainer`` updates (``trainable_variables``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import tensorflow as tf

TrainableVariables = Union[
    Sequence[Any], Mapping[str, Union[Sequence[Any], tf.keras.layers.Layer, Callable[[], Sequence[Any]]]], Callable
]


def _type_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def check_trainable_variables_spec(spec: Any, optimizers: Mapping, model_components: Mapping) -> None:
    """Check the form of ``trainable_variables`` at construction (see ``DefaultTrainer``).

    Raises:
        TypeError: It is not None, a list, a dict or a callable, or a dict value has the wrong type.
        ValueError: Several optimizers without a way to tell their variables apart, or dict keys that are not
            the optimizer names.
    """
    if spec is None:
        if len(optimizers) > 1 and not set(optimizers) <= set(model_components):
            raise ValueError(
                f"With several optimizers ({sorted(optimizers)}), give trainable_variables as a dict "
                "optimizer name -> variables (or a callable returning it), or name each optimizer like the "
                f"model component it trains (model components: {sorted(model_components)})"
            )
        return
    if isinstance(spec, Mapping):
        if set(spec) != set(optimizers):
            raise ValueError(
                f"trainable_variables keys {sorted(map(str, spec))} must be the optimizer names {sorted(optimizers)}"
            )
        for name, value in spec.items():
            if not (callable(value) or isinstance(value, (list, tuple, tf.keras.layers.Layer))):
                raise TypeError(
                    f"trainable_variables[{name!r}] must be a list of variables, a Keras layer or a callable "
                    f"returning a list; got a {_type_name(value)}"
                )
    elif isinstance(spec, (list, tuple)):
        if len(optimizers) > 1:
            raise ValueError(
                "trainable_variables is a list, but there are several optimizers "
                f"({sorted(optimizers)}); give a dict optimizer name -> variables"
            )
    elif not callable(spec):
        raise TypeError(
            "trainable_variables must be None, a list of variables, a dict optimizer name -> variables or a "
            f"callable returning one of those; got a {_type_name(spec)}"
        )


def resolve_trainable_variables(spec: Any, optimizers: Mapping, model_components: Mapping) -> dict:
    """Optimizer name -> list of the variables it updates; called once the model components are built.

    Raises:
        TypeError: An entry is not a variable.
        ValueError: An optimizer gets no variables, or a variable is given to two optimizers.
    """
    if spec is None:
        if len(optimizers) == 1:
            variables = []
            for component in model_components.values():
                variables.extend(component.trainable_variables)
            spec = {next(iter(optimizers)): variables}
        else:
            spec = {name: model_components[name] for name in optimizers}
    elif callable(spec) and not isinstance(spec, (Mapping, tf.keras.layers.Layer)):
        spec = spec()
    if not isinstance(spec, Mapping):
        if len(optimizers) > 1:
            raise ValueError(
                f"trainable_variables returned a {_type_name(spec)}; with several optimizers it must return a "
                f"dict optimizer name -> variables for {sorted(optimizers)}"
            )
        spec = {next(iter(optimizers)): spec}
    resolved: dict = {}
    owner: dict = {}
    for name in optimizers:
        if name not in spec:
            raise ValueError(f"trainable_variables has no variables for optimizer {name!r} (keys: {sorted(spec)})")
        value = spec[name]
        if isinstance(value, tf.keras.layers.Layer):
            value = value.trainable_variables
        elif callable(value):
            value = value()
        variables = _unique(list(value))
        if not variables:
            raise ValueError(
                f"optimizer {name!r} has no trainable variables to update; check trainable_variables and that "
                "the model components have trainable weights"
            )
        for variable in variables:
            if not (hasattr(variable, "assign") and hasattr(variable, "shape")):
                raise TypeError(
                    f"trainable_variables for optimizer {name!r} contains a {_type_name(variable)}, not a variable"
                )
            if id(variable) in owner:
                raise ValueError(
                    f"variable {getattr(variable, 'path', variable.name)!r} is updated by two optimizers, "
                    f"{owner[id(variable)]!r} and {name!r}; give every variable to one optimizer"
                )
            owner[id(variable)] = name
        resolved[name] = variables
    return resolved


def _unique(variables: list) -> list:
    seen, unique = set(), []
    for variable in variables:
        if id(variable) not in seen:
            seen.add(id(variable))
            unique.append(variable)
    return unique
