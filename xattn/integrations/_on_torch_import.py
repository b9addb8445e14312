"""Register xattn in PyTorch's flash-attention registry as soon as torch is imported.

`import xattn` must stay fast and must not import torch itself (nor need it installed), yet
"xattn" should be in `torch.nn.attention.list_flash_attention_impls()` whichever of the two a
program imports first. If torch is already imported, registration happens now; otherwise a
one-shot import hook runs it right after torch's own module has finished executing, then
removes itself. Registration only records a callable in torch's registry; nothing is
activated and no xattn module that needs torch is imported before torch is.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings


def _register() -> None:
    try:
        from xattn.integrations import torch_sdpa
        torch_sdpa.register()
    except Exception as error:  # never let xattn break `import torch`
        warnings.warn(f"xattn could not register with torch.nn.attention: {error!r}",
                      stacklevel=2)


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader that the other finders give `torch` so that
    _register runs once that module is executed."""

    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        # Stay installed until torch is executed: importlib.util.find_spec("torch") (a mere
        # "is it installed?" check) also lands here and loads nothing.
        for finder in sys.meta_path:
            if finder is self:
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            uninstall()
            _register()

        loader.exec_module = exec_then_register
        return spec


_finder = _AfterTorch()


def install() -> None:
    if "torch" in sys.modules:
        _register()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
