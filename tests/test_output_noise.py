"""Saving a tied model prints no third-party chatter, and the chatter is not silenced for good."""

from __future__ import annotations

import logging

from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from rlclip.modeling import quiet_saving, resolve_tiny


def _save(model, directory, acc):
    acc.save_state(str(directory))  # a checkpoint's model.safetensors, as Checkpointer.save writes it


def test_quiet_saving_drops_the_shared_tensor_warning_and_restores_it(tmp_path, caplog):
    from transformers.utils import logging as hf_logging

    acc = Accelerator(cpu=True)
    model = acc.prepare(AutoModelForCausalLM.from_pretrained(resolve_tiny("tiny")))  # tied lm_head, as SmolLM2
    caplog.set_level(logging.WARNING)
    _save(model, tmp_path / "loud", acc)
    assert "Removed shared tensor" in caplog.text  # what a user saw on every save before
    caplog.clear()
    with quiet_saving():
        assert not hf_logging.is_progress_bar_enabled()
        _save(model, tmp_path / "quiet", acc)
    assert "Removed shared tensor" not in caplog.text
    assert hf_logging.is_progress_bar_enabled()
    _save(model, tmp_path / "loud_again", acc)
    assert "Removed shared tensor" in caplog.text
    acc.load_state(str(tmp_path / "quiet"))  # the checkpoint written quietly loads back
