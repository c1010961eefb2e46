"""The compiled step of the PyTorch ``DefaultTrainer`` (``compile_step=``): what goes through ``torch.compile``.

Two parts of the step do the tensor work and are compiled, each once per trainer; the Python around them (zeroing
the gradients, the chunk loop of gradient accumulation, DDP's ``no_sync``, the non-finite check, which waits for the
loss) runs as it does without compilation::

    training forward   device move, autocast, training_model(batch, ...)   one graph; AOTAutograd compiles its
                                                                            backward too, which loss.backward() runs
    gradient update    clip_gradients(), precision.step(optimizers)        clipping in one graph; optimizer.step()
                                                                            in graphs of its own (torch's optimizers
                                                                            break the graph there on purpose)
    evaluation forward evaluate_loss: eval mode, no_grad, the same forward another graph

The gradient update stays eager when, at the first step, every parameter group of every optimizer is fused
(``fused=True``): the fused kernel does the whole update at once, and compiling around it only adds Dynamo's
per-call work (guards and three compiled frames per step; ``docs/design-notes.md`` has a measurement).

Recompilation: the first dimension (the samples) of every tensor of a batch is marked dynamic
(``torch._dynamo.maybe_mark_dynamic``) before each compiled forward, so that the first graph already holds for any
batch size >= 2 and the smaller last batch of an epoch (or the last chunk of a batch) does not recompile. Other
reasons torch recompiles for (see ``docs/guide/performance.md``): a float learning rate that changes (an LR
schedule) once, at its first change; a batch of one sample once; and each further trainer in the same process, on
the same functions, until ``torch._dynamo.config.recompile_limit`` (8) is reached, after which torch warns and runs
those functions eagerly (``torch.compiler.reset()`` clears the caches between runs).

Without ``compile_step`` none of this exists: the trainer calls the same functions directly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import torch

CompileStep = Union[bool, Mapping[str, Any]]

_REFUSED_OPTIONS = {
    "model": "the trainer chooses what is compiled",
    "fullgraph": "the step cannot be one graph: loss.backward() and torch's optimizer.step() break it",
}


def compile_options() -> list[str]:
    """The keyword arguments of ``torch.compile`` that ``compile_step`` may set."""
    parameters = inspect.signature(torch.compile).parameters
    return [
        name
        for name, parameter in parameters.items()
        if name not in _REFUSED_OPTIONS and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]


def validate_compile_step(compile_step: Any) -> Optional[dict]:
    """The ``torch.compile`` options of ``compile_step``, or None for no compilation.

    Args:
        compile_step: ``False`` (no compilation), ``True`` (``torch.compile`` defaults: the inductor backend) or a
            mapping of ``torch.compile`` keyword arguments, e.g. ``{"backend": "aot_eager"}`` or
            ``{"mode": "max-autotune-no-cudagraphs"}`` (``model`` and ``fullgraph`` are refused).

    Raises:
        TypeError: ``compile_step`` is neither a bool nor a mapping with str keys.
        ValueError: The mapping has a key that ``torch.compile`` does not take, or a refused one (the valid keys
            are listed).
    """
    if isinstance(compile_step, bool):
        return {} if compile_step else None
    if not isinstance(compile_step, Mapping):
        raise TypeError(
            "compile_step must be True, False or a dict of torch.compile keyword arguments (e.g. "
            f"{{'backend': 'aot_eager'}}), got {type(compile_step).__qualname__}: {compile_step!r:.100}"
        )
    valid = compile_options()
    for key in compile_step:
        if not isinstance(key, str):
            raise TypeError(f"compile_step: keys must be str (torch.compile keyword arguments), got {key!r}")
        if key in _REFUSED_OPTIONS:
            raise ValueError(f"compile_step cannot set {key!r}: {_REFUSED_OPTIONS[key]}; valid keys: {valid}")
        if key not in valid:
            raise ValueError(f"compile_step: {key!r} is not a torch.compile keyword argument; valid keys: {valid}")
    return dict(compile_step)


def mark_batch_dynamic(batch: Any) -> None:
    """Mark the first dimension of every tensor in ``batch`` (nested tuples, lists, dicts) as dynamic for
    ``torch.compile`` (``maybe_mark_dynamic``: where the model's code needs a fixed size, torch specialises that
    dimension instead of raising)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(batch, 0)
    elif isinstance(batch, Mapping):
        for value in batch.values():
            mark_batch_dynamic(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            mark_batch_dynamic(value)


def compile_forward(function: Callable[..., Any], options: Mapping[str, Any]) -> Callable[..., Any]:
    """``function(model, batch, settings, inference_mode)`` compiled with ``options``; the batch's first dimension
    marked dynamic at every call (:func:`mark_batch_dynamic`)."""
    compiled = torch.compile(function, **options)

    def forward(model: Any, batch: Any, settings: Any, inference_mode: Any) -> Any:
        mark_batch_dynamic(batch)
        return compiled(model, batch, settings, inference_mode)

    return forward


def compile_update(function: Callable[[], Any], options: Mapping[str, Any]) -> Callable[[], Any]:
    """The gradient update ``function()`` (clipping and optimizer steps) compiled with ``options``."""
    return torch.compile(function, **options)
