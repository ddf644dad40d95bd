"""`skin-offline` command line: the app, the error mapping, and the registry of command modules.

Every command lives in skin_offline/commands/*.py and exposes `register(app, friendly)`; its heavy imports stay
inside the command body so `--help` is instant. Exit codes: 0 ok, 1 other error, 2 usage (bad option values,
out-of-range configuration), 3 bad input (image/question), 4 bundle/checkpoint, 5 device, 130 interrupted
(Ctrl-C prints what was generated so far).
"""

from __future__ import annotations

import sys
from functools import wraps

import typer
from typer._click import exceptions as click_errors  # typer 0.29 vendors click; its errors are these classes
from typer.core import TyperGroup

from .errors import SkinOfflineError

DEBUG_ENV = "SKIN_OFFLINE_DEBUG"  # set to see the traceback of an unexpected error


def _one_line(msg: str) -> str:
    return " ".join(line.strip() for line in str(msg).splitlines() if line.strip())


def fail(msg: str, code: int) -> None:
    typer.echo(f"error: {_one_line(msg)}", err=True)
    raise typer.Exit(code)


class _OneLineUsageErrors(TyperGroup):
    """click's own usage errors (an unknown option, a value outside an enum's choices, a missing argument, a number
    out of its range) printed like every other error: one `error: ...` line naming the command's --help, exit 2
    (typer would draw a multi-line box around them)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # bare `skin-offline`: the help text, as before
            e.show()
            sys.exit(e.exit_code)
        except click_errors.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {_one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Run the SkinVL dermatology VLM offline.", cls=_OneLineUsageErrors
)


def friendly(fn):
    """Turn our named errors into one line + exit code; never a traceback for expected failures."""

    @wraps(fn)
    def wrapper(*a, **kw):
        import errno
        import os

        try:
            return fn(*a, **kw)
        except (typer.Exit, typer.Abort, click_errors.ClickException):  # not errors (usage errors: printed by the app)
            raise
        except SkinOfflineError as e:  # ConfigError (a ValueError too) lands here: a usage error, exit 2
            fail(str(e), e.exit_code)
        except MemoryError:
            fail("out of memory; try a smaller precision (int4) or close other programs", 1)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except BrokenPipeError:  # `skin-offline ask ... | head`: the reader left; stay quiet like other tools
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                fail(f"disk full ({e.filename or 'output'}); free space and retry", 1)
            if os.environ.get(DEBUG_ENV):
                raise
            fail(f"{e.strerror or e} ({e.filename}); check the path and permissions", 1)
        except Exception as e:  # last resort: still one line, never a traceback (unless debugging)
            if os.environ.get(DEBUG_ENV):
                raise
            fail(f"unexpected {type(e).__name__}: {e}; rerun with {DEBUG_ENV}=1 for the traceback and report it", 1)

    return wrapper


# Command modules (skin_offline/commands/NAME.py), in the order `--help` lists their commands. Add one line per module.
COMMAND_MODULES: list[str] = [
    "ask",  # ask, chat
    "export",  # export, make-demo-checkpoint
    "quantize",
    "bundle",  # info, verify
    "eval",  # eval, classify, classify-eval
    "bench",
    "tensorrt",  # build-engines (TensorRT engines)
    "serve",
]


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"skin_offline.commands.{name}").register(app, friendly)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
