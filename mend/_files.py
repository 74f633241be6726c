"""Files a user keeps get the mode the user's umask gives any new file.

safetensors and transformers write through temporary files, which are created 0600, and
``tempfile.mkdtemp`` makes 0700 folders; what mend stages that way and then renames into
place is given the usual mode first.
"""

from __future__ import annotations

import os


def user_mode(*paths: str | os.PathLike) -> None:
    """Give each of ``paths`` the mode a new file (0666) or folder (0777) gets under the
    user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)
