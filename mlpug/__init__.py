"""mlpug: a training framework that does not care which deep-learning library you use.

Import a backend to train: ``import mlpug.pytorch as mlp`` or ``import mlpug.tensorflow as mlp``.
Importing ``mlpug`` itself imports neither torch nor tensorflow; the neutral core lives here.
"""

from mlpug import logging as logging  # installs the default console handler of the "mlpug" logger (stdlib only)

__version__ = "0.1.0"
