"""A GPU that falls off the bus (checklist H52): nvidia-smi simply lists fewer GPUs, with no error. The
agent remembers the GPUs it had; one missing makes it `degraded`, naming that GPU, and it takes no new
job until all of them answer again (or it is registered again, which forgets the old set)."""

from __future__ import annotations

from hwledger.fanout import SshFanoutHeartbeat
from hwledger.server import Server
from lab.tools import DEFAULT_NVIDIA_STDOUT


def test_a_gpu_that_drops_out_makes_the_agent_degraded_and_holds_its_jobs(lab, fleet_env):
    host = lab.add_loopback_host(lab.unique_name("bus"), python=True)
    try:
        fleet_env.register(host)
        fleet = fleet_env.fleet()
        server = Server(fleet, transport=SshFanoutHeartbeat(fleet.policy(), query_timeout_s=20), query_timeout_s=20)
        try:
            assert server.tick().outcomes[host.name].ok
            # GPU 1 is gone from the tool's answer.
            host.set_tool(stdout=DEFAULT_NVIDIA_STDOUT.splitlines(keepends=True)[0])
            proc = fleet_env.hw("job", "submit", "--agent", host.name, "--", "true")
            assert proc.returncode == 0, proc.stderr
            job_id = proc.stdout.strip()
            report = server.tick()
            row = server.store.get_agent(host.name)
            assert (row.state, row.state_reason) == ("degraded", "gpu_missing"), row
            assert "1 of the 2 GPUs" in row.state_msg and "GPU 1 (NVIDIA GeForce RTX 5070 Ti" in row.state_msg
            assert report.dispatched == [] and server.store.get_job(job_id).state == "queued"
            status = fleet_env.hw("fleet", "status")
            assert "degraded" in status.stdout and "GPU 1 (NVIDIA GeForce RTX 5070 Ti" in status.stdout, status.stdout
            # It comes back: online again, and the job goes.
            host.set_tool(stdout=DEFAULT_NVIDIA_STDOUT)
            report = server.tick()
            assert server.store.get_agent(host.name).state == "online"
            assert report.dispatched == [job_id]
        finally:
            server.close()
    finally:
        host.stop()
