"""The emulated cluster and the launchers, on real network namespaces (root only).

Shaping is checked in the kernel's own words: `tc` must show a token bucket filter at the configured
rate on both ends of every host's link, and its byte counters must show that the test's traffic went
through it. Nothing here asserts a time (the machine is shared; measured rates are only printed).
Teardown is checked by looking at the kernel's list of namespaces and links; the launchers by
running small all-reduce workers (launch/workers/) whose sums are checked against the closed form
on every rank; fault reporting by cutting a host's link in the middle of a gloo job and by freezing
a rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from launch import (
    Cluster,
    LaunchError,
    LocalCluster,
    finish,
    init_from_env,
    launch_mpirun,
    launch_torchrun,
)
from launch.cli import main as cli
from launch.cluster import ClusterError, list_clusters, remove_clusters
from launch.torchrun import start_torchrun
from launch.watchdog import Watchdog

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "launch" / "workers"


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _records(outputs: list[str]) -> list[dict]:
    """The RESULT records printed by the workers, by rank (mpirun may glue two lines together)."""
    found = [json.loads(m) for out in outputs for m in re.findall(r"RESULT (\{[^{}]*\})", out)]
    return sorted(found, key=lambda r: r["rank"])


def _tbf(netns: str, dev: str) -> dict:
    """The root qdisc of `dev` in `netns` with its counters, as `tc -s -j` reports it."""
    out = subprocess.run(["tc", "-s", "-j", "-n", netns, "qdisc", "show", "dev", dev], capture_output=True, text=True)
    roots = [q for q in json.loads(out.stdout) if q.get("root")]
    assert len(roots) == 1, f"{netns} {dev}: {out.stdout}"
    return roots[0]


def _link_ends(c: Cluster, host: int) -> tuple[dict, dict]:
    """The filters on host `host`'s link: what it sends (cc0 in the host) and receives (its switch port)."""
    return _tbf(c.netns(host), c.iface(host)), _tbf(c.switch_netns, f"h{host}")


def _check_shaped(c: Cluster) -> None:
    """Every host's link has a tbf at `c.rate_mbit` on both ends (tc reports the rate in bytes/s)."""
    assert c.rate_mbit is not None
    for host in range(c.hosts):
        for end in _link_ends(c, host):
            assert end["kind"] == "tbf", end
            assert end["options"]["rate"] == round(c.rate_mbit * 1e6 / 8), (host, end)


def _check_carries(c: Cluster, src: int, dst: int, nbytes: int) -> None:
    """A TCP transfer from `src` to `dst` passes through the sender's filter and the receiver's
    (their byte counters grow by at least the payload); the rate seen is only printed."""
    sent, received = _link_ends(c, src)[0]["bytes"], _link_ends(c, dst)[1]["bytes"]
    rate = c.measure_rate(src, dst, nbytes)
    print(f"{c.rate_mbit} Mbit/s link, {src}->{dst}: measured {rate:.1f} Mbit/s")
    assert _link_ends(c, src)[0]["bytes"] - sent >= nbytes, f"{src}->{dst}: missed a filter"
    assert _link_ends(c, dst)[1]["bytes"] - received >= nbytes, f"{src}->{dst}: missed a filter"


def _check_verdict(output: str, rank: int, timeout: float) -> None:
    """The output names `rank` as not answering, and every watchdog verdict (the line that stops a
    rank) comes only after `rank` was silent for the whole timeout. (When gloo's own timeout error
    comes first, the diagnosis printed under its traceback names the rank too.)"""
    named = re.findall(rf"not answering: rank {rank} \(", output)
    assert named, f"no diagnosis naming rank {rank} in:\n{output[-2000:]}"
    verdicts = re.findall(rf"watchdog: ERROR: .*not answering: rank {rank} \([^,]*, silent ([0-9.]+)s\)", output)
    print(f"rank {rank} named {len(named)} time(s); watchdog verdicts after {verdicts} s of silence")
    assert all(float(v) >= timeout for v in verdicts), f"declared silent too early: {verdicts}s < {timeout}s"


def _check_sums(records: list[dict], world: int) -> None:
    assert [r["rank"] for r in records] == list(range(world))
    factor = world * (world + 1) / 2
    for r in records:
        assert r["world_size"] == world
        assert r["sum"] == [factor * i for i in range(len(r["sum"]))], f"wrong sum on rank {r['rank']}"


# ----- no namespaces needed -----


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="hosts"):
        Cluster(hosts=0)
    with pytest.raises(ValueError, match="rate_mbit"):
        Cluster(hosts=2, rate_mbit=-5)
    with pytest.raises(ValueError, match="private"):
        Cluster(hosts=2, subnet="8.8.8.0/24")
    with pytest.raises(ValueError, match="room"):
        Cluster(hosts=10, subnet="10.213.0.0/29")
    with pytest.raises(ValueError, match="name"):
        Cluster(hosts=2, name="Bad-Name")
    with pytest.raises(ValueError, match="host must be"):
        Cluster(hosts=2).host_addr(2)
    with pytest.raises(ValueError, match="rate_mbit"):
        Cluster(hosts=2).set_rate(0)
    with pytest.raises(ClusterError, match="not up"):
        Cluster(hosts=2).set_rate(10)


def test_init_from_env_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import torch.distributed as dist

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "COMMCOMP_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="backend"):
        init_from_env(backend="carrier-pigeon")
    monkeypatch.setenv("COMMCOMP_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="COMMCOMP_TIMEOUT"):
        init_from_env()
    monkeypatch.setenv("COMMCOMP_TIMEOUT", "30")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="outside"):
        init_from_env()
    monkeypatch.delenv("RANK")
    info = init_from_env()
    try:
        expected = "nccl" if torch.cuda.is_available() else "gloo"
        assert (info.rank, info.world_size, info.backend) == (0, 1, expected)
        x = torch.arange(4.0, device=info.device)
        dist.all_reduce(x)
        assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        finish()
    assert not dist.is_initialized()


def test_watchdog_start_registers_the_rank_before_returning() -> None:
    """A rank that freezes right after init must still be named with its address, so start()
    writes this rank's heartbeat and address to the store before it returns (not later, from its
    thread); stop() marks the rank done and returns once its threads have ended (one still inside
    a store call when the interpreter exits aborts the process)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    dog = Watchdog(1, 2, "127.0.0.1", store.port, timeout=60.0, interval=30.0).start()
    try:
        assert store.check(["commcomp/watchdog/addr/1"])  # get() would wait for it
        assert store.get("commcomp/watchdog/addr/1").decode() == dog.addr
        assert store.add("commcomp/watchdog/beat/1", 0) >= 0
    finally:
        dog.stop()
    assert store.add("commcomp/watchdog/beat/1", 0) >= 1 << 40
    assert not any(t.is_alive() for t in dog._threads)


def test_local_fallback_runs_torchrun_and_names_a_frozen_rank() -> None:
    """Without namespaces: 2 local "hosts"; sums are right, then rank 1 hangs and rank 0 names it."""
    timeout = 6.0
    with LocalCluster(hosts=2) as hosts:
        args = ["--timeout", str(timeout), "--hold", "120", "--freeze", "1"]
        job = start_torchrun(hosts, str(WORKERS / "allreduce.py"), args, timeout=150, grace=5.0, stream=False)
        with job:
            job.wait_for("READY", timeout=90)
            job.wait_for(re.escape("not answering: rank 1 (127.0.0.1"), hosts=[0], timeout=120)
            result = job.wait(check=False)
    _check_sums(_records(result.outputs), 2)
    assert not result.ok and result.returncodes[0] != 0
    assert not result.timed_out  # the watchdog ended the job, not the launcher's deadline
    _check_verdict(result.outputs[0], 1, timeout)


# ----- the cluster itself -----


def test_links_are_shaped_both_ways_and_carry_the_traffic() -> None:
    """Two clusters at once (same subnet, no clash), 50 and 200 Mbit/s: tc shows a tbf at the
    configured rate on both ends of every link, and a TCP transfer in each direction passes through
    the sender's filter and the receiver's (their byte counters grow by at least the payload)."""
    with Cluster(hosts=2, rate_mbit=50) as slow, Cluster(hosts=2, rate_mbit=200) as fast:
        for cluster, nbytes in ((slow, 4 << 20), (fast, 8 << 20)):
            _check_shaped(cluster)
            for src, dst in ((0, 1), (1, 0)):
                _check_carries(cluster, src, dst, nbytes)


def test_set_rate_reshapes_every_link_both_ways_in_place() -> None:
    """A 3-host cluster at 200 Mbit/s reshaped live to 20: tc shows 20 on both ends of every link,
    on the same filters as before (changed in place, not deleted and re-added), and they carry
    the traffic. Then through the command line: `shape --unshaped` removes every filter, `shape 50`
    puts them back, and a fresh view of the cluster (`Cluster.attach`) reads 50 from the kernel."""
    with Cluster(hosts=3, rate_mbit=200) as c:
        _check_shaped(c)
        handles = [[end["handle"] for end in _link_ends(c, host)] for host in range(c.hosts)]
        c.set_rate(20)
        assert c.rate_mbit == 20
        _check_shaped(c)
        assert [[end["handle"] for end in _link_ends(c, host)] for host in range(c.hosts)] == handles
        _check_carries(c, 2, 0, 1 << 20)

        assert cli(["--prefix", c.prefix, "shape", "--name", c.name, "--unshaped"]) == 0
        for host in range(c.hosts):
            assert [end["kind"] for end in _link_ends(c, host)] == ["noqueue", "noqueue"]
        assert Cluster.attach(c.name, c.prefix).rate_mbit is None
        assert cli(["--prefix", c.prefix, "shape", "--name", c.name, "50"]) == 0
        view = Cluster.attach(c.name, c.prefix)
        assert view.rate_mbit == 50
        _check_shaped(view)


def test_teardown_leaves_nothing_even_when_the_body_raises() -> None:
    links, spaces = _links(), _netns()
    with pytest.raises(RuntimeError, match="boom"), Cluster(hosts=3, rate_mbit=100) as c:
        names = {c.netns(i) for i in range(3)} | {c.switch_netns}
        assert names <= _netns()
        sleeper = c.run(1, ["sleep", "600"])
        raise RuntimeError("boom")
    assert sleeper.wait(timeout=10) != 0  # the process left inside was stopped
    assert _netns() == spaces and not names & _netns()
    assert _links() == links  # nothing was ever created in (or leaked into) the root namespace


def test_sigterm_tears_down_and_sigkill_leftovers_are_removed_as_stale() -> None:
    prefix = f"cct{os.getpid() % 100000}"
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from launch import Cluster\n"
        f"c = Cluster(hosts=2, rate_mbit=100, name_prefix={prefix!r}).up()\n"
        "print(c.name, flush=True)\n"
        "time.sleep(600)\n"
    )
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        assert name in list_clusters(prefix)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        if sig == signal.SIGTERM:
            assert proc.returncode == -signal.SIGTERM  # handler tore down, then died of the signal
            assert name not in list_clusters(prefix)
        else:  # no handler can run: the namespaces stay until a stale sweep
            assert name in list_clusters(prefix)
            assert remove_clusters(prefix, stale_only=True) == [name]
            assert name not in list_clusters(prefix)


# ----- launchers -----


def test_torchrun_across_hosts_sums_correctly_over_the_shaped_link() -> None:
    hosts, per_node, rate, mbytes = 2, 2, 100.0, 4.0
    with Cluster(hosts=hosts, rate_mbit=rate) as c:
        args = ["--timeout", "60", "--send-mbytes", str(mbytes)]
        result = launch_torchrun(c, str(WORKERS / "allreduce.py"), args, nproc_per_node=per_node, timeout=120)
        records = _records(result.outputs)
        _check_sums(records, hosts * per_node)
        for r in records:  # ranks are node-major: rank = node * nproc_per_node + local rank
            assert r["addr"] == c.host_addr(r["rank"] // per_node)
        # rank 0 (host 0) -> last rank (host 1) crossed the shaped link, through both of its filters
        _check_shaped(c)
        assert _link_ends(c, 0)[0]["bytes"] >= mbytes * (1 << 20)
        assert _link_ends(c, 1)[1]["bytes"] >= mbytes * (1 << 20)


def test_torchrun_max_restarts_recovers_from_a_failed_worker() -> None:
    with Cluster(hosts=2, rate_mbit=100) as c:
        args = ["--timeout", "30", "--fail-once", "1"]
        result = launch_torchrun(c, str(WORKERS / "allreduce.py"), args, max_restarts=1, timeout=150)
        assert "failing on purpose" in "".join(result.outputs)
        records = _records(result.outputs)
        _check_sums(records, 2)
        assert max(r["attempt"] for r in records) == 1  # the failed agent restarted its worker


def test_mpirun_across_hosts_allreduces_over_the_shaped_link() -> None:
    pytest.importorskip("mpi4py", reason="mpi4py is installed by scripts/setup.sh")
    rate, mbytes = 100.0, 4.0
    with Cluster(hosts=2, rate_mbit=rate) as c:
        result = launch_mpirun(c, [sys.executable, str(WORKERS / "mpi_allreduce.py"), str(mbytes)], timeout=60)
        records = _records(result.outputs)
        _check_sums(records, 2)
        assert [r["addr"] for r in records] == [c.host_addr(0), c.host_addr(1)]
        _check_shaped(c)  # rank 0 -> rank 1 went through both filters of the shaped link
        assert _link_ends(c, 0)[0]["bytes"] >= mbytes * (1 << 20)
        assert _link_ends(c, 1)[1]["bytes"] >= mbytes * (1 << 20)


def test_horovod_under_mpirun_across_hosts() -> None:
    pytest.importorskip("horovod.torch", reason="Horovod is built by scripts/setup.sh")
    with Cluster(hosts=2, rate_mbit=100) as c:
        result = launch_mpirun(c, [sys.executable, str(WORKERS / "horovod_allreduce.py")], timeout=90)
        _check_sums(_records(result.outputs), 2)


def test_cut_link_fails_the_job_within_the_timeout_naming_the_rank() -> None:
    timeout, cut = 6.0, 1
    with Cluster(hosts=2, rate_mbit=100) as c:
        job = start_torchrun(
            c,
            str(WORKERS / "allreduce.py"),
            ["--timeout", str(timeout), "--hold", "120"],
            timeout=150,
            grace=5.0,
            stream=False,
        )
        with job:
            job.wait_for("READY", timeout=90)
            c.set_link(cut, up=False)
            verdict = f"not answering: rank {cut} ({c.host_addr(cut)}"
            job.wait_for(re.escape(verdict), hosts=[0], timeout=120)
            with pytest.raises(LaunchError) as failure:
                job.wait()
    result = failure.value.result
    assert not result.timed_out  # the watchdog ended the job, not the launcher's deadline
    _check_verdict(result.outputs[0], cut, timeout)
    assert "cannot reach the rendezvous store" in result.outputs[cut]
    assert verdict in str(failure.value)  # the error itself says who is gone
