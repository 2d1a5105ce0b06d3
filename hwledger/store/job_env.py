"""A job's env values in the store: kept only while an attempt may still need them, then names only.

Why: env values are often tokens. The runner needs them once per attempt, through the job's spec file,
so the store keeps them from `job submit` until no attempt can need them any more: the launch of the
job's last allowed attempt (`attempts >= max_attempts`), or the job's end, whichever comes first. A job
that may be requeued (a failure before its command started, or `lost` with attempts left) keeps them:
the requeued attempt needs them. From then on the stored spec holds each name with a null value: null is
no valid env value (the spec schema wants a string), so a redacted spec can never be taken for a real one,
and a job whose values are gone fails (`env_redacted`) instead of running without them.

Nothing prints a value either way: `shown_spec` puts `***` in place of each (redacted or not).
"""

from __future__ import annotations

import json
from typing import Any

SHOWN_VALUE = "***"


def _env(spec: dict) -> dict:
    env = spec.get("env") if isinstance(spec, dict) else None
    return env if isinstance(env, dict) else {}


def redacted_spec(spec: dict) -> dict:
    """The spec with every env value replaced by null (names kept)."""
    env = _env(spec)
    if not env:
        return spec
    return dict(spec, env={name: None for name in env})


def needs_redaction(spec: dict) -> bool:
    return any(value is not None for value in _env(spec).values())


def env_redacted(spec: dict) -> bool:
    """True when the stored spec lost its env values (they cannot be given to a new attempt)."""
    return any(value is None for value in _env(spec).values())


def shown_spec(spec: dict) -> dict:
    """The spec as every command shows it: env names with `***` for values."""
    env = _env(spec)
    if not env:
        return spec
    return dict(spec, env={name: SHOWN_VALUE for name in env})


def redacted_spec_json(spec_json: str) -> str | None:
    """The stored spec text with its env values removed, or None when there is nothing to remove."""
    spec: Any = json.loads(spec_json)
    if not needs_redaction(spec):
        return None
    return json.dumps(redacted_spec(spec), sort_keys=True)
