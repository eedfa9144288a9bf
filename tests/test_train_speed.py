"""Training set-up costs (issue 12): what adapterkit asks of the DataLoader on a CPU-only machine."""

from __future__ import annotations

import torch

from adapterkit.training.settings import TrainSettings, training_arguments


def test_no_pinned_memory_without_an_accelerator(tmp_path):
    # Pinned memory only speeds copies to an accelerator; without one torch warns on every DataLoader.
    args = training_arguments(TrainSettings(), output_dir=str(tmp_path), learning_rate=1e-3, evaluate=False)
    assert args.dataloader_pin_memory is torch.accelerator.is_available()


def test_pinned_memory_when_asked(tmp_path):
    asked = training_arguments(TrainSettings(dataloader_pin_memory=True), output_dir=str(tmp_path),
                               learning_rate=1e-3, evaluate=False)
    assert asked.dataloader_pin_memory is True
