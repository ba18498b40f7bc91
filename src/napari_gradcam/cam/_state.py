"""Leave a user's model exactly as we found it."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def explaining(module: nn.Module):
    """Evaluation mode for the duration of the block, then every submodule's own train/eval flag
    back, also when the block raises. Explanations are computed in eval mode so that BatchNorm
    uses its running statistics (samples stay independent) and dropout is off."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
