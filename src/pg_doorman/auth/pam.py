"""Password checks through PAM (a user's `auth_pam_service`), via Linux-PAM's libpam.

The client sends its password in clear text; PAM decides (pam_authenticate, then
pam_acct_mgmt, as PostgreSQL's own `pam` method does). PAM modules may block (a
directory lookup, the delay pam_unix adds after a failure), so each check runs in a
thread of its own (PamChecks), never on the event loop.

A service name containing "/" is a path: the file is read instead of
/etc/pam.d/<name> (Linux-PAM's pam_start_confdir), so a service can live next to the
pooler's config.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import threading
from typing import Final

# From <security/_pam_types.h>.
_PAM_SUCCESS: Final = 0
_PAM_BUF_ERR: Final = 5
_PAM_CONV_ERR: Final = 19
_PAM_RHOST: Final = 4
_PAM_PROMPT_ECHO_OFF: Final = 1
_PAM_PROMPT_ECHO_ON: Final = 2
_PAM_SILENT: Final = 0x8000
_PAM_DISALLOW_NULL_AUTHTOK: Final = 0x0001

# Checks at once, at most: each holds a thread while a module works.
PAM_THREADS: Final = 4


class PamUnavailable(Exception):
    """libpam can't be loaded (or is too old for a service given as a path)."""


class _Message(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class _Response(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


_CONVERSE = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.POINTER(_Message)),
    ctypes.POINTER(ctypes.POINTER(_Response)),
    ctypes.c_void_p,
)


class _Conversation(ctypes.Structure):
    _fields_ = [("conv", _CONVERSE), ("appdata_ptr", ctypes.c_void_p)]


class _Library:
    def __init__(self) -> None:
        name = ctypes.util.find_library("pam") or "libpam.so.0"
        try:
            pam = ctypes.CDLL(name)
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError as exc:
            raise PamUnavailable(f"PAM is not available: {exc}") from None
        handle = ctypes.POINTER(ctypes.c_void_p)
        pam.pam_start.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.POINTER(_Conversation),
            ctypes.POINTER(handle),
        ]
        pam.pam_start.restype = ctypes.c_int
        self.start_confdir = getattr(pam, "pam_start_confdir", None)
        if self.start_confdir is not None:
            self.start_confdir.argtypes = [
                ctypes.c_char_p,
                ctypes.c_char_p,
                ctypes.POINTER(_Conversation),
                ctypes.c_char_p,
                ctypes.POINTER(handle),
            ]
            self.start_confdir.restype = ctypes.c_int
        for function in (pam.pam_authenticate, pam.pam_acct_mgmt):
            function.argtypes = [handle, ctypes.c_int]
            function.restype = ctypes.c_int
        pam.pam_set_item.argtypes = [handle, ctypes.c_int, ctypes.c_void_p]
        pam.pam_set_item.restype = ctypes.c_int
        pam.pam_end.argtypes = [handle, ctypes.c_int]
        pam.pam_end.restype = ctypes.c_int
        pam.pam_strerror.argtypes = [handle, ctypes.c_int]
        pam.pam_strerror.restype = ctypes.c_char_p
        libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
        libc.calloc.restype = ctypes.c_void_p
        libc.strdup.argtypes = [ctypes.c_char_p]
        libc.strdup.restype = ctypes.c_void_p
        self.pam = pam
        self.libc = libc
        self.handle_type = handle


_library: _Library | None = None


def _loaded() -> _Library:
    global _library
    if _library is None:
        _library = _Library()
    return _library


def check_service(service: str) -> None:
    """PamUnavailable when `service` can't be used here (no libpam; a path without
    pam_start_confdir, or naming no file)."""
    library = _loaded()
    if "/" in service:
        if library.start_confdir is None:
            raise PamUnavailable(
                "this libpam has no pam_start_confdir: give a service name from /etc/pam.d"
            )
        if not os.path.isfile(service):
            raise PamUnavailable(f"no PAM service file {service!r}")


class PamChecks:
    """Runs checks in threads, at most PAM_THREADS at once. The threads are daemons and
    started per check: a module that never returns can't hold up the pooler's exit,
    as it would in a ThreadPoolExecutor, whose threads the interpreter waits for."""

    def __init__(self, limit: int = PAM_THREADS) -> None:
        self._slots = asyncio.Semaphore(limit)

    async def check(
        self, service: str, user: str, password: str, remote_host: str | None
    ) -> str | None:
        """authenticate() in a thread of its own, once a slot is free."""
        async with self._slots:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[str | None] = loop.create_future()

            def settle(result: str | None, error: BaseException | None) -> None:
                if done.cancelled():
                    return
                if error is not None:
                    done.set_exception(error)
                else:
                    done.set_result(result)

            def run() -> None:
                result: str | None = None
                error: Exception | None = None
                try:
                    result = authenticate(service, user, password, remote_host)
                except Exception as exc:
                    error = exc
                with contextlib.suppress(RuntimeError):  # the loop is closed: no one waits
                    loop.call_soon_threadsafe(settle, result, error)

            threading.Thread(target=run, name="pam", daemon=True).start()
            return await done


def authenticate(service: str, user: str, password: str, remote_host: str | None) -> str | None:
    """None when PAM accepts `user` with `password`; else PAM's reason. Blocking."""
    library = _loaded()
    pam, libc = library.pam, library.libc
    secret = password.encode("utf-8")

    def converse(
        count: int,
        messages: ctypes._Pointer[ctypes._Pointer[_Message]],
        responses: ctypes._Pointer[ctypes._Pointer[_Response]],
        _data: int | None,
    ) -> int:
        # PAM frees the answers: they must come from malloc. (An exception can't cross
        # into C: it would be printed and the call taken for a success.)
        try:
            answers = libc.calloc(count, ctypes.sizeof(_Response))
            if not answers:
                return _PAM_BUF_ERR
            array = ctypes.cast(answers, ctypes.POINTER(_Response))
            for i in range(count):
                if messages[i].contents.msg_style in (_PAM_PROMPT_ECHO_OFF, _PAM_PROMPT_ECHO_ON):
                    array[i].resp = libc.strdup(secret)
            responses[0] = array
            return _PAM_SUCCESS
        except Exception:
            return _PAM_CONV_ERR

    callback = _CONVERSE(converse)  # referenced until pam_end below
    conversation = _Conversation(callback, None)
    handle = library.handle_type()
    if "/" in service:
        if library.start_confdir is None:
            return "this libpam can't read a service from a path"
        directory, name = os.path.split(service)
        status = library.start_confdir(
            name.encode(), user.encode(), ctypes.byref(conversation), directory.encode(),
            ctypes.byref(handle),
        )  # fmt: skip
    else:
        status = pam.pam_start(
            service.encode(), user.encode(), ctypes.byref(conversation), ctypes.byref(handle)
        )
    if status != _PAM_SUCCESS:
        return f"pam_start failed ({status})"
    try:
        if remote_host:
            host = ctypes.create_string_buffer(remote_host.encode())
            pam.pam_set_item(handle, _PAM_RHOST, ctypes.cast(host, ctypes.c_void_p))
        status = pam.pam_authenticate(handle, _PAM_SILENT | _PAM_DISALLOW_NULL_AUTHTOK)
        if status == _PAM_SUCCESS:
            status = pam.pam_acct_mgmt(handle, _PAM_SILENT)
        if status == _PAM_SUCCESS:
            return None
        reason = pam.pam_strerror(handle, status)
        return reason.decode("utf-8", "replace") if reason else f"PAM error {status}"
    finally:
        pam.pam_end(handle, status)
