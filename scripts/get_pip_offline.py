"""Offline stand-in for the pip bootstrap script that ansible-test downloads.

ansible-test creates empty virtualenvs for some sanity tests and fills them by running a get-pip
script it fetches from a host this machine (and CI) cannot reach. This script does the same job with
what Python ships: `ensurepip` installs pip from the stdlib's bundled wheel, then pip installs the
exact packages ansible-test asked for (from PyPI, like every other install here).
"""

import ensurepip
import os
import subprocess
import sys

# ansible-test runs this with a filtered environment; pip's own CA bundle may not know the CA this
# machine's traffic is signed with, while the system store does. Use it unless told otherwise.
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
env = dict(os.environ)
if "PIP_CERT" not in env and os.path.exists(SYSTEM_CA):
    env["PIP_CERT"] = SYSTEM_CA

ensurepip.bootstrap(upgrade=True)
# get-pip.py accepts --no-setuptools/--no-wheel; pip itself does not.
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install"] + args, env=env))
