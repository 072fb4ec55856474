"""The overhead governor: exact decisions on a synthetic clock, and a real run whose probes cost known time."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch

from lightning_stablelr.callbacks._governor import ProbeGovernor, StandingCost
from lightning_stablelr.callbacks._monitor_io import figures_affordable
from lightning_stablelr.callbacks.monitor import StabilityMonitor
from tests.helpers import make_trainer
from tests.test_monitor_support import (
    QuadraticModule,
    RecordingLogger,
    constant_loader,
    series,
    single_thread,  # noqa: F401  (autouse: one torch thread)
)


def test_governor_allows_a_probe_only_while_it_fits_the_budget():
    governor = ProbeGovernor(0.1)
    # A quarter of max_overhead is kept for what no hook can time: the probes fit under 0.075.
    assert governor.timed_budget == pytest.approx(0.075)
    governor.start(now=100.0)
    assert governor.allows("certificate", now=100.0)  # never measured: predicted 0, budget 0
    governor.record("certificate", 0.5)
    # probe 0.5 s; training = elapsed - 0.5. Next needs 0.5 + 0.5 <= 0.075 * training, i.e. training >= 13.33 s.
    assert not governor.allows("certificate", now=100.0 + 0.5 + 13.3)
    assert governor.allows("certificate", now=100.0 + 0.5 + 13.34)
    assert governor.training_time(now=110.5) == pytest.approx(10.0)
    assert governor.overhead(now=110.5) == pytest.approx(0.05)
    assert governor.defer("certificate") == 1
    assert governor.defer("sharpness") == 2
    assert governor.total_deferred == 2
    assert governor.state_dict() == {"deferred": {"certificate": 1, "sharpness": 1}}


def test_each_kind_has_an_equal_share_so_a_frequent_probe_cannot_starve_a_rare_one():
    governor = ProbeGovernor(0.4, kinds=["certificate", "sharpness", "connectivity"])  # timed budget 0.3
    governor.start(now=0.0)
    governor.record("certificate", 0.2)  # training 10 s -> budget 3 s -> 1 s per kind
    assert governor.available("certificate", now=10.2) == pytest.approx(0.8)
    assert governor.allows("certificate", units=4, now=10.2)  # 4 x 0.2 = 0.8 fits
    assert not governor.allows("certificate", units=5, now=10.2)
    governor.charge("certificate", 0.75)  # spent without changing the measured 0.2 s per unit
    assert governor.predicted("certificate") == pytest.approx(0.2)
    assert not governor.allows("certificate", now=10.95)
    # The other kinds still have their whole share, whatever the certificates spent.
    assert governor.available("connectivity", now=10.95) == pytest.approx(1.0)
    assert governor.affordable_units("connectivity", now=10.95) == math.inf  # cost never measured
    governor.record("connectivity", 0.3, units=6)  # 0.05 s per point evaluation
    assert governor.affordable_units("connectivity", now=11.25) == pytest.approx((1.0 - 0.3) / 0.05)


def test_the_figures_draw_from_their_own_share_when_the_instruments_first_probes_filled_the_budget():
    # The default recipe job's numbers: max_overhead 1.0 (timed 0.75), four kinds, the figures' 0.5 s prior; the
    # instruments' pooled first probes of each epoch keep the unspent budget at about 0.
    kinds = ["certificate", "sharpness", "connectivity", "figures"]
    governor = ProbeGovernor(1.0, kinds=kinds, prior_costs={"figures": 0.5})
    governor.start(now=0.0)
    governor.record("sharpness", 1.2)  # 1.2 s of probes after 1.6 s of training: budget 1.2, all of it spent
    governor.record("connectivity", 0.3)
    assert not figures_affordable(governor, now := 1.6 + 1.5)  # their share, 0.3 s, below the 0.5 s prior
    assert not governor.allows("figures", now=now)
    # 4 s of training: budget 3 s, the figures' share 0.75 s; the instruments spent 3 s, nothing is unspent.
    governor.record("certificate", 1.5)
    later = 4.0 + 3.0
    assert governor.available("figures", now=later) == pytest.approx(0.0)
    assert not governor.allows("figures", now=later)  # the old rule: starved for the whole run
    assert figures_affordable(governor, later)
    governor.record("figures", 0.5)
    assert not figures_affordable(governor, later + 0.5)  # 0.25 s of their share left: not another 0.5 s


def test_standing_cost_books_hook_time_outside_probes_plus_the_calibrated_dispatch():
    governor = ProbeGovernor(0.05, ("certificate", "sharpness"))
    governor.start(now=0.0)
    standing = StandingCost(governor)
    standing.calibrate(lambda: time.sleep(0.002), hooks_per_batch=6, rounds=3, calls=1)
    assert 0.012 <= standing.dispatch_per_batch < 0.05  # 6 dispatches of >= 2 ms
    standing.enter()
    started = time.perf_counter()
    time.sleep(0.05)  # a probe inside the hook: booked as certificate, not standing
    governor.record("certificate", probe := time.perf_counter() - started)
    time.sleep(0.01)
    standing.leave()
    standing.charge_batch()
    booked = governor.spent[StandingCost.KIND]
    assert standing.dispatch_per_batch + 0.01 <= booked < standing.dispatch_per_batch + 0.04
    assert governor.probe_time == pytest.approx(probe + booked)
    # It comes off every share alike: after 10 s of training the certificate's share is (0.375 - booked)/2 - probe
    # (the timed budget is 3/4 of max_overhead: 0.0375 x 10 s).
    now = 10.0 + governor.probe_time
    assert governor.available("certificate", now=now) == pytest.approx((0.375 - booked) / 2 - probe)
    standing.charge_batch()  # nothing pending: only the dispatch again
    assert governor.spent[StandingCost.KIND] == pytest.approx(booked + standing.dispatch_per_batch)


def test_governor_with_infinite_budget_allows_everything():
    governor = ProbeGovernor(math.inf)
    governor.start(now=0.0)
    governor.record("sharpness", 1e6)
    assert governor.allows("sharpness", now=0.0)


@pytest.mark.parametrize("value", [0, -0.1, float("nan"), True, "0.05"])
def test_governor_rejects_a_bad_budget(value: Any):
    with pytest.raises(ValueError, match=r"`max_overhead` must be a number > 0 \(math.inf disables the governor\)"):
        ProbeGovernor(value)


class _TimedQuadratic(QuadraticModule):
    """Every training step sleeps 10 ms; every probe evaluation sleeps 10 ms (a certificate is three)."""

    def probe_loss(self, batch: Any) -> torch.Tensor:
        time.sleep(0.01)
        return super().probe_loss(batch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(0.01)
        return super().training_step(batch, batch_idx)


def test_tiny_budget_defers_probes_counts_them_and_keeps_probe_time_under_budget(tmp_path):
    steps, budget = 60, 1 / 3  # the probes fit under 3/4 of it: 0.25
    model = _TimedQuadratic(lr=0.05)
    logger = RecordingLogger()
    monitor = StabilityMonitor(
        certificate_every_n_steps=1, sharpness_every_n_steps=5, sharpness_iters=3, connectivity_every_n_epochs=0,
        max_overhead=budget,
    )
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[monitor], limit_val_batches=0)
    trainer.fit(model, train_dataloaders=constant_loader(steps))

    certificates = len(series(logger, "lyapunov/delta_v"))
    sharpness = len(series(logger, "lyapunov/sharpness"))
    deferred = series(logger, "monitor/deferred_probes")
    final_step = max(deferred)
    # Every due probe either ran (and logged) or was deferred and counted.
    assert deferred[final_step] == (steps - certificates) + (steps // 5 - sharpness)
    assert deferred[final_step] >= 30
    assert certificates >= 2  # the budget grows with training time, so probes keep running
    # Ungoverned, a certificate (3 x 10 ms) every 10 ms step is an overhead near 3. Governed, the probe time
    # is at most the budget plus what could not be predicted: the first certificate (30 ms) and the first
    # sharpness (10 ms), with 30 ms for timer and sleep jitter.
    overhead = series(logger, "monitor/overhead")[final_step]
    training_time = steps * 0.01  # a lower bound: each step sleeps 10 ms
    assert monitor._governor.timed_budget == pytest.approx(0.25)
    assert overhead <= 0.25 + (0.03 + 0.01 + 0.03) / training_time
    assert monitor._governor.deferred == {
        "certificate": steps - certificates, "sharpness": steps // 5 - sharpness,
    }
    # Every batch booked its standing cost: at least Lightning's dispatch of the monitor's hooks.
    assert monitor._standing.dispatch_per_batch > 0
    assert monitor._governor.spent["standing"] >= steps * monitor._standing.dispatch_per_batch


def test_calibrating_the_dispatch_leaves_a_users_profiler_report_alone(tmp_path):
    from lightning.pytorch.profilers import SimpleProfiler

    steps = 6
    monitor = StabilityMonitor(certificate_every_n_steps=2, sharpness_every_n_steps=0, connectivity_every_n_epochs=0)
    profiler = SimpleProfiler()
    trainer = make_trainer(tmp_path, callbacks=[monitor], limit_val_batches=0, profiler=profiler)
    trainer.fit(_TimedQuadratic(lr=0.05), train_dataloaders=constant_loader(steps))
    # Lightning dispatched the monitor's inherited no-op once per batch; the calibration's calls are not recorded.
    assert len(profiler.recorded_durations[f"[Callback]{monitor.state_key}.on_after_backward"]) == steps
    assert monitor._standing.dispatch_per_batch > 0


def test_a_standing_cost_above_the_budget_still_lets_each_first_probe_run_and_the_warning_says_why(tmp_path):
    # QuadraticModule's steps take well under a millisecond: the monitor's per-batch cost alone is far above a
    # 0.01% budget. Each instrument's first probe still runs (unmeasured), every later one is deferred, and the
    # warning names the per-batch cost instead of a knob that cannot help.
    steps = 32  # per epoch; two epochs: the second defers every due probe
    logger = RecordingLogger()
    monitor = StabilityMonitor(
        certificate_every_n_steps=8, sharpness_every_n_steps=16, sharpness_iters=3, connectivity_every_n_epochs=0,
        max_overhead=1e-4,
    )
    trainer = make_trainer(tmp_path, max_epochs=2, logger=logger, callbacks=[monitor], limit_val_batches=0)
    with pytest.warns(UserWarning) as caught:
        trainer.fit(QuadraticModule(lr=0.05), train_dataloaders=constant_loader(steps))
    assert len(series(logger, "lyapunov/delta_v")) == 1
    assert len(series(logger, "lyapunov/sharpness")) == 1
    assert monitor._governor.deferred["certificate"] >= 2 * steps // 8 - 1
    messages = sorted(str(w.message) for w in caught if "StabilityMonitor: no " in str(w.message))
    assert [m.split(" in epoch")[0] for m in messages] == ["StabilityMonitor: no certificate", "StabilityMonitor: no sharpness"]
    assert all("per-batch cost alone" in m and "raise `max_overhead`" in m for m in messages)


def test_standing_cost_leaves_out_waits_in_collectives_and_starts_each_fit_clean():
    governor = ProbeGovernor(0.05, ("certificate",))
    governor.start(now=0.0)
    standing = StandingCost(governor)
    standing.enter()
    started = time.perf_counter()
    time.sleep(0.05)  # a decision's collective waiting for the device or the other ranks
    governor.waited += time.perf_counter() - started
    standing.leave()
    standing.charge_batch()
    assert governor.spent[StandingCost.KIND] < 0.01
    # A hook that raised left time pending; the next fit's calibration drops it.
    standing.enter()
    time.sleep(0.02)
    standing.leave()
    standing.calibrate(lambda: None, hooks_per_batch=6)
    before = governor.spent[StandingCost.KIND]
    standing.charge_batch()
    assert governor.spent[StandingCost.KIND] - before == pytest.approx(standing.dispatch_per_batch)
    assert standing.dispatch_per_batch < 0.001


def test_a_copied_monitor_keeps_one_governor_for_its_policy_and_standing_cost():
    import copy
    import pickle

    for clone in (copy.deepcopy(StabilityMonitor()), pickle.loads(pickle.dumps(StabilityMonitor()))):
        assert clone._standing.governor is clone._governor is clone._policy.governor
