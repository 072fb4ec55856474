"""Configuration errors that the user fixes on the command line, and object building that reports them.

A :class:`RecipeError` carries a one-paragraph message: what is wrong, the value received and the override
to use instead. ``recipes.train``/``recipes.eval`` print it without a traceback and exit with code 2.

:func:`build` wraps :func:`hydra.utils.instantiate`. Hydra re-raises every constructor error as an
``InstantiationException`` whose text starts with "Error in call to target ..." and whose traceback runs
through Hydra's internals; ``build`` turns the argument errors a user can cause (``ValueError``,
``TypeError``, a missing package, Lightning's ``MisconfigurationException``) into a ``RecipeError`` that
names the config node, so the message points at the override to change.
"""

from __future__ import annotations

import re
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

__all__ = ["RecipeError", "build", "missing_values"]

#: Exit code of the entry points for a configuration error (argparse uses 2 for usage errors, too).
EXIT_CONFIG_ERROR = 2


class RecipeError(Exception):
    """A configuration problem with a one-paragraph message saying what to change.

    Contract: ``str(err)`` is complete on its own (no traceback needed) and names the config key or group
    option involved, the value received and what to use instead.
    """


def _root_cause(exc: BaseException) -> tuple[BaseException, str | None]:
    """Follow ``__cause__`` through Hydra's wrapping to the error the constructor raised.

    Also returns the ``full_key`` Hydra appends to the innermost wrapper (``net`` when ``model.net``
    failed while instantiating ``model``), so the message can name the nested node.
    """
    full_key = None
    seen = set()
    while isinstance(exc, InstantiationException) and id(exc) not in seen:
        seen.add(id(exc))
        found = re.search(r"full_key: (\S+)", str(exc))
        if found:
            full_key = found.group(1)
        if exc.__cause__ is None:
            break
        exc = exc.__cause__
    return exc, full_key


def build(node: Any, what: str, **kwargs: Any) -> Any:
    """Instantiate ``node`` (a config with ``_target_``) and turn user errors into :class:`RecipeError`.

    ``what`` is the config path of ``node`` (``"data"``, ``"lr_policy.callback"``), used in the message:
    ``"<what> (<target>): <cause>"``. A ``RecipeError`` raised by a constructor passes through unchanged.
    """
    from hydra.utils import instantiate

    target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause, full_key = _root_cause(exc)
        if isinstance(cause, RecipeError):
            raise cause from None
        if isinstance(cause, InstantiationException):
            # Hydra could not even locate the target (a typo in ``_target_``): its own text says so.
            raise RecipeError(f"`{what}` could not be built: {cause}") from None
        if full_key and isinstance(node, DictConfig):
            # full_key is relative to the root config when ``node`` is part of one.
            relative = full_key.removeprefix(f"{what}.")
            nested = OmegaConf.select(node, relative)
            if isinstance(nested, DictConfig):
                target = nested.get("_target_", target)
                what = f"{what}.{relative}"
        raise RecipeError(_describe(what, target, cause)) from None
    except RecipeError:
        raise
    except (ValueError, TypeError, ImportError) as cause:
        raise RecipeError(_describe(what, target, cause)) from None


def _describe(what: str, target: str, cause: BaseException) -> str:
    reason = str(cause).strip() or type(cause).__name__
    if isinstance(cause, ImportError):
        return f"`{what}` ({target}) needs a package that is not installed: {reason}"
    # The package's argument checks quote the argument name in backticks: point at its exact override.
    named = re.match(r"`(\w+)`", reason)
    argument = named.group(1) if named else "<argument>"
    return (
        f"`{what}` ({target}) rejected its configuration: {reason} "
        f"Change it with `{what}.{argument}=<value>`, or pick another option of the "
        f"`{what.split('.')[0]}` group."
    )


def missing_values(cfg: DictConfig) -> list[str]:
    """Dotted keys whose value is ``???`` (OmegaConf's mandatory-missing marker), sorted."""
    return sorted(OmegaConf.missing_keys(cfg))
