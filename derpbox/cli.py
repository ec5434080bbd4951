"""derpbox's command line: derper's flags, plus subcommands added over time."""

from __future__ import annotations

import os
import signal
import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    Logger,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)

from . import __version__
from .config import ConfigError, UsageRequested, load_settings

log = Logger()

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}


_FACTORY_NOISE = ("Starting factory {factory!r}", "Stopping factory {factory!r}")


def _quiet_twisted(event) -> PredicateResult:
    """Twisted announces every port through the legacy log ("X starting on N") and
    every client factory (one per admission request); derpbox logs what matters
    itself, so those lines are debug noise unless errors."""
    legacy = event.get("log_namespace") == "log_legacy" and not event.get("isError")
    if legacy or event.get("log_format") in _FACTORY_NOISE:
        event["log_level"] = LogLevel.debug
    return PredicateResult.maybe


def _start_logging(level: str, fmt: str) -> None:
    observer = jsonFileLogObserver(sys.stderr, "") if fmt == "json" else textFileLogObserver(sys.stderr)
    predicates = [_quiet_twisted, LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])]
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, predicates)], redirectStandardIO=False)


def serve(argv: list[str], environ=os.environ) -> int:
    try:
        settings = load_settings(argv, environ)
    except UsageRequested as u:
        sys.stdout.write(u.usage)
        return 0
    except ConfigError as e:
        sys.stderr.write(f"derpbox: {e}\n")
        return 2
    if settings.version_requested:
        sys.stdout.write(f"derpbox {__version__}\n")
        return 0
    _start_logging(settings.log_level, settings.log_format)

    from twisted.internet import reactor

    from .service import DerpboxService

    try:
        service = DerpboxService(settings, reactor, environ)
    except (ConfigError, OSError) as e:
        log.critical("cannot start: {error}", error=str(e))
        return 2
    exit_code = []

    def failed(failure):
        log.critical("cannot start: {error}", error=failure.getErrorMessage())
        exit_code.append(1)
        reactor.stop()

    def start():
        try:
            service.startService()
        except OSError as e:
            failed_msg = str(e)
            log.critical("cannot start: {error}", error=failed_msg)
            exit_code.append(1)
            reactor.stop()
            return
        service.listening().addErrback(failed)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return exit_code[0] if exit_code else 0


def _subcommand(name: str):
    """The entry point of a subcommand, imported only when used."""
    if name == "healthcheck":
        from .checks import healthcheck_main

        return healthcheck_main
    if name == "check":
        from .checks import check_main

        return check_main
    if name == "derpmap":
        from .derpmap import derpmap_main

        return derpmap_main
    return serve


SUBCOMMANDS = ("serve", "healthcheck", "check", "derpmap")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # SIGPIPE is ignored by Python already; restore default SIGINT for a clean ^C exit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Flags alone mean "serve", as derper's command line has no subcommand.
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0])(argv[1:], os.environ)
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
