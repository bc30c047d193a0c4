"""``spanctl``: the operator CLI (talosctl's conventions).

    spanctl [--config F] [--context C] [-e EP,...] [-n NODE,...] [--socket PATH] COMMAND ...

Output goes to stdout; per-node errors are printed after it on stderr (``error from node X: ...``)
and make the exit status 1. Connection problems are one clear line, never a stack trace.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO

import grpc

from .app import App, UsageError
from .client import ConnectionSetupError, describe_rpc_error
from .config import ConfigError
from .parser import build_parser, normalise


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = build_parser()
    ns = parser.parse_args(argv)
    normalise(ns)
    if not getattr(ns, "fn", None):
        parser.print_help(err)
        return 2
    app = App(ns, out, err)
    try:
        ns.fn(app)
    except (ConnectionSetupError, ConfigError, UsageError) as e:
        out.flush()
        print(f"spanctl: {e}", file=err)
        return 1
    except grpc.RpcError as e:
        out.flush()
        print(f"spanctl: {describe_rpc_error(e, app.target.where if app._target else '?')}", file=err)
        return 1
    except OSError as e:
        out.flush()
        print(f"spanctl: {e}", file=err)
        return 1
    except KeyboardInterrupt:
        out.flush()
        return 130 if not app.errors else app.errors.report(err)
    except BrokenPipeError:
        return 0
    finally:
        if app._target is not None:
            app._target.close()
    out.flush()
    return app.errors.report(err)


if __name__ == "__main__":
    sys.exit(main())
