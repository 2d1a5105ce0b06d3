# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The job runner as one file, staged on a GPU host that has python3 but not hwledger (``runner.pyz``).

Built on the controller (the job role's ``job_spec`` action writes it once per run); never bundled itself.
"""

from __future__ import annotations

import io
import os
import zipfile

# The modules the staged bundle holds: job_runner and what it imports (all standard library only, 3.8+).
BUNDLED_MODULES = ("job_runner", "job_schema", "job_log", "private_files", "processes")
BUNDLE_PACKAGE = "ansible_collections/hwledger/fleet/plugins/plugin_utils"

_BUNDLE_MAIN = b"""import sys
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_runner
sys.exit(job_runner.main())
"""


def bundle():
    """The runner as one file, for a GPU host that has python3 but not hwledger: a zip application
    (PEP 441, ``python3 FILE run JOB.json --output RESULT.json``) holding job_runner and the modules it
    imports under their collection package names, so the code that runs there is exactly this code.

    The bytes depend only on the modules' contents (fixed timestamps, fixed order): the same collection
    always stages the same file.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:

        def add(name, data):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)

        parts = BUNDLE_PACKAGE.split("/")
        for depth in range(1, len(parts) + 1):
            add("/".join(parts[:depth]) + "/__init__.py", b"")
        for module in BUNDLED_MODULES:
            with open(os.path.join(here, module + ".py"), "rb") as source:
                add("%s/%s.py" % (BUNDLE_PACKAGE, module), source.read())
        add("__main__.py", _BUNDLE_MAIN)
    return buffer.getvalue()
