"""Run pproxy 2.7.9 on uvloop 0.23.

pproxy's main() calls ``uvloop.install()`` and then ``asyncio.get_event_loop()``; with
uvloop 0.23 the installed policy has no current loop, so pproxy dies at start with
"There is no current event loop".  Replace ``install`` with one that also creates and
sets a uvloop loop, then hand over to pproxy.  Usage: python pproxy_uvloop.py ARGS...
"""

import asyncio
import sys

import uvloop


def _install() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(uvloop.new_event_loop())


uvloop.install = _install  # pproxy calls uvloop.install()

if __name__ == "__main__":
    from pproxy.server import main  # type: ignore[import-not-found]  # after the patch

    sys.exit(main())
