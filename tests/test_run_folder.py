"""Output folders are owned: one live run per folder (lock), no silent overwrite of a finished run, stale
locks taken over, resume picks the last complete checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_dograph.cli import main
from hf_dograph.folder_lock import LOCK_NAME, FolderLock, FolderLockedError
from hf_dograph.run_folder import RunFolderError

HERE = Path(__file__).resolve().parent


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def tiny_trainer(out: Path, max_steps: int = 2, save_steps: int | None = None):
    from datasets import Dataset

    from hf_dograph import DoGraphConfig, DoGraphTrainer
    from tiny_models import make_batch, rows_from_batch, stack_collator, tiny_gpt2

    rows = [r for s in range(max_steps) for r in rows_from_batch(make_batch(seed=s))]
    args = DoGraphConfig(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-2, use_cpu=True,
        report_to=[], disable_tqdm=True, num_domains=3, projection_dim=16, seed=0, logging_steps=100,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
    )
    trainer = DoGraphTrainer(model=tiny_gpt2(), args=args, train_dataset=Dataset.from_list(rows),
                             data_collator=stack_collator)
    trainer.dograph_write_plots = False
    return trainer


@pytest.fixture
def fresh_process(monkeypatch):
    """Forget which folders this process has trained into, as a new process (a rerun of a script) would."""
    from hf_dograph import run_folder

    monkeypatch.setattr(run_folder, "_owned", set())


# ----------------------------------------------------------------------------- two runs at once
def test_second_concurrent_run_is_refused_and_first_run_is_intact(tmp_path, capsys):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    first = subprocess.Popen(
        [sys.executable, "-m", "hf_dograph.cli", "train", "tiny", "--smoke", "--output-dir", str(out),
         "--set", "training.max_steps=200", "--set", "training.logging_steps=1000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 120
        while not (out / LOCK_NAME).is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / LOCK_NAME).is_file(), "the first run never took its lock"

        # the command line, into the same folder
        assert main(["train", "tiny", "--smoke", "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        # ...and the library, into the same folder
        with pytest.raises(FolderLockedError) as library_refusal:
            tiny_trainer(out).train()
        assert first.poll() is None, "the first run ended before the second tried: the test proved nothing"
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]

    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for needed in (str(out), f"pid {first.pid}", f"host {socket.gethostname()}", "Fix:", "--output-dir"):
        assert needed in err, (needed, err)
    assert f"pid {first.pid}" in str(library_refusal.value)

    # the first run's result is whole: its model, its 200 steps, its files; its lock is gone
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "dograph_state.json").read_text())["global_step"] == 200
    assert "max_steps: 200" in (out / "recipe.yaml").read_text()
    assert json.loads((out / "per_domain_eval.json").read_text())["per_domain"]["domains"]
    assert not (out / LOCK_NAME).exists()

    # a finished run's folder is refused too, unless told to train over it
    assert main(["train", "tiny", "--smoke", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds another run" in err and "--overwrite-output-dir" in err and "Traceback" not in err
    assert main(["train", "tiny", "--smoke", "--output-dir", str(out), "--overwrite-output-dir"]) == 0
    assert json.loads((out / "dograph_state.json").read_text())["global_step"] == 2


# ----------------------------------------------------------------------------- the lock itself
def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    with caplog.at_level("WARNING"), FolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"stale lock left by pid {pid}" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(FolderLockedError, match=rf"pid 1 on host elsewhere\.example.*delete {tmp_path / LOCK_NAME}"):
        FolderLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere.example"


def test_lock_is_reentrant_in_a_process_and_released_on_exception(tmp_path, fresh_process):
    lock = FolderLock(tmp_path).acquire()
    with FolderLock(tmp_path):  # the CLI holds it, the trainer takes it again
        pass
    assert (tmp_path / LOCK_NAME).is_file()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()

    trainer = tiny_trainer(tmp_path / "boom")

    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C mid-run

    trainer.training_step = broken
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (tmp_path / "boom" / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- library semantics
def test_library_train_twice_in_one_process_but_refused_in_a_new_one(tmp_path, fresh_process):
    from hf_dograph import run_folder

    out = tmp_path / "run"
    first = tiny_trainer(out, save_steps=1)
    first.train()
    tiny_trainer(out).train()  # the same script training again into its own folder: fine

    run_folder._owned.clear()  # a rerun of the script, in a new process
    with pytest.raises(RunFolderError) as refused:
        tiny_trainer(out).train()
    message = str(refused.value)
    assert str(out) in message and "overwrite_output_dir=True" in message
    assert "train(resume_from_checkpoint=True) to continue it from checkpoint-2" in message
    tiny_trainer(out, max_steps=3).train(resume_from_checkpoint=True)  # resuming is allowed
    run_folder._owned.clear()
    tiny_trainer(out).train(overwrite_output_dir=True)  # so is training over it, when asked

    saved_first = tiny_trainer(tmp_path / "saved-first")
    saved_first.save_model()  # files this process wrote itself are its own run
    saved_first.train()


def test_resume_true_takes_the_last_complete_checkpoint(tmp_path, caplog, fresh_process):
    from hf_dograph.errors import InputFileError

    out = tmp_path / "run"
    tiny_trainer(out, max_steps=2, save_steps=1).train()
    # a run killed while writing checkpoint-3 (weights written, trainer state not yet) and one with a cut
    # dograph_state.json
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-4")
    state = out / "checkpoint-4" / "dograph_state.json"
    state.write_text(state.read_text()[:40])

    resumed = tiny_trainer(out, max_steps=3, save_steps=1)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    assert "checkpoint-2, the last complete checkpoint" in caplog.text
    assert "checkpoint-3 (no trainer_state.json" in caplog.text and "checkpoint-4 (dograph_state.json is truncated" \
        in caplog.text

    # named explicitly, a partial checkpoint is an error naming what is missing and what to use instead
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-9")  # checkpoint-3: written whole by the resumed run
    (out / "checkpoint-9" / "trainer_state.json").unlink()
    (out / "checkpoint-9" / "model.safetensors").unlink()
    with pytest.raises(InputFileError, match=r"checkpoint-9: an incomplete checkpoint \(no trainer_state.json, no "
                                             r"model weights\).*Fix: resume from .*checkpoint-3 \(the last complete"):
        tiny_trainer(out, max_steps=3).train(resume_from_checkpoint=str(out / "checkpoint-9"))
