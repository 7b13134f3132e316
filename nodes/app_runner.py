"""Runs one payment app's ``make_order`` in a fresh, locked-down interpreter.

The chip starts this file with ``python -I -S`` (no site, no environment, no
project on the path: standard library only), an empty environment and an
empty working directory (``nodes/sandbox.py``). It then:

1. caps its own CPU time, address space and open files (hard limits, so the
   app cannot raise them again);
2. imports the few standard modules an app may use, while files can still be
   opened;
3. as root, chroots into the empty directory and becomes ``nobody``: no key
   file of the deployment is reachable any more;
4. waits for one JSON request on stdin: the code bytes the trust module
   measured, the static and dynamic data, the call's arguments;
5. installs an audit hook that refuses opening files, ``os`` calls, sockets,
   subprocesses, ctypes and imports outside the allowlist, in every case;
6. runs the code with those bytes and answers one JSON object on stdout:
   ``{"order": ..., "dynamic": ...}``, ``{"refused": reason}`` when the app
   says no (``ValueError``), or ``{"error": what}`` when it failed.

Nothing here is trusted by the chip: it checks whatever comes back. What this
file guarantees is only that the app sees nothing secret and touches nothing.
"""

import base64
import json
import os
import resource
import sys

CPU_S = 2
ADDRESS_SPACE = 512 * 1024 * 1024
OPEN_FILES = 16
MAX_REQUEST = 4 * 1024 * 1024
ALLOWED_IMPORTS = frozenset(
    {"__future__", "typing", "math", "decimal", "fractions", "json", "datetime", "re", "string"}
)
# audit events (exact names, or prefixes ending in a dot) an app never needs: "open" covers
# every file opened by name, os.open and io.open_code included
REFUSED_EVENTS = ("open", "socket.", "subprocess.", "ctypes.", "os.", "shutil.", "pty.", "resource.", "mmap.")


def limit_resources() -> None:
    for which, value in (
        (resource.RLIMIT_CPU, CPU_S),
        (resource.RLIMIT_AS, ADDRESS_SPACE),
        (resource.RLIMIT_NOFILE, OPEN_FILES),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


def drop_privileges() -> None:
    """As root: lock this process into the empty working directory as ``nobody``."""
    if os.geteuid() != 0:
        return
    import pwd  # only needed here, and /etc/passwd must be read before the chroot

    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid = gid = 65534
    os.chroot(".")
    os.chdir("/")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def refuse(event: str, args: tuple[object, ...]) -> None:
    if event == "import":
        name = str(args[0]).split(".", 1)[0] if args else ""
        if name not in ALLOWED_IMPORTS:
            raise PermissionError(f"the payment app may not import {args[0]!r}")
        return
    if any(
        event == prefix or (prefix.endswith(".") and event.startswith(prefix)) for prefix in REFUSED_EVENTS
    ):
        raise PermissionError(f"the payment app may not do {event!r}")


def safe_import(
    name: str, globals_: object = None, locals_: object = None, fromlist: object = (), level: int = 0
) -> object:
    if level != 0 or name.split(".", 1)[0] not in ALLOWED_IMPORTS:
        raise ImportError(f"the payment app may not import {name!r}")
    return __import__(name, globals_, locals_, fromlist, level)  # type: ignore[arg-type]


def app_builtins() -> dict[str, object]:
    import builtins

    names = dict(vars(builtins))
    for name in ("open", "input", "breakpoint", "exit", "quit", "help", "copyright", "credits", "license"):
        names.pop(name, None)
    names["__import__"] = safe_import
    return names


def run(request: dict[str, object]) -> dict[str, object]:
    code = base64.b64decode(str(request["code"]))
    static = json.loads(base64.b64decode(str(request["static"])))
    dynamic = json.loads(base64.b64decode(str(request["dynamic"])))
    call = request["call"]
    if not isinstance(call, dict):
        return {"error": "the call's arguments are not a map"}
    compiled = compile(code, "<payment app>", "exec")
    scope: dict[str, object] = {"__builtins__": app_builtins(), "__name__": "trustpay_app"}
    sys.addaudithook(refuse)  # from here on, nothing the app does can open or reach anything
    try:
        exec(compiled, scope)
        make_order = scope.get("make_order")
        if not callable(make_order):
            return {"error": "the app defines no make_order function"}
        result = make_order(static, dynamic, **call)
    except ValueError as exc:  # the app's own "no": an amount over its limit, a wrong currency
        return {"refused": str(exc)[:500]}
    except BaseException as exc:  # anything else the app raises is its failure
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    if not (isinstance(result, tuple) and len(result) == 2):
        return {"error": "make_order must return (order fields, next dynamic data)"}
    return {"order": result[0], "dynamic": result[1]}


def main() -> None:
    limit_resources()
    for name in sorted(ALLOWED_IMPORTS):  # while files can still be opened
        __import__(name)
    drop_privileges()
    raw = sys.stdin.buffer.read(MAX_REQUEST)
    real_out = sys.stdout
    sys.stdout = sys.stderr  # what the app prints is not the answer
    try:
        answer = run(json.loads(raw))
        text = json.dumps(answer)
    except BaseException as exc:  # a malformed request or an unencodable answer
        text = json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]})
    real_out.write(text + "\n")  # one line: the chip reads it and need not wait for this process to end
    real_out.flush()


if __name__ == "__main__":
    main()
