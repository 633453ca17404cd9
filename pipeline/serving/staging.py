"""The temporary folders an export writes in, their clean-up, fault points and full disks.

An export writes its version into `<name>/.tmp-<pid>@<host>-...` and renames
it into place; an `overwrite` first moves the old version into
`<name>/.old-<version>-<pid>@<host>-.../old`. The folders name their writer, so
the next export (`remove_leftovers`) removes those whose writer is no longer
alive on this host, a killed export's, and never a running one's (on this or
another host). A replaced version whose replacement never arrived is put back.

Fault injection (tests, `rundir.fault_point`): `PIPELINE_FAULT=<point>[,<point>...]` makes the
exporting process SIGKILL itself at that point of the publish step:
`export_between_formats` (before each ONNX or LiteRT file, the SavedModel
written), `export_before_rename` (the version is complete in its temporary folder),
`export_moved_aside` (`overwrite`: the old version moved aside, the new one not
yet in place), `export_after_rename` (the version in place, nothing cleaned).
"""
from __future__ import annotations

import errno
import os
import shutil
import socket

from pipeline import rundir

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
FAULT_POINTS = ("export_before_rename", "export_moved_aside", "export_after_rename")
# Reached only by exports that write ONNX or LiteRT files beside the SavedModel (`formats.DeployPlan`).
FORMAT_FAULT_POINTS = ("export_between_formats",)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_saved_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def writer_tag() -> str:
    """`<pid>@<host>-`: what a temporary folder's name says about the process writing it."""
    return f"{os.getpid()}@{socket.gethostname()}-"


def writer_gone(tag: str) -> bool:
    """Whether the `<pid>@<host>-...` writer of a temporary folder is dead (on this host only)."""
    pid, _, rest = tag.partition("@")
    if not pid.isdigit() or "-" not in rest or rest.rsplit("-", 1)[0] != socket.gethostname():
        return False  # another host's (or an unknown) writer: never ours to judge
    return not rundir.process_alive(int(pid))


def remove_leftovers(model_root: str) -> list[str]:
    """Remove the temporary folders of killed exports in `model_root`; returns their names.

    A `.old-<version>-...` folder whose version is missing (the export was
    killed between moving the old version aside and renaming the new one in)
    is put back as that version first.
    """
    removed = []
    for name in sorted(os.listdir(model_root)) if os.path.isdir(model_root) else []:
        path = os.path.join(model_root, name)
        if name.startswith(TMP_PREFIX):
            tag = name[len(TMP_PREFIX):]
        elif name.startswith(OLD_PREFIX) and name[len(OLD_PREFIX):].partition("-")[0].isdigit():
            version, _, tag = name[len(OLD_PREFIX):].partition("-")
            target, old = os.path.join(model_root, version), os.path.join(path, "old")
            if writer_gone(tag) and not os.path.exists(target) and is_saved_model(old):
                os.rename(old, target)
        else:
            continue
        if writer_gone(tag):
            remove(path)
            removed.append(name)
    return removed


def disk_full(e: BaseException) -> bool:
    """Whether `e` is a full disk or quota, as an OSError or as TensorFlow's file-system error."""
    if isinstance(e, OSError):
        return e.errno in _DISK_FULL
    return type(e).__name__ == "ResourceExhaustedError" and "No space left" in str(e)
