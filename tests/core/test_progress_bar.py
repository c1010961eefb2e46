"""``ProgressBar``: sakura's description with the right numbers under a pseudo-terminal (tqdm), one line per epoch
when stdout is not a terminal."""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from mlpug.callbacks import ProgressBar

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "core", "scripts", "progress_bar_run.py")


def run_script(tmp_path, mode, terminal):
    losses_path = str(tmp_path / "losses.json")
    command = [sys.executable, SCRIPT, losses_path, mode]
    env = {**os.environ, "PYTHONPATH": ROOT, "COLUMNS": "200"}
    if not terminal:
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert result.returncode == 0, result.stderr
        output = result.stdout
    else:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # 40 rows, 200 columns
        process = subprocess.Popen(command, stdout=slave, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the pty closes when the process exits
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=60) == 0, process.stderr.read().decode()
        os.close(master)
        output = b"".join(chunks).decode(errors="replace")
    with open(losses_path) as file:
        return output, json.load(file)


def expected_descriptions(losses, run_async):
    """Per 1-based epoch k, the final description of its bar / line."""
    descriptions = []
    for epoch in range(3):
        shown = epoch - 1 if run_async and epoch < 2 else epoch  # asynchronous: the previous epoch's result
        if shown < 0:
            descriptions.append("(-) toy | Epoch: 1/3")
            continue
        best = min(losses[: shown + 1])
        best_epoch = losses.index(best) + 1
        text = f"({best_epoch}) toy | Epoch: {epoch + 1}/3 | Loss: {losses[shown]:.4f} / ({best:.4f})"
        descriptions.append(text + (f" | of epoch {shown + 1}" if shown != epoch else ""))
    return descriptions


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_not_a_terminal_one_line_per_epoch_with_the_sakura_fields(tmp_path, mode):
    output, losses = run_script(tmp_path, mode, terminal=False)
    lines = [line for line in output.splitlines() if "toy" in line]
    assert len(lines) == 3 and "\r" not in output
    for line, description in zip(lines, expected_descriptions(losses, mode == "async")):
        assert line.startswith(description + ": 8/8 batches ["), line
        assert re.search(r"loss=\d+\.\d{4}\]$", line)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_under_a_terminal_a_tqdm_bar_per_epoch_shows_the_sakura_fields(tmp_path, mode):
    output, losses = run_script(tmp_path, mode, terminal=True)
    assert "\r" in output and "8/8" in output  # tqdm's redrawn bar
    for description in expected_descriptions(losses, mode == "async"):
        assert description + ":" in output, (description, output[-2000:])
    assert "loss=" in output  # the postfix: window-average training loss


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="refresh_period"):
        ProgressBar(refresh_period=0)
    with pytest.raises(ValueError, match="metrics"):
        ProgressBar(metrics={"Acc": "validation.dataset.accuracy"})


def test_a_terminal_without_tqdm_is_refused_at_construction(monkeypatch):
    import importlib.util
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real_find_spec(name))
    with pytest.raises(
        ModuleNotFoundError, match=r"pip install tqdm \(a dependency of the mlpug package\), or use LogProgress"
    ):
        ProgressBar(file=Terminal())
    ProgressBar(file=io.StringIO())  # off a terminal no bar is drawn: tqdm is not needed
