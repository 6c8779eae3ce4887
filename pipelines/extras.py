"""The optional extras (serve, onnx, ray): a command that needs one says which, before it starts."""

from __future__ import annotations

import importlib.util

from captioner.errors import OptionError

EXTRAS = {  # each extra's modules, as pyproject.toml's optional-dependencies install them
    "serve": ("fastapi", "uvicorn", "python_multipart"),
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "ray": ("ray", "pyarrow"),
}


def require_extra(extra: str, what: str) -> None:
    """Refuse ``what`` (a command or flag) when a module of ``extra`` is not installed.

    Checked by name, not by importing: the modules are imported where they are used, some of
    them lazily and deep inside torch (``torch.onnx`` raises its own error for a missing onnx).

    Raises:
        OptionError: ``WHAT needs the EXTRA extra: pip install 'captioner[EXTRA]' (MODULE is missing)``.
    """
    missing = [name for name in EXTRAS[extra] if not _installed(name)]
    if missing:
        raise OptionError(f"{what} needs the {extra} extra: pip install 'captioner[{extra}]' "
                          f"({', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing)")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (imports of it fail)
        return False
