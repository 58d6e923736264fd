"""methods.heads: the momentum (EMA) update of target networks."""

from __future__ import annotations

import pytest
import torch

from medssl.pretraining.methods.heads import ema_update


def test_ema_update_is_exact() -> None:
    """Values on a 1/8 grid and momentum 0.75 make every product exact in float32."""
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for index, (a, b) in enumerate(zip(online.parameters(), target.parameters(), strict=True)):
            a.copy_(torch.arange(a.numel()).view_as(a) / 8 + index)
            b.copy_(-torch.arange(b.numel()).view_as(b) / 4)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.75)
    for new, old, src in zip(target.parameters(), before, online.parameters(), strict=True):
        assert torch.equal(new, old * 0.75 + src.detach() * 0.25)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(target, online, 1.5)
