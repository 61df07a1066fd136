"""Running untrusted generated code: one process per answer, confined by the kernel.

Each run gets, before the interpreter starts (a small launcher confines itself, then execs it):

- a fresh temporary directory as its working directory, removed afterwards;
- an empty environment (PATH=/usr/bin:/bin only; the caller may pass named variables, e.g. a q
  licence's QHOME/QLIC);
- limits (setrlimit): CPU seconds, address space (memory), the size of any file it writes
  (stdout and stderr go to files in its directory, so huge output stops at the cap), open files,
  and no new processes or threads (RLIMIT_NPROC 0: a fork bomb's first fork fails);
- no network: a new, empty network namespace (with a user namespace, no privilege needed) where
  the kernel allows it;
- no writes outside its directory and no exec of anything but the interpreter: a Landlock
  ruleset (Linux 5.13+) where the kernel has it.

A wall-clock timeout kills its process group. What was enforced is reported (`isolation()`), so
results never claim more than the machine gave. Python answers also run under an audit hook
(see PY_GUARD) that refuses file writes outside the directory, sockets and process creation, a
second wall where Landlock or namespaces are missing.

Our own because the libraries we use have no such runner: this is the part of the harness a
reviewer must trust, so it is small and each confinement has a hostile test (tests/test_eval.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OUTPUT_CAP = 1 << 20  # bytes of stdout (and of stderr) kept; writing more stops the answer

# Landlock (include/uapi/linux/landlock.h): syscalls 444-446 on x86_64 and arm64.
_SYS_CREATE, _SYS_ADD_RULE, _SYS_RESTRICT = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_RULE_PATH_BENEATH = 1
_FS_EXECUTE = 1 << 0
_FS_WRITE = (  # every right that creates, changes or removes a file (ABI 1)
    (1 << 1)  # WRITE_FILE
    | (1 << 4)  # REMOVE_DIR
    | (1 << 5)  # REMOVE_FILE
    | (1 << 6)  # MAKE_CHAR
    | (1 << 7)  # MAKE_DIR
    | (1 << 8)  # MAKE_REG
    | (1 << 9)  # MAKE_SOCK
    | (1 << 10)  # MAKE_FIFO
    | (1 << 11)  # MAKE_BLOCK
    | (1 << 12)  # MAKE_SYM
)
_FS_TRUNCATE = 1 << 14  # ABI 3
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000

# Run before a Python answer (python -I -S guard.py answer.py): PEP 578 audit hooks cannot be
# removed once added, and refuse what an answer has no business doing.
PY_GUARD = r"""
import sys, os
_root = os.path.realpath(os.getcwd())
_DENY = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn",
         "os.posix_spawn", "os.kill", "os.killpg", "ctypes.", "pty.", "os.startfile")
# Modules that reach the kernel without an audit event (fork_exec has none).
_NO_IMPORT = ("_posixsubprocess", "_ctypes", "_socket", "mmap", "_multiprocessing")
_PATHS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
          "os.symlink", "os.link", "os.truncate", "os.utime", "shutil.")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _inside(p):
    if isinstance(p, int):
        return True  # a file descriptor: already opened, and checked then
    try:
        p = os.fsdecode(p)
    except TypeError:
        return False
    real = os.path.realpath(p)
    return real == _root or real.startswith(_root + os.sep)
def _hook(event, args):
    if event.startswith(_DENY):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0].split(".")[0] in _NO_IMPORT:
        raise PermissionError(f"sandbox: import {args[0]} is not allowed")
    if event == "open":
        mode, flags = args[1], args[2]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE)
        if writes and not _inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]} is not allowed")
    if event.startswith(_PATHS):
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if not all(_inside(a) for a in paths):
            raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")
sys.addaudithook(_hook)
_path = sys.argv[1]
sys.argv = sys.argv[1:]
with open(_path) as _f:
    _code = compile(_f.read(), _path, "exec")
exec(_code, {"__name__": "__main__"})
"""


@dataclass
class Limits:
    wall_s: float = 2.0  # the original pipeline's limit per answer
    cpu_s: int = 4
    memory_mb: int = 1024
    files: int = 64


@dataclass
class Result:
    status: str  # "ok", "error" (non-zero exit), "timeout", "memory", "output", "killed"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: no dlopen between fork and exec


def _libc():
    return _LIBC


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where it has none."""
    try:
        v = _libc().syscall(_SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError):
        return 0
    return max(0, int(v))


def _try_net_namespace() -> bool:
    """Can this machine give a process its own empty network namespace without privilege?"""
    code = (
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
        f"sys.exit(0 if libc.unshare({_CLONE_NEWUSER | _CLONE_NEWNET}) == 0 else 1)"
    )
    try:
        res = subprocess.run([sys.executable, "-I", "-S", "-c", code], timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def isolation() -> dict[str, bool]:
    """What this machine enforces, recorded with every result."""
    return {
        "rlimits": True,
        "empty_environment": True,
        "network_namespace": _try_net_namespace(),
        "landlock": landlock_abi() > 0,
        "python_audit_hook": True,
        # RLIMIT_NPROC binds every uid but root: as root, forks are stopped only by the audit
        # hook (Python) and Landlock's exec rule (a native answer cannot exec a shell).
        "process_limit": os.geteuid() != 0,
    }


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock(writable: Path, executables: list[Path]) -> None:
    """In the launcher: writes only beneath `writable`, exec only of `executables`.

    Any failure ends the launcher (exit 126): an answer asked to run confined never runs
    unconfined. Called before RLIMIT_NOFILE is lowered (the ruleset needs descriptors).
    """
    libc = _libc()
    handled = _FS_WRITE | _FS_EXECUTE | (_FS_TRUNCATE if landlock_abi() >= 3 else 0)
    attr = _RulesetAttr(handled)
    fd = libc.syscall(_SYS_CREATE, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if fd < 0:
        os._exit(126)
    writes = handled & ~_FS_EXECUTE  # its directory: create, change, remove; never exec
    for path, access in [(writable, writes)] + [(x, _FS_EXECUTE) for x in executables]:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            os._exit(126)
        rule = _PathBeneath(access, pfd)
        if libc.syscall(_SYS_ADD_RULE, fd, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
            os._exit(126)
        os.close(pfd)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        os._exit(126)
    if libc.syscall(_SYS_RESTRICT, fd, 0) != 0:
        os._exit(126)
    os.close(fd)


def exec_chain(program: Path) -> list[Path]:
    """The files the kernel opens to exec `program`: itself, a script's #! interpreter (again
    followed) and each ELF's dynamic loader (PT_INTERP). Landlock allows exec of these only."""
    chain: list[Path] = []
    todo = [Path(program).resolve()]
    while todo:
        path = todo.pop()
        if path in chain:
            continue
        chain.append(path)
        with open(path, "rb") as f:
            head = f.read(4096)
            if head.startswith(b"#!"):
                todo.append(Path(head[2:].split(b"\n")[0].split()[0].decode()).resolve())
            elif head[:4] == b"\x7fELF" and head[4] == 2:  # 64-bit: walk the program headers
                phoff = int.from_bytes(head[32:40], "little")
                phentsize = int.from_bytes(head[54:56], "little")
                for i in range(int.from_bytes(head[56:58], "little")):
                    f.seek(phoff + i * phentsize)
                    ph = f.read(phentsize)
                    if int.from_bytes(ph[0:4], "little") == 3:  # PT_INTERP
                        off, size = (
                            int.from_bytes(ph[8:16], "little"),
                            int.from_bytes(ph[32:40], "little"),
                        )
                        f.seek(off)
                        todo.append(Path(f.read(size).rstrip(b"\0").decode()).resolve())
    return chain


def _confine(workdir: Path, executables: list[Path], limits: Limits, net: bool, lock: bool):
    """Confine this process (the launcher, before it execs the answer); exit 126 on failure."""
    if net and _libc().unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        os._exit(126)
    if lock:
        _landlock(workdir, executables)
    for which, value in (
        (resource.RLIMIT_CPU, limits.cpu_s),
        (resource.RLIMIT_AS, limits.memory_mb << 20),
        (resource.RLIMIT_FSIZE, OUTPUT_CAP),
        (resource.RLIMIT_NOFILE, limits.files),
        (resource.RLIMIT_CORE, 0),
        # Last: no process slot left, so nothing it runs can fork (not even a thread); not
        # enforced for root (isolation()["process_limit"]).
        (resource.RLIMIT_NPROC, 0),
    ):
        resource.setrlimit(which, (value, value))


def launcher_main() -> None:
    """`python -c` entry of the launcher: confine, then exec the answer's interpreter.

    A fresh process, not a preexec_fn: the evaluating process may have threads and at-fork
    handlers (torch, wandb, vLLM start some) that run in a forked child before preexec_fn, and
    a process with two threads cannot enter a new user namespace (EINVAL).
    """
    import json

    cfg, argv = json.loads(sys.argv[1]), sys.argv[2:]
    _confine(
        Path(cfg["workdir"]),
        [Path(x) for x in cfg["exec"]],
        Limits(**cfg["limits"]),
        cfg["net"],
        cfg["lock"],
    )
    try:
        os.execv(argv[0], argv)
    except OSError:
        os._exit(126)


LAUNCHER = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from trainer.evaluation.sandbox import launcher_main; launcher_main()"
)


def run(
    argv: list[str],
    files: dict[str, str],
    limits: Limits,
    env: dict[str, str] | None = None,
    isolated: dict[str, bool] | None = None,
) -> Result:
    """Run argv (argv[0] an absolute path) in a fresh directory holding `files`."""
    isolated = isolated or isolation()
    workdir = Path(tempfile.mkdtemp(prefix="qsft-sandbox-"))
    try:
        for name, text in files.items():
            (workdir / name).write_text(text)
        out_path, err_path = workdir / ".stdout", workdir / ".stderr"
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = _start(argv, workdir, env, out, err, limits, isolated)
            except (OSError, subprocess.SubprocessError) as e:  # could not even start it
                return Result("error", None, "", f"could not start {argv[0]}: {e}", 0.0)
            try:
                rc = proc.wait(timeout=limits.wall_s)
                status = None
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
            finally:  # whatever it left running in its group goes with it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait() if rc is None else rc
        seconds = time.perf_counter() - t0
        stdout = out_path.read_bytes()[:OUTPUT_CAP].decode("utf-8", "replace")
        stderr = err_path.read_bytes()[:OUTPUT_CAP].decode("utf-8", "replace")
        if status is None:
            status = _status(rc, stderr)
        return Result(status, rc, stdout, stderr, seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _start(argv, workdir, env, out, err, limits: Limits, isolated: dict[str, bool]):
    import json
    from dataclasses import asdict

    cfg = dict(
        workdir=str(workdir),
        exec=[str(p) for p in exec_chain(Path(argv[0]))],
        limits=asdict(limits),
        net=isolated["network_namespace"],
        lock=isolated["landlock"],
    )
    root = str(Path(__file__).resolve().parents[2])
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", LAUNCHER.format(root=root), json.dumps(cfg), *argv],
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        close_fds=True,
        start_new_session=True,  # its own process group: killed whole after the run
    )


def _status(rc: int, stderr: str) -> str:
    if rc == 0:
        return "ok"
    if rc == 126 and not stderr:
        return "error"  # the confinement itself failed: never run unconfined
    if rc in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "File too large" in stderr:
        return "output"  # wrote past OUTPUT_CAP (Python ignores SIGXFSZ and raises EFBIG)
    if rc in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU):
        return "timeout"  # the CPU limit
    if "MemoryError" in stderr or "wsfull" in stderr:  # Python's, q's
        return "memory"
    return "error"
