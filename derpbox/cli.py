"""derpbox's command line: derper's flags, plus subcommands added over time."""

from __future__ import annotations

import os
import signal
import sys

from twisted.logger import Logger

from . import __version__
from .config import ConfigError, UsageRequested, load_settings
from .keys import KeyFileError
from .logs import start_logging
from .oslimits import raise_open_files
from .workers import supervisor
from .workers.context import from_environ
from .workers.host import available_cpus, die_with_parent

log = Logger()


def serve(argv: list[str], environ=os.environ) -> int:
    try:
        settings = load_settings(argv, environ)
    except UsageRequested as u:
        sys.stdout.write(SUBCOMMANDS_USAGE + "\n" + u.usage)
        return 0
    except ConfigError as e:
        sys.stderr.write(f"derpbox: {e}\n")
        return 2
    if settings.version_requested:
        sys.stdout.write(f"derpbox {__version__}\n")
        return 0
    worker = from_environ(environ)
    count = settings.workers or available_cpus()
    start_logging(settings.log_level, settings.log_format, worker=worker.index if worker else None)
    if worker is None:
        # Workers inherit the raised limit from the supervisor.
        before, after = raise_open_files()
        log.info("open files: up to {after}{raised}", after=after,
                 raised=f" (soft limit raised from {before})" if after != before else "")
    if worker is None and count > 1:
        return supervisor.run(settings, argv, environ, count)
    if worker is not None:
        die_with_parent(worker.supervisor)

    # Here, not at the top: only serve runs a reactor, and it must be installed before
    # anything imports Twisted's default one.
    from .reactor import install_relay_reactor

    reactor = install_relay_reactor()

    from .service import DerpboxService

    try:
        service = DerpboxService(settings, reactor, environ, worker=worker)
    except (ConfigError, KeyFileError, OSError) as e:
        log.critical("cannot start: {error}", error=str(e))
        return 2
    exit_code = []

    def failed(failure):
        # One line naming what failed (a ListenError says which listener, address and why).
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
    """The entry point of a subcommand, imported only when used (serve needs none of them)."""
    if name == "healthcheck":
        from .checks.healthcheck import healthcheck_main

        return healthcheck_main
    if name == "check":
        from .checks.command import check_main

        return check_main
    if name == "derpmap":
        from .derpmap import derpmap_main

        return derpmap_main
    return serve


SUBCOMMANDS = ("serve", "healthcheck", "check", "derpmap")
SUBCOMMANDS_USAGE = """\
Usage: derpbox [flags]                 serve: run the relay (derper's flags, below)
       derpbox serve [flags]           the same
       derpbox healthcheck [flags]     check this node's own listeners, certificate and workers
                                       (exit 0 when healthy: a container HEALTHCHECK)
       derpbox check TARGET...         check DERP nodes or a DERP map from outside, as a client would
       derpbox derpmap [flags]         print this node's DERP map region (JSON) for Headscale or the
                                       Tailscale admin console
Run "derpbox SUBCOMMAND -h" for a subcommand's own options.
"""


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
