"""Container entrypoint for derpbox: check the DERP_* settings, show them, then exec derpbox.

    entrypoint.py [derper flags...]                   serve (the default)
    entrypoint.py healthcheck|derpmap [flags...]      the same settings, another subcommand
    entrypoint.py check TARGET ... / -h / -version    passed to derpbox unchanged

Settings come from derpbox's own rules (derpbox.config.load_settings): command-line
flags > DERP_* variables (primary name, then aliases) > YAML config file > defaults.
This script adds one source, DERP_EXTRA_ARGS (alias DERPER_EXTRA_ARGS): a derper
command line, split like a shell would (shlex), so an existing
``derper --hostname=... --certmode=manual`` can be pasted as it is (a leading
"derper"/"derpbox" program name is dropped). Those flags go before the
entrypoint's own arguments, so:

    entrypoint arguments (compose `command:`) > DERP_EXTRA_ARGS > DERP_* variables

For serve, the effective settings are printed to stderr with secrets redacted
(settings marked secret, URL credentials and query strings), together with a
warning for each primary/alias pair that is set to different values. A bad value
stops the container with exit status 2 and derpbox's message, which names the
variable, the value and the accepted forms. Then the process is replaced
(os.execve) by ``python -m derpbox ...``, so derpbox is PID 1 and gets SIGTERM.

The image sets DERP_CONFIG_PATH and DERP_CERT_DIR to paths in its volume. A user
coming from another image may set an alias instead (DERP_KEY_FILE, CERT_DIR, ...);
since a primary name beats its aliases, an image default still equal to IMAGE_DEFAULTS
is dropped when one of its aliases is set, so the user's alias wins.

DERPBOX_ENTRYPOINT_DRY_RUN=1 (for tests): instead of exec, print one JSON object
to stdout, {"argv": [...], "unset": [...], "settings": {flag: shown value}}, with
the same redaction, and exit 0.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
from urllib.parse import urlsplit, urlunsplit

from derpbox.config import DEFAULT_HOSTNAME, SETTINGS_TABLE, ConfigError, UsageRequested, load_settings

PROG = "derpbox-entrypoint"
EXTRA_ARGS_ENV = ("DERP_EXTRA_ARGS", "DERPER_EXTRA_ARGS")  # primary first
DRY_RUN_ENV = "DERPBOX_ENTRYPOINT_DRY_RUN"
# Must match the Dockerfile's ENV lines (tests/test_container_files.py checks it).
IMAGE_DEFAULTS = {
    "DERP_CONFIG_PATH": "/var/lib/derpbox/derper.key",
    "DERP_CERT_DIR": "/var/lib/derpbox/certs",
}
# derpbox.cli.SUBCOMMANDS (not imported: it pulls in Twisted); a test keeps them equal.
SUBCOMMANDS = ("serve", "healthcheck", "check", "derpmap")
# Subcommands that take the server's flags, so DERP_EXTRA_ARGS applies to them too.
FLAG_SUBCOMMANDS = ("serve", "healthcheck", "derpmap")
REDACTED = "<redacted>"
_SECRET_FLAGS = {opt.flag for opt in SETTINGS_TABLE if opt.secret}
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s,]+")


class EntrypointError(Exception):
    pass


def warn(message: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def extra_args(environ: dict[str, str]) -> list[str]:
    """DERP_EXTRA_ARGS (or its alias) split into arguments; empty when unset."""
    found = [(name, environ[name]) for name in EXTRA_ARGS_ENV if environ.get(name, "").strip()]
    if not found:
        return []
    name, text = found[0]
    for other, other_text in found[1:]:
        if other_text != text:
            warn(f"{name} and {other} are both set and differ; using {name}")
    try:
        args = shlex.split(text)
    except ValueError as e:
        # The value may hold a secret flag, so it is not echoed.
        raise EntrypointError(f"environment variable {name} is not a valid command line ({e}); "
                              "accepted: derper flags as in a shell, e.g. --hostname=derp.example.com "
                              "-certmode manual") from None
    if args and os.path.basename(args[0]) in ("derper", "derpbox"):
        args = args[1:]
    return args


def drop_shadowing_image_defaults(environ: dict[str, str]) -> list[str]:
    """Remove image defaults that would hide an alias the user set; returns the removed names."""
    removed = []
    for opt in SETTINGS_TABLE:
        if not opt.env or opt.env[0].name not in IMAGE_DEFAULTS:
            continue
        primary = opt.env[0].name
        if environ.get(primary) != IMAGE_DEFAULTS[primary]:
            continue
        alias = next((env.name for env in opt.env[1:] if environ.get(env.name, "").strip()), None)
        if alias:
            del environ[primary]
            removed.append(primary)
            sys.stderr.write(f"{PROG}: {alias} is set, so it replaces the image default "
                             f"{primary}={IMAGE_DEFAULTS[primary]}\n")
    return removed


def redact_text(text: str) -> str:
    """Hide credentials and query strings of any URLs in text."""

    def one(match: re.Match) -> str:
        url = match.group(0)
        try:
            parts = urlsplit(url)
        except ValueError:
            return REDACTED
        netloc = parts.netloc
        if "@" in netloc:
            netloc = REDACTED + "@" + netloc.rpartition("@")[2]
        query = REDACTED if parts.query else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    return _URL.sub(one, text)


def redact_argv(argv: list[str]) -> list[str]:
    """argv with the values of secret flags hidden and URLs redacted."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        name, has_value, _ = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in _SECRET_FLAGS:
            if has_value:
                out.append(arg.partition("=")[0] + "=" + REDACTED)
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact_text(arg))
    return out


def show_value(opt, value) -> str:
    """A setting's value as shown to the operator, secrets and URL credentials hidden."""
    if opt.secret:
        return REDACTED if value else ""
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        if math.isinf(value):
            text = "+Inf" if value > 0 else "-Inf"
        else:
            text = f"{value:g}" + ("s" if opt.kind.type_name == "duration" else "")
    elif isinstance(value, (tuple, list)):
        text = ",".join(str(item) for item in value)
    else:
        text = str(value)
    return redact_text(text)


def source_of(opt, cli_flags: set[str], extra_flags: set[str], environ: dict[str, str], config_file) -> str:
    if opt.flag in cli_flags:
        return "command line"
    if opt.flag in extra_flags:
        return "DERP_EXTRA_ARGS"
    for env in opt.env:
        if environ.get(env.name, "").strip():
            return env.name
    return "config file or default" if config_file else "default"


def flags_in(argv: list[str]) -> set[str]:
    """Flag names given in argv (derper's syntax); best effort, for the report only."""
    known = {opt.flag for opt in SETTINGS_TABLE}
    return {name for arg in argv if arg.startswith("-")
            for name in [arg.lstrip("-").partition("=")[0]] if name in known}


def require_hostname(settings) -> None:
    """derper's default hostname is Tailscale's own: a container left with it would ask
    Let's Encrypt for derp.tailscale.com forever. Say what to set instead."""
    if settings.hostname == DEFAULT_HOSTNAME and not settings.dev and not settings.version_requested:
        raise EntrypointError(
            "DERP_DOMAIN is not set: set it in .env to this relay's public DNS name (or its public IP "
            "address, for a pinned self-signed certificate); without it derpbox would serve "
            f"{DEFAULT_HOSTNAME}, Tailscale's own name")


def main(argv: list[str], environ: dict[str, str]) -> int:
    subcommand = argv[0] if argv and argv[0] in SUBCOMMANDS else ""
    args = argv[1:] if subcommand else list(argv)
    unset = drop_shadowing_image_defaults(environ)
    settings = None
    report: dict[str, str] = {}
    extra: list[str] = []
    try:
        extra = extra_args(environ) if subcommand in ("",) + FLAG_SUBCOMMANDS else []
        flags = extra + args
        if subcommand in ("", "serve"):
            settings = load_settings(flags, environ)
            require_hostname(settings)
    except UsageRequested:
        settings = None  # derpbox prints the usage itself
    except (ConfigError, EntrypointError) as e:
        hint = ""
        if isinstance(e, ConfigError) and extra:
            hint = f" (the flags came from {EXTRA_ARGS_ENV[0]} and then the container's arguments)"
        sys.stderr.write(f"{PROG}: {e}{hint}\n")
        return 2
    exec_argv = [sys.executable, "-m", "derpbox"] + ([subcommand] if subcommand else []) + flags
    if settings is not None and not settings.version_requested:
        for message in settings.warnings:
            warn(message)
        cli_flags, extra_flags = flags_in(args), flags_in(extra)
        sys.stderr.write(f"{PROG}: effective settings (sources: command line > DERP_EXTRA_ARGS > "
                         "environment > config file > default):\n")
        for opt in SETTINGS_TABLE:
            if opt.field == "version_requested":
                continue
            shown = show_value(opt, getattr(settings, opt.field))
            report[opt.flag] = shown
            source = source_of(opt, cli_flags, extra_flags, environ, settings.config_file)
            sys.stderr.write(f"  -{opt.flag} = {shown!r} ({source})\n")
        sys.stderr.flush()
    if environ.get(DRY_RUN_ENV, "") not in ("", "0"):
        json.dump({"argv": redact_argv(exec_argv), "unset": unset, "settings": report}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    sys.stdout.flush()
    os.execve(sys.executable, exec_argv, environ)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dict(os.environ)))
