"""Job runs without SSH: which remote paths may be cleaned up, and what a run's events say (the launch of
the job's command, why a task failed, what a reconcile found)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hwledger import job_runs
from hwledger.ansible_runs import HostEvent, PlaybookRun
from hwledger.job_runs import is_job_dir, launched_by, reason_of, runner_seen
from hwledger.store import JobRow


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/tmp/hwledger-job-abc_12", True),
        ("/home/u/.cache/hwledger-job-x", True),
        ("/tmp/../etc/hwledger-job-x", False),
        ("relative/hwledger-job-x", False),
        ("/tmp/hwledger-job-{{ lookup('pipe','id') }}", False),
        ("/tmp/other", False),
        ("/", False),
    ],
)
def test_is_job_dir(path, ok):
    assert is_job_dir(path) is ok


# -- what the runs' events say --------------------------------------------------------------------


def _event(name: str, action: str, res: dict, task: str = "a task") -> HostEvent:
    return HostEvent(name, "gpu1", task, action, res)


STARTED = {"changed": True, "path": "/tmp/hwledger-job-j-abcd1234", "pid": 4242, "runner": "staged"}


def test_a_launch_is_the_start_of_the_launch_task_or_an_answer_of_job_start_or_job_wait():
    assert launched_by(_event("runner_on_start", "hwledger.fleet.job_start", {}, task=job_runs.LAUNCH_TASK))
    assert not runner_seen(_event("runner_on_start", "hwledger.fleet.job_start", {}, task=job_runs.LAUNCH_TASK))
    assert not launched_by(_event("runner_on_start", "hwledger.fleet.job_spec", {}, task="Validate the job"))
    # job_start answered with the runner's pid and the private dir: the runner was started
    assert runner_seen(_event("runner_on_ok", "hwledger.fleet.job_start", STARTED))
    assert launched_by(_event("runner_on_ok", "hwledger.fleet.job_start", STARTED))
    assert not launched_by(_event("runner_on_ok", "hwledger.fleet.job_start", {**STARTED, "pid": "4242"}))
    assert not launched_by(_event("runner_on_ok", "hwledger.fleet.job_start", {**STARTED, "path": "/etc"}))
    assert not launched_by(_event("runner_on_failed", "hwledger.fleet.job_start", {"reason": "job_already_started"}))
    # job_wait only runs on a started job; its result is no_log, the event is enough
    assert runner_seen(_event("runner_on_ok", "hwledger.fleet.job_wait", {"censored": "hidden"}))
    assert runner_seen(_event("runner_on_failed", "hwledger.fleet.job_wait", {"reason": "result_missing"}))
    assert not launched_by(_event("runner_on_start", "hwledger.fleet.job_wait", {}, task="Wait for the job"))
    assert not launched_by(_event("runner_on_ok", "ansible.builtin.command", {"rc": 0}))
    assert not launched_by(_event("runner_on_skipped", "hwledger.fleet.job_start", {}))


def test_the_remote_dir_is_the_path_job_start_returned():
    assert job_runs.remote_dir_of(_event("runner_on_ok", "hwledger.fleet.job_start", STARTED)) == STARTED["path"]
    assert job_runs.remote_dir_of(_event("runner_on_ok", "ansible.builtin.tempfile", STARTED)) is None
    assert job_runs.remote_dir_of(_event("runner_on_ok", "hwledger.fleet.job_start", {"path": "/tmp/x/../y"})) is None


@pytest.mark.parametrize(
    ("res", "reason"),
    [
        ({"msg": "runner_unavailable - gpu1 cannot run hwledger jobs"}, "runner_unavailable"),
        ({"msg": "gpu1 cannot run hwledger jobs: python3 is not on its PATH", "reason": "no_runner"},
         "runner_unavailable"),  # job_start's reason, under the server's name for it
        ({"msg": "job_already_started - job x was started on gpu1 before", "reason": "job_already_started"},
         "job_already_started"),
        ({"msg": "job_already_started - job x was started on gpu1 before"}, "job_already_started"),
        ({"msg": "result of job x refused (result_not_json): ...", "reason": "result_not_json"}, "result_not_json"),
        ({"censored": "the output has been hidden due to the fact that 'no_log: true' was specified"}, "task_failed"),
        ({"msg": "Bad thing: {{ lookup('pipe', 'id') }}"}, "task_failed"),
        ({"msg": "x", "reason": "NOT A REASON; rm -rf"}, "task_failed"),
    ],
)
def test_a_failed_task_says_its_reason_first(res, reason):
    outcome = job_runs._failed(_event("runner_on_failed", "ansible.builtin.fail", res, task="Refuse"))
    assert outcome.kind == "failed" and outcome.reason == reason
    assert outcome.msg.startswith(f"{reason}: Refuse: ")
    assert reason_of(outcome.msg) == reason


def test_a_reconcile_report_is_read_as_data():
    report = job_runs._checked_report({"found": "True", "running": "False", "launched": True, "result": "false",
                                       "dir": "/tmp/hwledger-job-x-abc"})
    assert report == {"found": True, "running": False, "launched": True, "result": False,
                      "dir": "/tmp/hwledger-job-x-abc"}
    assert job_runs._checked_report({"dir": "/etc/{{ x }}"})["dir"] is None


class _Runs:
    """Stands in for AnsibleRuns: writes the extra vars into a private dir and replays events."""

    def __init__(self, tmp_path, events):
        self.private_dir = tmp_path / "run"
        self.private_dir.mkdir(mode=0o700)
        self.events = events
        self.seen_spec: list[bool] = []

    def run_playbook(self, playbook, *, extravars, on_event, **_kw):
        spec_file = Path(extravars(self.private_dir)["hwledger_job_file"])
        for event in self.events:
            self.seen_spec.append(spec_file.exists())
            on_event(event)
        self.seen_spec.append(spec_file.exists())
        return PlaybookRun(status="successful", rc=0, duration_s=0.1, host_events={"gpu1": self.events})


def test_the_spec_file_with_the_env_values_is_gone_once_the_play_has_read_it(tmp_path):
    from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
    from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh

    events = [_event("runner_on_start", "hwledger.fleet.job_spec", {}),  # it has not read the file yet
              _event("runner_on_ok", "hwledger.fleet.job_spec", {"censored": "hidden"}),
              _event("runner_on_ok", "hwledger.fleet.job_start", STARTED)]
    runs = _Runs(tmp_path, events)
    jobs = job_runs.AnsibleJobs(runs, ssh.SshPolicy(known_hosts="/k", control_dir=None), tmp_path / "res")
    agent = agents_schema.Agent(name="gpu1", hostname="192.0.2.1", ssh_user="u", ssh_key_path="/k")
    job = JobRow(id="0f8fad5b-d9cb-469f-a165-70867728950e", agent="gpu1",
                 spec={"command": ["true"], "env": {"TOKEN": "t"}, "timeout_s": 5}, state="running",
                 created_at="", updated_at="", dispatched_at=None, started_at=None, finished_at=None, attempts=0,
                 timeout_s=5, cancel_requested=False, exit_code=None, result=None, error=None, run_dir=None,
                 remote_dir=None, cleanup_pending=False)
    seen = []
    outcome = jobs.run(job, agent, cancel=lambda: False, on_event=seen.append, on_private_dir=lambda _p: None)
    assert runs.seen_spec == [True, True, False, False]  # there until job_spec read it, then removed
    assert outcome.kind == "completed" and outcome.launched and seen == events


def test_the_launch_task_is_the_roles_job_start_task():
    import yaml

    main = Path(job_runs.__file__).parents[1] / "roles" / "job" / "tasks" / "main.yml"
    tasks = [t for block in yaml.safe_load(main.read_text()) for t in block.get("block", [block])]
    assert [t["name"] for t in tasks if "hwledger.fleet.job_start" in t] == [job_runs.LAUNCH_TASK]
