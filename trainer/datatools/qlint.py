"""Syntax lint for q snippets through `qls`, the tree-sitter q language server (PyPI q-lang-server).

There is no q interpreter we may ship or run in CI (kdb+ needs a licence), so shipped Q code is
checked by parsing, not execution. `qls` speaks only LSP over stdio; this module is the smallest
client that opens every snippet as a document and collects the diagnostics it publishes.

What it catches (checked in tests/test_qlint.py): unbalanced or misplaced brackets and parens,
statements that do not parse, and names used in a lambda that are neither parameters, locals,
globals defined in the same snippet nor q built-ins ("cannot find name 'y'").
What it cannot catch: type and rank errors (`1+`a`), wrong results, a wrong built-in chosen
(`max` for `maxs`), projections left unapplied (`{x+}` is valid q), or anything that needs
evaluation. Python solutions and test cases, run in the tests, are what pin behaviour down.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path


class QlsNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class Diagnostic:
    line: int  # 0-based, as LSP reports them
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.line + 1}:{self.column + 1}: {self.message}"


def find_qls() -> str:
    """The qls executable: beside this interpreter (a venv's bin/) first, then PATH."""
    beside = Path(sys.executable).parent / "qls"
    found = str(beside) if beside.exists() else shutil.which("qls")
    if not found:
        raise QlsNotFound("qls not found: pip install q-lang-server (it is in qsft's [dev] extra)")
    return found


def lint(
    snippets: dict[str, str], qls: str | None = None, timeout_s: float = 60.0
) -> dict[str, list[Diagnostic]]:
    """Diagnostics for each named q snippet (an empty list when it parses cleanly).

    One server process for all snippets: start-up dominates the cost of a single file.
    """
    names = list(snippets)
    with tempfile.TemporaryDirectory(prefix="qsft-qlint-") as root:
        # qls indexes **/src/**/*.q under the workspace; the files need not exist on disk for
        # didOpen, but a real root keeps it from scanning the caller's directory.
        uris = {f"file://{root}/src/s{i}.q": name for i, name in enumerate(names)}
        proc = subprocess.Popen(
            [qls or find_qls()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=root,
        )
        try:
            return _session(proc, root, uris, snippets, timeout_s)
        finally:
            proc.kill()
            proc.wait()
            proc.stdin.close()  # ours to close: Popen leaves the pipes open (ResourceWarning)
            proc.stdout.close()


def _session(
    proc: subprocess.Popen,
    root: str,
    uris: dict[str, str],
    snippets: dict[str, str],
    timeout_s: float,
) -> dict[str, list[Diagnostic]]:
    def send(message: dict) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        proc.stdin.flush()

    send(
        {
            "id": 1,
            "method": "initialize",
            "params": {"processId": os.getpid(), "rootUri": f"file://{root}", "capabilities": {}},
        }
    )
    reader = _Reader(proc.stdout.fileno())
    deadline = time.monotonic() + timeout_s
    # Documents opened before the initialize reply are silently dropped by qls 1.0.5.
    while (reply := reader.next(deadline)) is not None and reply.get("id") != 1:
        pass
    if reply is None:
        raise TimeoutError(f"qls did not answer initialize within {timeout_s:.0f}s")
    send({"method": "initialized", "params": {}})

    def open_all() -> None:
        for uri, name in uris.items():
            send(
                {
                    "method": "textDocument/didOpen",
                    "params": {
                        "textDocument": {
                            "uri": uri,
                            "languageId": "q",
                            "version": 1,
                            "text": snippets[name],
                        }
                    },
                }
            )

    # From a thread: qls answers each document while we are still sending, and with both pipes
    # full a single-threaded client and the server would wait on each other forever.
    writer = threading.Thread(target=open_all, daemon=True)
    writer.start()
    found: dict[str, list[Diagnostic]] = {}
    while len(found) < len(uris):
        message = reader.next(deadline)
        if message is None:
            missing = [uris[u] for u in uris if uris[u] not in found]
            raise TimeoutError(
                f"qls published no diagnostics for {len(missing)} snippet(s) "
                f"within {timeout_s:.0f}s, e.g. {missing[0]!r}"
            )
        if message.get("method") != "textDocument/publishDiagnostics":
            continue
        params = message["params"]
        if params["uri"] in uris:
            found[uris[params["uri"]]] = [
                Diagnostic(
                    d["range"]["start"]["line"], d["range"]["start"]["character"], d["message"]
                )
                for d in params["diagnostics"]
            ]
    writer.join()
    return found


class _Reader:
    """LSP framing (Content-Length headers) over a pipe, with a deadline."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, b""

    def next(self, deadline: float) -> dict | None:
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if sep:
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                if len(rest) >= length:
                    self.buf = rest[length:]
                    return json.loads(rest[:length])
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([self.fd], [], [], wait)[0]:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None  # the server exited
            self.buf += chunk


# q built-ins that qls 1.0.5 does not know, so it reports them as undefined names.
QLS_UNKNOWN_BUILTINS = {".Q.n", ".Q.nA", ".Q.an"}


def real_problems(code: str, diags: list[Diagnostic]) -> list[Diagnostic]:
    """Drop qls 1.0.5 false positives, keeping every syntax error.

    qls resolves names in reading order, but q evaluates right to left: in
    `t~reverse t:lower s` the use of t follows its assignment. It also reads the column names
    of a table literal `([] w:key c)` as references. Both show as "cannot find name 'X'" with
    `X:` at or after the reported column on the same line; the follow-on "'X' is defined but
    never used" for such an X goes too.
    """
    lines = code.splitlines()
    forgiven: set[str] = set()
    kept = []
    for d in diags:
        m = re.fullmatch(r"cannot find name '(.+)'", d.message)
        if m:
            name = m.group(1)
            tail = lines[d.line][d.column :] if d.line < len(lines) else ""
            if name in QLS_UNKNOWN_BUILTINS or re.search(
                rf"(?<![\w.`]){re.escape(name)}:(?!:)", tail
            ):
                forgiven.add(name)
                continue
        kept.append(d)
    return [
        d
        for d in kept
        if not (
            (m := re.fullmatch(r"'(.+)' is defined but never used\.?", d.message))
            and m.group(1) in forgiven
        )
    ]
