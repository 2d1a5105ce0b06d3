"""The checks of single values (plugins/plugin_utils/agent_values.py): destinations typed on the command
line. The field validators are exercised through the agents schema in test_agents.py."""

from __future__ import annotations

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agent_values as V


@pytest.mark.parametrize("text, expected", [
    ("root@gpu.example.com", ("root", "gpu.example.com", None)),
    ("root@gpu.example.com:2222", ("root", "gpu.example.com", 2222)),
    ("root@[2001:db8::1]:2222", ("root", "2001:db8::1", 2222)),
    ("root@[2001:db8::1]", ("root", "2001:db8::1", None)),
    ("root@2001:db8::1", ("root", "2001:db8::1", None)),
    ("ssh://ubuntu@10.0.0.5:22/", ("ubuntu", "10.0.0.5", 22)),
])
def test_parse_destination(text, expected):
    assert V.parse_destination(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("a@b@host", "user \"a@b\" contains '@'"),
    ("@host", "has no user"),
    ("gpu.example.com", "has no user"),
    ("root@", "host is empty"),
    ("root@-oProxyCommand=x", "host \"-oProxyCommand=x\" starts with '-'"),
    ("root@host:99999", "must be from 1 to 65535"),
    ("root@host:22x", "the port must be a number"),
    ("root@[::1", "write a bracketed IPv6 address as user@[2001:db8::1]:22"),
    ("ro ot@host", "user \"ro ot\" contains a space"),
    ("root@host`id`", "contains a backtick"),
])
def test_parse_destination_rejects(text, expected):
    with pytest.raises(ValueError) as caught:
        V.parse_destination(text)
    assert expected in str(caught.value)
