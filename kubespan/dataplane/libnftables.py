"""libnftables through ctypes: ``nft -j`` commands run in this process.

The library the ``nft`` command is built on (same commands, same JSON, same error text); running
a command here saves a fork and exec of ``nft`` (10-20 ms). Used by
:class:`~kubespan.dataplane.nft.NftManager` when it is installed and no namespace or runner is given.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Sequence


class LibNftables:
    """``nft -j ...`` commands run by libnftables in this process (one context, one at a time).

    The context (and its netlink socket) is created at the first command, in the network
    namespace the process is in then. Commands run in a worker thread (ctypes releases the GIL).
    """

    _JSON_OUTPUT = 1 << 4  # NFT_CTX_OUTPUT_JSON

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._ctx: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls) -> LibNftables | None:
        """None when libnftables is missing or ``KUBESPAN_NFT_EXEC=1`` asks for the ``nft`` command."""
        if os.environ.get("KUBESPAN_NFT_EXEC") == "1":
            return None
        # the soname first: find_library runs ldconfig (a fork and exec) and is only the fallback
        for find in (lambda: "libnftables.so.1", lambda: ctypes.util.find_library("nftables")):
            name = find()
            if not name:
                continue
            try:
                return cls(ctypes.CDLL(name))
            except (OSError, AttributeError):
                continue
        return None

    def run(self, args: Sequence[str], stdin: bytes | None) -> tuple[int, bytes, bytes]:
        """``args`` as given to ``nft`` (``-j`` first): ``-j -f -`` runs ``stdin``, else the command words."""
        if list(args[:1]) != ["-j"]:
            raise ValueError(f"only JSON commands run in-process, not {list(args)}")
        rest = list(args[1:])
        buf = (stdin or b"") if rest == ["-f", "-"] else " ".join(rest).encode()
        with self._lock:
            if self._ctx is None:
                ctx = self._lib.nft_ctx_new(0)
                if not ctx:
                    raise OSError("nft_ctx_new failed")
                self._lib.nft_ctx_output_set_flags(ctx, self._JSON_OUTPUT)
                self._lib.nft_ctx_buffer_output(ctx)
                self._lib.nft_ctx_buffer_error(ctx)
                self._ctx = ctx
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, buf)
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        return (0 if rc == 0 else 1), out, err


_libnft: LibNftables | None = None
_libnft_loaded = False


def libnftables() -> LibNftables | None:
    """The process's shared :class:`LibNftables` (None: not available)."""
    global _libnft, _libnft_loaded
    if not _libnft_loaded:
        _libnft, _libnft_loaded = LibNftables.load(), True
    return _libnft
