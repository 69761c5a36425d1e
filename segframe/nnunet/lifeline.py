"""Workers that die with `segframe train`: the training runs in a child process that is told, through a
pipe, when the `segframe train` process is gone, and then kills everything it started.

Why this shape: nnU-Net's augmentation workers (batchgenerators, forked) and its validation export pool
(spawned) are not ours to change, and a SIGKILLed process can clean up nothing. So the process the user
sees (`segframe train`) only starts the training child and waits. The child is a Linux child subreaper
(PR_SET_CHILD_SUBREAPER): every process below it stays below it, even when its own parent dies, so
/proc lists all of them. A thread of the child blocks on the pipe's read end; the parent holds the only
write end, so the read returns as soon as the parent dies, however it dies. The thread then SIGKILLs the
whole subtree and the child itself. Nothing polls, and a worker started a moment before the kill is
still below the subreaper. When the child dies instead (SIGKILLed by an out-of-memory killer), its
processes are re-parented to `segframe train`, itself a subreaper, which kills them as soon as the child
is gone. Multiprocessing's resource trackers are left to exit on their own, which they do once every
process using them is gone (after removing what those leaked): killing one while the child still runs
makes the child's last unregistrations print tracebacks. On systems without /proc and prctl (macOS)
training runs in one process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ENV = "SEGFRAME_TRAIN_LIFELINE"  # set in the training child: the fd of the pipe to watch
PR_SET_CHILD_SUBREAPER = 36


def supported() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self/stat").exists()


def is_child() -> bool:
    return ENV in os.environ


def _subreaper() -> None:
    """Keep every process started below this one below it, even when its own parent dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def run_child(argv: list[str]) -> int:
    """Run `python -m segframe.cli *argv` as the training child and return its exit code; whatever the
    child leaves running when it ends, however it ends, is killed."""
    _subreaper()
    read_end, write_end = os.pipe()
    env = dict(os.environ, **{ENV: str(read_end)})
    # Ctrl-C reaches the child directly (same process group); this process only waits for it
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = subprocess.Popen([sys.executable, "-m", "segframe.cli", *argv], env=env, pass_fds=(read_end,))
        os.close(read_end)
        code = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
        os.close(write_end)
        kill_descendants(spare_trackers=True)  # once their users are gone they clean up and exit
    if code < 0:
        name = signal.Signals(-code).name
        print(f"segframe train: error: the training process was killed by {name}"
              + (" (e.g. by the out-of-memory killer)" if name == "SIGKILL" else "")
              + "; every process it started was stopped; `segframe train ... --c` continues from the last "
              "checkpoint", file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


def hold() -> None:
    """In the training child: become a subreaper and kill the subtree as soon as the parent is gone."""
    fd = int(os.environ.pop(ENV))
    _subreaper()

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        kill_descendants()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="segframe-lifeline", daemon=True).start()
    if os.getppid() == 1:  # the parent died before the thread started
        kill_descendants()
        os.kill(os.getpid(), signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Live (non-zombie) processes below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def resource_tracker(pid: int) -> bool:
    """Whether `pid` is a multiprocessing (or loky) resource tracker, which exits when its users have."""
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_descendants(spare_trackers: bool = False) -> None:
    """SIGKILL every process below this one until none is left (a subreaper keeps orphans below it);
    `spare_trackers` leaves resource trackers to exit with this process."""
    for _ in range(50):
        pids = [p for p in descendants(os.getpid()) if not (spare_trackers and resource_tracker(p))]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)
