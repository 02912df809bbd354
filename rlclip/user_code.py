"""Importing the user's modules and ``.py`` files (``imports:`` in a recipe, ``--imports``),
so that their registrations (objectives, reward functions) take effect. Light on purpose:
``rlclip objectives --imports`` uses it without loading the config machinery."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from rlclip.errors import ConfigError


def import_user_modules(names: list[str]) -> None:
    """Import modules (dotted names or ``.py`` paths) so their registrations take effect.

    A file or module that is not there raises ConfigError; an exception raised by
    the user's code while it is imported raises UserCodeError naming its file and line.
    """
    from rlclip.errors import RlclipError, UserCodeError, describe_user_exception

    for name in [names] if isinstance(names, str) else names:
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise ConfigError(f"imports: {name} does not exist; give a .py file or a module name")
                spec = importlib.util.spec_from_file_location(f"rlclip_user_{path.stem}", path)
                if spec.name in sys.modules:
                    continue
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[spec.name]
                    raise
            else:
                importlib.import_module(name)
        except RlclipError:
            raise
        except ModuleNotFoundError as err:
            if err.name and (name == err.name or name.startswith(err.name + ".")):
                raise ConfigError(f"imports: cannot import {name!r} ({err}); check the module is on the "
                                  "Python path, or give a .py file") from None
            raise UserCodeError(describe_user_exception(f"imports: {name}", err) + "; fix the import or "
                                "install the missing package") from err
        except SyntaxError as err:
            raise UserCodeError(f"imports: {name} has a syntax error at {err.filename}:{err.lineno}: {err.msg}; "
                                "fix the file") from err
        except Exception as err:
            raise UserCodeError(describe_user_exception(f"imports: {name}", err) + "; fix the code there") from err
