# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""An action plugin's argument spec, read from its module's DOCUMENTATION.

The documentation module (``plugins/modules/<name>.py``) is what ``ansible-doc`` shows; the action
plugin validates its arguments against the very same options, so the two cannot drift apart (as
``ansible.utils``' ``cli_parse`` does with its ``AnsibleArgSpecValidator``). Only the keys Ansible's
argument spec validator understands are kept: ``type``, ``default``, ``choices``, ``required``,
``elements``, ``aliases``, ``no_log`` and ``suboptions`` (as ``options``).
"""

from __future__ import annotations

from typing import Any

import yaml

_SPEC_KEYS = ("type", "default", "choices", "required", "elements", "aliases", "no_log")


def argument_spec(documentation: str) -> dict[str, dict[str, Any]]:
    """``validate_argument_spec``'s argument_spec for the options in ``documentation`` (YAML text)."""
    doc = yaml.safe_load(documentation)
    if not isinstance(doc, dict) or not isinstance(doc.get("options"), dict):
        raise ValueError("DOCUMENTATION has no options mapping")
    return _options(doc["options"])


def _options(options: dict) -> dict[str, dict[str, Any]]:
    spec: dict[str, dict[str, Any]] = {}
    for name, option in options.items():
        entry = {key: option[key] for key in _SPEC_KEYS if key in option}
        if isinstance(option.get("suboptions"), dict):
            entry["options"] = _options(option["suboptions"])
        spec[name] = entry
    return spec
