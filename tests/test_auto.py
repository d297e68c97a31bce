"""The auto method on real gloo process groups: its routing is exact, every rank makes the same plan,
the plan survives a checkpoint, and bad options fail on every rank.

The re-plan after a bandwidth change is tested on the emulated cluster (tests/test_auto_cluster.py).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from bucketed_net import Net, backward_once
from bucketed_net import batch as _batch
from bucketed_net import params as _params
from harness import WorkerError, run
from hook_reference import same_on_all_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from commcomp.auto import CANDIDATES, DEFAULT_CANDIDATES, AutoState
from commcomp.auto.measure import GROWTH, LATENCY_BOUND, Exchange, Network, Trial, next_size
from commcomp.auto.plan import SWITCH_MARGIN, choose
from commcomp.auto.state import hold_back
from commcomp.auto.verify import CLEAR_GAP, MARGIN
from commcomp.stats import timer

# the method each single candidate stands for, as `register` takes it
ALONE = {
    "fp32": ("identity", {}),
    "bf16": ("bf16", {}),
    "qsgd4": ("qsgd_ar", {"bits": 4}),
    "gradiveq": ("gradiveq", {}),
    "topk": ("topk", {"ratio": 0.01, "error_feedback": True}),
}


def _train(rank, world, method, options, steps, save=None, load=None, edit=None, verify_steps=None, cap=0.004):
    if verify_steps is not None:  # time every plan against bf16 and fp32, `verify_steps` steps each
        monkeypatch = pytest.MonkeyPatch()
        monkeypatch.setattr("commcomp.auto.verify.CLEAR_GAIN", 1e9)
        monkeypatch.setattr(AutoState, "verify_steps", verify_steps)
    torch.manual_seed(0)
    net = Net()
    ddp = DDP(net, bucket_cap_mb=cap)
    state = commcomp.register(ddp, method, **options)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    if load:
        ckpt = torch.load(f"{load}.rank{rank}", weights_only=False)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        state.load_state_dict(ckpt["comm"])
    plans, losses, sent = [], [], []
    for _ in range(steps):
        before = state.stats.bytes_sent
        step = state.step
        x, y = _batch(rank, step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        sent.append(state.stats.bytes_sent - before)
        assert same_on_all_ranks(net), f"ranks disagree after step {step}"
        if isinstance(state, AutoState):
            plans.append([b["method"] for b in state.plan()["buckets"]])
            if edit is not None and state.step == edit[0]:  # replace the plan through a checkpoint
                saved = state.state_dict()
                for i, entry in enumerate(saved["choices"]):
                    entry["method"] = edit[1][i % len(edit[1])]
                state.load_state_dict(saved)
        if save and state.step == save[1]:
            torch.save(
                {"model": net.state_dict(), "opt": opt.state_dict(), "comm": state.state_dict()},
                f"{save[0]}.rank{rank}",
            )
    report = state.plan() if isinstance(state, AutoState) else None
    return _params(net), plans, report, losses, state.num_buckets, sent


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_a_single_candidate_trains_exactly_like_its_own_hook(name):
    """Measuring rounds (every 2 steps here) leave no trace: auto with one candidate sends every
    bucket exactly as that method's own hook does, bit for bit."""
    method, options = ALONE[name]
    auto = run(
        _train,
        2,
        "auto",
        {"candidates": [name], "measure_steps": 1, "probe_every": 2, "planning_share": None},
        7,
        timeout=180,
    )
    alone = run(_train, 2, method, options, 7, timeout=180)
    assert torch.equal(auto[0][0], alone[0][0])
    assert auto[0][1][-1] == [name] * auto[0][4]  # the plan covers every bucket


def test_every_bucket_travels_by_its_choice_from_step_0():
    """Each bucket is decided before it is sent, step 0 included: with bf16 over the error budget
    every bucket is fp32, so the first steps (before the timed check's first bf16 block) are plain fp32."""
    options = {"candidates": ["fp32", "bf16"], "max_error": 0.0, "probe_every": 100}
    auto = run(_train, 2, "auto", options, 5, timeout=180)
    alone = run(_train, 2, "identity", {}, 5, timeout=180)
    assert torch.equal(auto[0][0], alone[0][0])
    assert auto[0][1][0] == [] and set(auto[0][1][1]) == {"fp32"}  # the first round ends with step 1


def test_the_first_plan_is_made_on_the_buckets_ddp_keeps():
    """DDP sends its first step in one bucket and re-forms its buckets for the steps after: the
    first round goes on through step 1, measures the buckets it did not measure at step 0, and
    plans on them. Where the buckets keep their parameters (one bucket, re-formed in another
    order), step 1 measures nothing."""
    options = {"candidates": ["bf16"], "measure_steps": 1, "probe_every": 100, "planning_share": None}
    (_, plans, report, _, n_buckets, sent) = run(_train, 2, "auto", options, 4, timeout=180)[0]
    assert n_buckets >= 3 and plans[0] == [] and plans[1] == ["bf16"] * n_buckets
    assert [r["step"] for r in report["rounds"]] == [1] and sent[1] > sent[2] == sent[3]  # step 1 agreed
    assert sorted(k for b in report["buckets"] for k in b["params"]) == sorted(n for n, _ in Net().named_parameters())
    one_bucket = (None, None, None, None, 25)  # bucket_cap_mb=25
    (_, plans, report, _, n_buckets, sent) = run(_train, 2, "auto", options, 4, *one_bucket, timeout=180)[0]
    assert n_buckets == 1 and plans[0] == [] and plans[1] == ["bf16"]
    assert [r["step"] for r in report["rounds"]] == [1] and sent[1] == sent[2] == sent[3]  # nothing measured


def test_every_rank_makes_the_same_plan_and_the_plan_covers_every_bucket():
    out = run(_train, 3, "auto", {"measure_steps": 2, "probe_every": 3, "planning_share": None}, 9, timeout=240)
    (_, plans, report, losses, n_buckets, _) = out[0]
    assert n_buckets >= 3
    assert plans[0] == []  # steps 0 and 1 measure
    assert len(plans[1]) == n_buckets
    for other in out[1:]:
        assert other[1] == plans and other[2]["buckets"] == report["buckets"]
        assert other[2]["network"] == report["network"]
    for bucket in report["buckets"]:
        assert bucket["method"] in DEFAULT_CANDIDATES and bucket["why"].startswith("fastest predicted")
        assert set(bucket["candidates"]) == set(DEFAULT_CANDIDATES)
        chosen = bucket["candidates"][bucket["method"]]
        allowed = [c for n, c in bucket["candidates"].items() if n == "fp32" or c["error"] <= 0.8]
        assert chosen in allowed
        assert chosen["seconds"] <= (1 + SWITCH_MARGIN) * min(c["seconds"] for c in allowed)
    assert losses[-1] < losses[0]


def test_a_mixed_plan_trains_identically_on_every_rank():
    """Buckets on different methods in one step, each through its own exchange."""
    edit = (3, ["gradiveq", "bf16", "qsgd4", "topk", "fp32"])
    out = run(_train, 2, "auto", {"measure_steps": 2, "probe_every": 100}, 10, None, None, edit, timeout=240)
    plans = out[0][1]
    assert plans[-1] == [edit[1][i % 5] for i in range(out[0][4])]
    losses = out[0][3]
    assert all(map(math.isfinite, losses)) and sum(losses[-3:]) < sum(losses[:3])


def test_checkpoint_resume_keeps_the_plan_and_is_exact(tmp_path):
    """A resumed job does not measure or plan again: it continues bit for bit. (Steps 0-1 measure,
    the timed check runs from step 2 and switches arms by step count; its first look, at step 10 or
    later, decides on wall-clock times, which no two runs share, so both runs end before it.)"""
    ckpt = str(tmp_path / "ckpt")
    options = {"measure_steps": 2, "probe_every": 100}
    straight = run(_train, 2, "auto", options, 10, (ckpt, 5), timeout=240)  # saves after step 5, goes on
    resumed = run(_train, 2, "auto", options, 5, None, ckpt, timeout=240)
    assert torch.equal(straight[0][0], resumed[0][0]) and torch.equal(straight[1][0], resumed[1][0])
    assert resumed[0][2]["buckets"] == straight[0][2]["buckets"]
    assert resumed[0][2]["replans"] == straight[0][2]["replans"] == 0


def _bad_options(rank, world, options):
    try:
        commcomp.register(DDP(Net()), "auto", **options)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize(
    "options, words",
    [
        ({"candidates": ["fp32", "zip"]}, "candidates"),
        ({"candidates": []}, "candidates"),
        ({"candidates": "bf16"}, "list of names, got the string 'bf16'"),
        ({"max_error": -1}, "max_error"),
        ({"measure_steps": 0}, "measure_steps"),
        ({"planning_share": 0}, "planning_share"),
        ({"planning_share": 1.5}, "planning_share"),
        ({"rank": 4}, "unknown option"),
    ],
)
def test_bad_options_are_named(options, words):
    for message in run(_bad_options, 2, options, timeout=60):
        assert words in message


def test_options_that_differ_between_ranks_fail_on_every_rank():
    with pytest.raises(WorkerError) as err:
        run(backward_once, 2, "auto", [{"max_error": 0.5}, {"max_error": 0.8}], timeout=60)
    assert str(err.value).count("max_error") >= 2


def test_choose_prefers_the_fastest_within_the_budget_and_breaks_a_near_tie_by_the_current_then_accuracy():
    net = Network(latency=1e-3, seconds_per_byte=1e-8)
    trials = {
        "fp32": Trial(0.0, 0.0, (Exchange("allreduce", 4_000_000),)),
        "bf16": Trial(1e-3, 0.004, (Exchange("allreduce", 2_000_000),)),
        "gradiveq": Trial(5e-3, 0.3, (Exchange("allreduce", 100_000), Exchange("allreduce", 100_000))),
        "topk": Trial(1e-3, 0.95, (Exchange("allgather", 80_000),)),
    }
    pick = choose(trials, net, 4, 0.8)
    expected = {n: t.seconds + sum(net.seconds(e, 4) for e in t.exchanges) for n, t in trials.items()}
    assert pick.method == min(("fp32", "bf16", "gradiveq"), key=expected.__getitem__) == "gradiveq"
    assert pick.predicted_seconds == expected["gradiveq"] and "topk (error 0.95)" in pick.why
    assert choose(trials, net, 4, 0.2).method == "bf16"  # GradiVeQ's error is over this budget
    near = dict(trials, bf16=Trial(1e-3, 0.004, (Exchange("allreduce", 500_000),)))  # 5% faster than GradiVeQ
    assert choose(near, net, 4, 0.8).method == "bf16"
    assert choose(near, net, 4, 0.8, current="gradiveq").method == "gradiveq"
    # bf16 predicted 4% slower than GradiVeQ: a tie, which the current method keeps, else the more accurate takes
    slower = dict(trials, bf16=Trial(1e-3, 0.004, (Exchange("allreduce", 560_000),)))
    times = {n: t.seconds + sum(net.seconds(e, 4) for e in t.exchanges) for n, t in slower.items()}
    assert times["gradiveq"] < times["bf16"] < (1 + SWITCH_MARGIN) * times["gradiveq"]
    assert choose(slower, net, 4, 0.8).method == "bf16" == choose(slower, net, 4, 0.8, current="fp32").method
    assert choose(slower, net, 4, 0.8, current="gradiveq").method == "gradiveq"


def test_network_fit_recovers_a_line():
    sizes = [4096, 65536, 1 << 20]
    world = 4
    truth = Network(2e-3, 8 / 100e6)  # 100 Mbit/s
    seconds = [truth.seconds(Exchange("allreduce", s), world) for s in sizes]
    fitted = Network.fit(sizes, seconds, world)
    assert fitted.latency == pytest.approx(truth.latency) and fitted.mbit == pytest.approx(100)


def test_network_fit_leaves_out_a_probe_slower_than_every_larger_one():
    """A stall at one size (slower than every larger probe: it cannot be the transfer) does not
    tilt the line; a probe at the largest size is always kept."""
    world, truth = 4, Network(1e-3, 8 / 10e9)  # 10 Gbit/s
    sizes = [4096 << i for i in range(9)]
    seconds = [truth.seconds(Exchange("allreduce", s), world) for s in sizes]
    stalled = [t + (1.0 if i == 4 else 0.0) for i, t in enumerate(seconds)]
    fitted = Network.fit(sizes, stalled, world)
    assert fitted.latency == pytest.approx(truth.latency) and fitted.mbit == pytest.approx(10e3)
    assert Network.fit(list(reversed(sizes)), list(reversed(stalled)), world) == fitted  # in any order
    last = [t + (1.0 if i == 8 else 0.0) for i, t in enumerate(seconds)]
    assert Network.fit(sizes, last, world).mbit < truth.mbit / 10  # kept: nothing larger to tell


def _probe(rank, world, cap, enough):
    from commcomp.auto.measure import probe

    found = probe(cap, None, torch.device("cpu"), enough)
    return found.seconds, found.sent


def test_every_rank_probes_the_same_growing_sizes():
    """(Stopping early, on a shaped link, is checked by tests/test_auto_cluster.py's re-plan.)"""
    found = run(_probe, 3, 100_000, 1e9, timeout=60)
    sizes = list(found[0][0])
    assert all(list(f[0]) == sizes for f in found)
    assert sizes[0] == 4096 and all(
        b in (min(GROWTH * a, 100_000), min(2 * a, 100_000)) for a, b in itertools.pairwise(sizes)
    )
    assert sizes[-1] == 100_000
    # every all-reduce is counted: the line-up and two runs of each size
    assert found[0][1] == [4] + [4 * max(2, s // 4) for s in sizes for _ in range(2)]


def test_probe_sizes_grow_4x_while_latency_bound_and_2x_once_the_transfer_shows():
    assert next_size(4096, [0.005], 1 << 20) == GROWTH * 4096  # the first size: nothing to compare with
    assert next_size(16384, [0.005, 0.004, 0.9 * LATENCY_BOUND * 0.004], 1 << 20) == GROWTH * 16384
    assert (
        next_size(16384, [0.005, 0.004, 1.1 * LATENCY_BOUND * 0.004], 1 << 20) == 2 * 16384
    )  # the fastest, not the first
    assert next_size(262144, [0.005, 0.005], 300_000) == 300_000  # never past the cap


def test_a_replan_round_checks_the_network_with_one_size_and_probes_in_full_when_it_moved():
    """A re-plan round re-times the size where the last full probe stopped; the check passes within
    a factor DRIFT of the fitted line, else the round starts over with a full probe."""
    from commcomp.auto.measure import DRIFT, check_size, transfer_bound

    net = Network(1e-3, 8 / 100e6)
    expected = net.seconds(Exchange("allreduce", 65536), 4)
    assert net.holds(65536, expected * 0.9 * DRIFT, 4) and net.holds(65536, expected / (0.9 * DRIFT), 4)
    assert not net.holds(65536, expected * 1.1 * DRIFT, 4) and not net.holds(65536, expected / (1.1 * DRIFT), 4)
    # where the growing stopped: 20 ms beyond the fastest smaller size's time, and at least that
    # time (a slow 8 KB is not it; a slow first size does not raise the bar)
    probes = {4096: 0.006, 8192: 0.021, 16384: 0.012, 32768: 0.027, 65536: 0.030, 131072: 0.060}
    assert check_size([{"probes": probes}]) == 32768
    probes = {4096: 0.009, 8192: 0.005, 16384: 0.010, 32768: 0.026, 65536: 0.045}
    assert check_size([{"probes": probes}]) == 32768
    assert transfer_bound([0.009, 0.005, 0.026]) and not transfer_bound([0.009, 0.026])
    assert not transfer_bound([0.001, 0.020]) and not transfer_bound([0.03])  # 19 ms beyond; nothing smaller
    # the bar rises with the latency only once the latency exceeds 20 ms (4x used to: 40 ms at 10 ms)
    assert transfer_bound([0.010, 0.031]) and not transfer_bound([0.030, 0.059])
    assert check_size([{"probes": {4096: 0.001, 8192: 0.002}}]) == 8192  # none did: the largest
    assert check_size([{"probes": {65536: 0.03}}]) == 65536  # a checked round's one size
    options = {"candidates": ["bf16", "fp32"], "measure_steps": 1, "probe_every": 2, "planning_share": None}
    # 16 steps: at least three rounds on any path, e.g. checks that hold at step 4 and fail at step 9
    # (the interval grew to 4) record the full probe at step 10: with 10 steps there were two
    (*_, report, _, _, _) = run(_train, 2, "auto", options, 16, timeout=180)[0]
    rounds = report["rounds"]
    assert rounds[0]["probed"] == "in full" and len(rounds) >= 3
    every = options["probe_every"]
    assert rounds[0]["interval"] == every
    for before, now in itertools.pairwise(rounds):
        due = before["step"] + 1 + before["interval"]
        if now["probed"] == "checked":  # one size, where the last probe stopped, at the round's step
            assert len(now["probes"]) == 1 and set(now["probes"]) <= set(before["probes"])
            assert now["step"] == due
            # kept the plan: the next round waits twice as long (at most BACKOFF x); else as first
            assert now["interval"] in (every, min(2 * before["interval"], AutoState.BACKOFF * every))
        else:  # the check at the round's step failed: in full at the next one
            assert now["step"] == due + 1 and now["interval"] == every


def _train_held(rank, world, *args):
    """`_train` on a network that always holds its line (the localhost's times scatter by over 2x)."""
    pytest.MonkeyPatch().setattr(Network, "holds", lambda *args: True)
    return _train(rank, world, *args)


def test_rounds_space_out_while_nothing_changes_and_a_resumed_job_keeps_the_spacing(tmp_path):
    """One candidate and a network that holds: every re-plan round keeps the plan, so each doubles
    the steps to the next one, up to BACKOFF x probe_every; the spacing is in the checkpoint."""
    options = {"candidates": ["bf16"], "measure_steps": 1, "probe_every": 2, "planning_share": None}
    ckpt = str(tmp_path / "ckpt")
    straight = run(_train_held, 2, "auto", options, 40, (ckpt, 10), timeout=180)[0][2]
    cap = AutoState.BACKOFF * options["probe_every"]
    assert [(r["step"], r["interval"]) for r in straight["rounds"]] == [(1, 2), (4, 4), (9, 8), (18, cap), (35, cap)]
    assert all(r["probed"] == "checked" for r in straight["rounds"][1:]) and straight["replans"] == 0
    resumed = run(_train_held, 2, "auto", options, 30, None, ckpt, timeout=180)[0][2]  # steps 10-39
    keys = ("step", "interval", "methods", "probed")  # the times measured after the resume are its own
    assert [[r[k] for k in keys] for r in resumed["rounds"]] == [[r[k] for k in keys] for r in straight["rounds"]]
    assert resumed["next_round"] == straight["next_round"] and resumed["interval"] == straight["interval"]


def test_hold_back_waits_until_the_last_round_cost_is_within_the_share():
    # 0.2 s of planning, 4 s and 200 steps since: 2% needs 10 s, 6 s more at 20 ms a step
    assert hold_back(0.2, 4.0, 200, 0.02) == math.ceil((0.2 / 0.02 - 4.0) / (4.0 / 200))
    assert hold_back(0.2, 10.0, 200, 0.02) == 0 and hold_back(0.0, 0.0, 1, 0.02) == 0
    assert hold_back(0.2, 9.999, 200, 0.02) == 1  # a little short: at least one step
    assert hold_back(0.2, 0.0, 0, 0.02) == 1  # no pace yet: one step at a time


def test_a_round_due_by_the_steps_waits_for_the_planning_share():
    """probe_every=1 and a share no round can meet on a few ms steps: the round due at step 2 is
    held back, every rank alike (agreed numbers), to the step `hold_back` gives, and the plan
    keeps sending; the record says why."""
    options = {"candidates": ["bf16", "fp32"], "measure_steps": 1, "probe_every": 1, "planning_share": 0.001}
    out = run(_train, 2, "auto", options, 8, timeout=180)
    reports = [o[2] for o in out]
    assert all(r["rounds"] == reports[0]["rounds"] for r in reports)
    (only,) = reports[0]["rounds"]
    held = only["held_back"]
    assert only["step"] == 1 and held["at"] == 2 + only["interval"] == 3  # the first round ends with step 1
    assert held["cost_s"] > options["planning_share"] * held["elapsed_s"]
    assert held["until"] == 3 + hold_back(held["cost_s"], held["elapsed_s"], 1, options["planning_share"]) > 8
    assert reports[0]["next_round"] == held["until"] and all(p == out[0][1][-1] for p in out[0][1][1:])


def test_the_same_methods_on_rebuilt_buckets_are_no_replan():
    """The first round (DDP's initial buckets at step 0, its re-formed ones at step 1) and the rounds
    after: with one candidate the methods per parameter never change, so no round counts as a re-plan."""
    options = {"candidates": ["bf16"], "measure_steps": 1, "probe_every": 1, "planning_share": None}
    (_, plans, report, _, n_buckets, _) = run(_train, 2, "auto", options, 10, timeout=180)[0]
    assert len(report["rounds"]) >= 3 and report["replans"] == 0
    assert plans[-1] == ["bf16"] * n_buckets


def _train_qsgd_planned(rank, world, *args):
    """`_train` with QSGD predicted free on every bucket, so the plan is QSGD everywhere."""
    from commcomp.auto import state as auto_state

    real = auto_state.choose

    def choose(trials, *rest):
        return real({**trials, "qsgd4": Trial(1e-6, trials["qsgd4"].error, ())}, *rest)

    pytest.MonkeyPatch().setattr(auto_state, "choose", choose)
    return _train(rank, world, *args)


def _deliver(rank, world, switch_at, steps):
    """Plain SGD (lr 1) on a loss whose gradient is a fixed random matrix per rank and step, by
    GradiVeQ until step `switch_at`, then by bf16 (the plan replaced through a checkpoint): the
    weights, GradiVeQ's residual norm just before the switch and the residuals left at the end."""
    from commcomp.auto import state as auto_state

    monkeypatch = pytest.MonkeyPatch()
    real = auto_state.choose
    monkeypatch.setattr(
        auto_state, "choose", lambda trials, *rest: real({**trials, "gradiveq": Trial(1e-6, 0.0, ())}, *rest)
    )
    monkeypatch.setattr("commcomp.auto.verify.CLEAR_GAIN", 0.0)  # no timed check
    torch.manual_seed(0)
    layer = nn.Linear(48, 64, bias=False)
    ddp = DDP(layer)
    state = commcomp.register(ddp, "auto", candidates=["gradiveq", "bf16"], probe_every=1000)
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    held = 0.0
    for step in range(steps):
        if step == switch_at:
            memory = state.methods["gradiveq"].memory
            held = float(torch.linalg.vector_norm(torch.stack([r.norm() for r in memory.residuals.values()])))
            saved = state.state_dict()
            for entry in saved["choices"]:
                entry["method"] = "bf16"
            state.load_state_dict(saved)
        g = torch.randn(64, 48, generator=torch.Generator().manual_seed(1000 * rank + step))
        opt.zero_grad()
        (ddp(torch.zeros(1, 48)).sum() * 0 + (layer.weight * g).sum()).backward()
        opt.step()
    return layer.weight.detach().clone(), held, len(state.methods["gradiveq"].memory.residuals)


def test_a_bucket_that_leaves_gradiveq_delivers_what_it_held_back():
    """GradiVeQ's first steps on a full-rank gradient hold back most of it in the ranks' residuals;
    the first bf16 step after the switch carries them (N x each rank's share), so the weights end
    where plain averaging puts them, up to bf16's rounding, and no residual is left."""
    world, switch_at, steps = 2, 3, 5
    out = run(_deliver, world, switch_at, steps, timeout=180)
    torch.manual_seed(0)
    start = nn.Linear(48, 64, bias=False).weight.detach()
    total = sum(
        torch.randn(64, 48, generator=torch.Generator().manual_seed(1000 * r + s))
        for r in range(world)
        for s in range(steps)
    )
    expected = start - total / world
    weights, held, left = out[0]
    assert held > 0.3 * float(total.norm()) / world  # a drop would show
    assert float((weights - expected).norm()) < 0.02 * float((total / world).norm())
    assert left == 0 and all(torch.equal(o[0], weights) for o in out)


def _train_qsgd_timed(rank, world, gap, *args):
    """`_train_qsgd_planned` with `gap` as `CLEAR_GAP` (inf: never decided after the first turn;
    1.0: always, the medians taken as separated, which one step of each cannot show)."""
    from commcomp.auto.verify import Verification

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr("commcomp.auto.verify.CLEAR_GAP", gap)
    if gap == 1.0:
        monkeypatch.setattr(Verification, "separated", staticmethod(lambda summary: True))
    return _train_qsgd_planned(rank, world, *args)


@pytest.mark.parametrize("gap", [math.inf, 1.0])
def test_a_timed_check_is_decided_alike_on_every_rank(gap):
    """A plan of QSGD is timed against bf16 and fp32 everywhere (1 step each, one at a time, in
    turn, twice); by the slowest rank's medians the fastest alternative is kept if it beats the plan
    by the margin, by every rank alike, and the steps went by each in turn. After the first turn one
    small all-reduce looks at the medians so far: a clear gap (here: any, or none) decides there."""
    options = {"candidates": ["qsgd4", "bf16", "fp32"], "max_error": 1.0, "probe_every": 100}
    out = run(_train_qsgd_timed, 2, gap, "auto", options, 12, None, None, None, 2, timeout=180)
    reports = [o[2] for o in out]
    assert all(r["rounds"] == reports[0]["rounds"] and r["buckets"] == reports[0]["buckets"] for r in reports)
    timed = reports[0]["rounds"][0]["timed"]
    order = [k[: -len("_s")] for k in timed if k.endswith("_s")]  # the plan, then the arms fastest predicted first
    assert order[0] == "plan" and sorted(order[1:]) == ["bf16", "fp32"]
    assert list(timed)[3:] == ["kept", "turns", "separated"]
    assert all(math.isfinite(timed[f"{k}_s"]) and timed[f"{k}_s"] > 0 for k in order)  # every arm timed
    best = min(timed[f"{k}_s"] for k in order)  # the first in that order within the margin of the fastest,
    fastest = next(k for k in order if timed[f"{k}_s"] * (1 - MARGIN) <= best)
    fastest = fastest if timed["separated"] else "plan"  # if the plan and the fastest are apart by more than noise
    assert timed["kept"] == fastest
    kept = {b["method"] for b in reports[0]["buckets"]}
    assert kept == ({"qsgd4"} if fastest == "plan" else {fastest})
    sent = out[0][5]  # bytes handed to collectives per step: steps 2-4 by each arm in turn
    by_arm = dict(zip(order, sent[2:5]))
    assert by_arm["plan"] < by_arm["bf16"] < by_arm["fp32"]  # QSGD < bf16 < fp32
    look = 8 * 6  # the look after the first turn: the three medians and their standard errors, float64
    by_kept = by_arm[timed["kept"]]
    if gap == math.inf:  # no look decides: the second turn, then the decision at step 8
        assert timed["turns"] == 2 and sent[5] == sent[2] + look and sent[6:8] == sent[3:5]
        assert sent[8] == by_kept + look and set(sent[9:]) == {by_kept}
    else:  # decided at the look: from step 5 on, every step by the kept method
        assert timed["turns"] == 1 and sent[5] == by_kept + look and set(sent[6:]) == {by_kept}


def _train_qsgd_settled(rank, world, *args):
    """`_train_qsgd_planned` with timed checks that always keep the plan, on a network that always
    holds its line (the localhost's all-reduce times scatter by more than 2x)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr("commcomp.auto.verify.MARGIN", 1.0)
    monkeypatch.setattr(Network, "holds", lambda *args: True)
    return _train_qsgd_planned(rank, world, *args)


def test_a_round_that_kept_the_plan_on_a_held_network_is_not_timed_again():
    """After the first round's timed check, a re-plan round whose one-size check held and whose plan
    is the one in force sends every step by the plan (no timed check)."""
    options = {"candidates": ["qsgd4", "bf16", "fp32"], "max_error": 1.0, "probe_every": 8, "planning_share": None}
    steps = 20
    out = run(_train_qsgd_settled, 2, "auto", options, steps, None, None, None, 2, timeout=180)
    rounds = out[0][2]["rounds"]
    assert [r["step"] for r in rounds] == [1, 10]  # the first timed check ends at step 8
    assert [r["interval"] for r in rounds] == [8, 16]  # nothing changed: the next round waits twice as long
    assert all({*r["methods"]} == {"qsgd4"} for r in rounds)
    assert "timed" in rounds[0] and rounds[1]["probed"] == "checked" and "timed" not in rounds[1]
    sent = out[0][5]  # every step after the re-plan round by QSGD: the same bytes (a check's arms differ)
    assert len(set(sent[11:])) == 1 and sent[11] < min(sent[3], sent[4])


def _train_qsgd_overruled(rank, world, *args):
    """`_train_qsgd_planned` with timed checks that always pick bf16, on a network that always
    holds its line."""
    from commcomp.auto.verify import Verification

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(Verification, "fastest", lambda self, medians: "bf16")
    monkeypatch.setattr(Verification, "separated", staticmethod(lambda summary: True))
    monkeypatch.setattr(Network, "holds", lambda *args: True)
    return _train_qsgd_planned(rank, world, *args)


def test_a_verdict_stands_while_the_network_holds_and_the_prediction_is_the_same():
    """The first round's plan (QSGD, predicted free) is overruled by its timed check (bf16); the
    re-plan round finds the network on its line and predicts QSGD again: the verdict stands (bf16),
    nothing is timed again, the plan did not change, and the next round waits twice as long."""
    options = {"candidates": ["qsgd4", "bf16", "fp32"], "max_error": 1.0, "probe_every": 8, "planning_share": None}
    out = run(_train_qsgd_overruled, 2, "auto", options, 20, None, None, None, 2, timeout=180)
    report, sent = out[0][2], out[0][5]
    assert all(o[2]["rounds"] == report["rounds"] for o in out)
    rounds = report["rounds"]
    assert [r["step"] for r in rounds] == [1, 10] and rounds[0]["timed"]["kept"] == "bf16"
    assert rounds[1]["probed"] == "checked" and "timed" not in rounds[1] and rounds[1]["interval"] == 16
    assert {*rounds[1]["methods"]} == {"bf16"} and report["replans"] == 0
    assert all("timed on real steps" in b["why"] for b in report["buckets"])
    assert len(set(sent[11:])) == 1 and sent[11] == sent[9]  # bf16 throughout, the round's step aside


def test_verification_is_only_for_close_predictions():
    from commcomp.auto.plan import Choice
    from commcomp.auto.verify import Verification, alternatives

    def pick(method, seconds, bf16_seconds, fp32_seconds=10.0):
        table = {
            "bf16": {"seconds": bf16_seconds, "bytes": 2, "error": 0.0},
            "fp32": {"seconds": fp32_seconds, "bytes": 4, "error": 0.0},
            method: {"seconds": seconds, "bytes": 1, "error": 0.1},
        }
        return Choice(method, seconds, 1, 0.1, "", table)

    assert alternatives([pick("gradiveq", 0.6, 1.0)]) == ["bf16"]  # predicted 1.7x faster than bf16: check it
    assert alternatives([pick("gradiveq", 0.6, 1.0, 1.1)]) == ["bf16", "fp32"]
    assert alternatives([pick("gradiveq", 0.6, 1.1, 1.0)]) == ["fp32", "bf16"]  # the fastest predicted first
    assert alternatives([pick("gradiveq", 0.3, 1.0)]) == []  # 3.3x: trusted
    assert alternatives([pick("bf16", 1.0, 1.0, 1.5)]) == ["fp32"]  # bf16 is the plan itself
    v = Verification(["bf16", "fp32"], 2, start=1)
    methods, due = [], []
    for step in range(1, 8):
        due.append(v.due(step))
        if due[-1] != "final":
            clock = timer(torch.zeros(1)).start()
            v.begin(step, clock)
            clock.stop()
            v.end()
        methods.append(v.method("gradiveq", step))
    # one step each in turn (2 // 2), twice: steps 1-6, a look after the first turn (step 4, timed
    # itself), then the decision at step 7 (not timed)
    assert methods[:6] == ["gradiveq", "bf16", "fp32"] * 2
    assert due == [None, None, None, "early", None, None, "final"]
    assert len(v.medians()) == 3 and sorted(v.seconds) == list(range(1, 7)) and len(v.summary()) == 6
    assert v.fastest([2.0, 1.0, 3.0]) == "bf16" and v.fastest([1.0, 1.0, 1.0]) == "plan"
    assert v.fastest([1.0, 0.97, 2.0]) == "plan" and v.fastest([1.0, 2.0, 0.9]) == "fp32"  # the margin: 5%
    assert v.fastest([math.nan, math.nan, 3.0]) == "fp32" and v.fastest([math.nan] * 3) == "plan"
    # between arms within the margin of each other the predicted order decides (bf16 listed first)
    assert v.fastest([2.0, 1.04, 1.0]) == "bf16" and v.fastest([2.0, 1.1, 1.0]) == "fp32"
    # after the first turn only a clear gap (CLEAR_GAP x, either way) between medians SEPARATED
    # standard errors apart decides; the last turn always
    noisy, tight = [0.4] * 3, [0.01] * 3  # standard errors
    assert v.decide([1.0, 1.2, 1.3, *tight], final=False) is None  # separated, not clear
    assert v.decide([math.nan, 1.0, 1.0, *tight], final=False) is None
    assert v.decide([2.0, 1.0, 2.0, *noisy], final=False) is None  # clear, not separated
    kept, record, why = v.decide([1.0, 1.6 * CLEAR_GAP / 1.5, 2.0, *tight], final=False)
    assert kept == "plan" and record["turns"] == 1 and "1 turn" in why
    kept, record, _ = v.decide([2.0, 1.0, 2.0 / CLEAR_GAP + 0.01, *tight], final=False)
    assert kept == "bf16" and record["turns"] == 1
    assert v.decide([1.0, 1.2, 1.3, *noisy])[0] == "plan" and v.decide([1.0, 1.2, 1.3, *noisy])[1]["turns"] == 2
    # after the last turn an alternative faster by the margin overrules the plan only if separated from it
    kept, record, why = v.decide([1.0, 0.8, 1.3, *noisy])
    assert kept == "plan" and not record["separated"] and why.endswith("within the noise, the prediction stands")
    kept, record, why = v.decide([1.0, 0.8, 1.3, *tight])
    assert kept == "bf16" and record["separated"] and "noise" not in why
    # separation is between the plan and the fastest alternative, by their own errors
    assert Verification.separated([1.0, 1.2, 5.0, 0.01, 0.01, 9.0])
    assert not Verification.separated([1.0, 1.2, 5.0, 0.01, 9.0, 0.01])
    assert not Verification.separated([1.0, 1.2, 1.3, math.nan, 0.01, 0.01])  # an error unknown: not yet
    # the standard errors: 1.4826 x MAD x 1.2533 / sqrt(n); steps 0, 2 and 4 ran the plan
    w = Verification(["bf16"], 2, start=0, seconds={0: 1.0, 2: 2.0, 4: 4.0, 1: 3.0})
    assert w.summary()[:2] == [2.0, 3.0] and w.summary()[2] == pytest.approx(1.4826 * 1.0 * 1.2533 / math.sqrt(3))
    assert math.isnan(w.summary()[3])  # one timing
    resumed = Verification(**v.state_dict())
    assert resumed.medians() == v.medians() and resumed.method("gradiveq", 3) == "fp32"
    assert Verification(["bf16"], 8, start=0).method("qsgd4", 4) == "bf16"  # blocks of 4: plan 0-3, bf16 4-7


def _gradiveq_trial(rank, world):
    """Three GradiVeQ steps (bases and residuals in place), then a trial on the fourth step's bucket
    in the hook body, just before the real exchange of the same gradients."""
    from commcomp.auto.measure import trial_gradiveq
    from commcomp.gradiveq import GradiVeQState, gradiveq_hook

    torch.manual_seed(0)
    net = Net()
    ddp = DDP(net, bucket_cap_mb=1000)  # one bucket
    state = GradiVeQState()
    state.bind(ddp)
    seen = {}

    def hook(state, bucket):
        if state.step == 3:
            keys, grads = [state.param_key(p) for p in bucket.parameters()], bucket.gradients()
            before = {k: v.clone() if torch.is_tensor(v) else v for k, v in _flat_state(state).items()}
            inputs = [g.clone() for g in grads]
            seen["trial"] = trial_gradiveq(state, keys, grads, bucket.buffer())
            after = _flat_state(state)
            seen["untouched"] = before.keys() == after.keys() and all(
                torch.equal(v, after[k]) if torch.is_tensor(v) else v == after[k] for k, v in before.items()
            )
            seen["grads_untouched"] = all(torch.equal(a, b) for a, b in zip(inputs, grads))
            seen["no_late_checks"] = not state._late_checks
        return gradiveq_hook(state, bucket)

    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(4):
        x, y = _batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    trial = seen["trial"]
    flag_slots = world * state.wire_dtype.itemsize  # the engine adds them to what the codec encodes
    return {
        **seen,
        "trial_bytes": trial.nbytes,
        "real_bytes": state.stats.last.bytes_sent - flag_slots,
        "seconds": trial.seconds,
        "error": trial.error,
        "compressed": any(v is not None for v in state.layers.values()),
    }


def _flat_state(state):
    """Every tensor and number of a GradiVeQ state's checkpoint, by a dotted name."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = value

    walk("", state.state_dict())
    return out


def test_a_gradiveq_trial_runs_the_real_codec_and_leaves_everything_as_it_was():
    """The trial times GradiVeQ's own one-exchange codec on copies: the bases, residuals and stats
    are as before, the gradients too, no step-end check is left behind (it would skip the step), and
    it counts the bytes the real exchange of the same bucket then hands over (flag slots aside)."""
    for out in run(_gradiveq_trial, 2, timeout=120):
        assert out["compressed"] and out["untouched"] and out["grads_untouched"] and out["no_late_checks"], out
        assert out["trial_bytes"] == out["real_bytes"], out
        assert out["seconds"] > 0 and 0 <= out["error"] < 1, out
