"""TensorFlow ``CheckpointManager``: the neutral one with the TensorFlow saver (``.npz`` files, no pickle).

It also saves the states of the Keras ``SeedGenerator`` variables of the model (e.g. of ``Dropout`` layers),
which ``get_weights()`` leaves out, so that a resumed run draws the same dropout masks.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from mlpug.checkpointing import CheckpointSaver as _Saver
from mlpug.tensorflow.checkpointing import CheckpointSaver
from mlpug.trainers.callbacks.checkpoint_manager import CheckpointManager as _NeutralCheckpointManager

_SEED_STATE_SUFFIX = "seed_generator_state"  # name of the state variable of a keras.random.SeedGenerator


class CheckpointManager(_NeutralCheckpointManager):
    __doc__ = (_NeutralCheckpointManager.__doc__ or "") + (
        "\n    TensorFlow: ``saver`` defaults to :class:`mlpug.tensorflow.checkpointing.CheckpointSaver`; the states"
        "\n    of the Keras seed generators (dropout etc.) of the model components and the training model are part"
        "\n    of this callback's state.\n"
    )

    def __init__(self, *args: Any, saver: Optional[_Saver] = None, **kwargs: Any):
        super().__init__(saver or CheckpointSaver(), *args, **kwargs)

    def _seed_generator_states(self) -> list:
        """The ``seed_generator_state`` variables of the model components and the training model, in order."""
        trainer = self.training_manager.trainer if self.training_manager is not None else None
        if trainer is None:
            return []
        models = [*getattr(trainer, "model_components", {}).values(), getattr(trainer, "training_model", None)]
        found, seen = [], set()
        for model in models:
            for variable in getattr(model, "variables", None) or []:
                path = getattr(variable, "path", None) or variable.name
                if path.endswith(_SEED_STATE_SUFFIX) and id(variable) not in seen:
                    seen.add(id(variable))
                    found.append(variable)
        return found

    def get_state(self) -> dict:
        state = super().get_state()
        state["keras_seed_generators"] = [variable.numpy().tolist() for variable in self._seed_generator_states()]
        return state

    def set_state(self, state: dict) -> None:
        """Restore the neutral state and the Keras seed generator states.

        Raises:
            ValueError: The checkpoint holds another number of seed generators than the model has.
        """
        super().set_state(state)
        saved = state.get("keras_seed_generators")
        if saved is None:
            return
        variables = self._seed_generator_states()
        if len(saved) != len(variables):
            raise ValueError(
                f"{self.name}: the checkpoint holds {len(saved)} Keras seed generator states (dropout etc.), the "
                f"model has {len(variables)}; it was saved from another model"
            )
        for variable, values in zip(variables, saved):
            variable.assign(np.asarray(values, dtype=variable.numpy().dtype))
