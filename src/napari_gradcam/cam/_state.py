"""Leave a user's model exactly as we found it."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def explaining(module: nn.Module):
    """Evaluation mode for the duration of the block, then every submodule's own train/eval flag
    back, also when the block raises. Explanations are computed in eval mode so that BatchNorm
    uses its running statistics (samples stay independent) and dropout is off.

    A model already in eval mode (the usual case) is not touched at all: walking a large model
    twice costs more than its whole CAM arithmetic on a GPU.
    """
    training = [m for m in module.modules() if m.training]
    if not training:
        yield module
        return
    module.eval()  # through eval(), so that modules overriding train() are honoured
    try:
        yield module
    finally:
        for m in module.modules():
            m.training = False
        for m in training:
            m.training = True
