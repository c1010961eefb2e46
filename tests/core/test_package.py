"""Package-level promises: no backend imported by the neutral core; console log format."""

import logging
import subprocess
import sys


def test_import_mlpug_imports_no_backend():
    code = (
        "import sys, mlpug, mlpug.trainers, mlpug.evaluation, mlpug.logs, mlpug.logging, mlpug.callbacks\n"
        "import mlpug.one_call\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_log_format_and_fancy_colors(capsys):
    import mlpug.logging as mlpug_logging

    logger = mlpug_logging.get_logger("TrainingManager")

    def emit():
        logger.info("Training completed. All good!")

    emit()
    assert capsys.readouterr().out == "INFO    : TrainingManager::emit : Training completed. All good!\n"
    mlpug_logging.use_fancy_colors()
    try:
        emit()
        expected = "\033[32mINFO    : TrainingManager::emit : Training completed. All good!\033[0m\n"
        assert capsys.readouterr().out == expected
    finally:
        mlpug_logging.use_fancy_colors(False)
    assert logging.getLogger("mlpug").propagate is False
