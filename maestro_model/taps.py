"""Named intermediate tensors ("taps") a module offers to observers, in place of a ``record=`` argument threaded
through every ``forward``. The oracle comparison and debugging attach an observer; training and inference attach
none and pay one dictionary check per tap point.

    with recording(model) as seen:
        model(batch, "pretrain", mask=fixed)
    seen["dec_in_s1"], seen["head_pooled_cosia"], ...

Tap names are the oracle's (``reference/oracle``). A head taps ``head_pooled`` without knowing which target it
serves; :func:`recording` files it as ``head_pooled_<target>``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch.utils.hooks import RemovableHandle

TapHook = Callable[[str, torch.Tensor], None]


class Tapped:
    """Mixin for an ``nn.Module`` with tap points: ``register_tap_hook`` like torch's forward hooks."""

    def register_tap_hook(self, hook: TapHook) -> RemovableHandle:
        """Call ``hook(name, tensor)`` at every tap point until the returned handle's ``remove()``."""
        hooks = self.__dict__.setdefault("_tap_hooks", OrderedDict())
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    @property
    def tapping(self) -> bool:
        """Whether an observer is attached (tap points build their tensors only then)."""
        return bool(self.__dict__.get("_tap_hooks"))

    def tap(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for hook in list(self.__dict__.get("_tap_hooks", {}).values()):
            for name, tensor in tensors.items():
                hook(name, tensor)


@contextmanager
def recording(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Every tap of ``model`` and of its heads (``model.heads``: target -> head) during the block, by name."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.register_tap_hook(seen.__setitem__)]
    for target, head in getattr(model, "heads", {}).items():
        if isinstance(head, Tapped):
            handles.append(head.register_tap_hook(
                lambda name, t, target=target: seen.__setitem__(f"{name}_{target}" if name == "head_pooled"
                                                                else name, t)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
