"""The command line that made a card, as provenance: `faceset model …` as the user ran it.

Rebuilt from the click context rather than read from sys.argv, so it is the same whether the command came from
a shell, `python -m` or a test runner: the command's words, then every argument and option the user gave on the
command line (defaults left out), each value as given (paths as typed, not resolved). Credentials a URL carries
(`https://user:token@host`, `?token=…`) are masked: a card is shipped and shown, a secret must not be.
"""
from __future__ import annotations

import re
import shlex

import typer

_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&](?:access_)?(?:token|key|secret|password|sig|signature)=)[^&#\s]+",
                           re.IGNORECASE)
MASK = "***"


def masked(word: str) -> str:
    """`word` with a URL's user:password and secret query values replaced by ***."""
    word = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", word)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", word)


def _words(param, value) -> list[str]:
    values = value if param.multiple or (param.nargs != 1 and isinstance(value, (list, tuple))) else [value]
    if param.param_type_name == "argument":
        return [str(v) for v in values]
    if getattr(param, "is_flag", False) and isinstance(value, bool):
        return [param.opts[0] if value else param.secondary_opts[0]] if value or param.secondary_opts else []
    return [w for v in values for w in (param.opts[0], str(v))]


def command_as_run(ctx: typer.Context, prefix: tuple[str, ...] = ("faceset", "model")) -> str:
    """`prefix` + the command's name + what the user gave on the command line, shell-quoted, secrets masked."""
    words = [*prefix, ctx.info_name or ctx.command.name]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)  # typer's own click: compare by name, not by the enum
        if getattr(source, "name", None) == "COMMANDLINE" and ctx.params.get(param.name) is not None:
            words += _words(param, ctx.params[param.name])
    return shlex.join(masked(w) for w in words)
