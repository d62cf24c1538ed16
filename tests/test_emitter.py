"""The worker's emitter schedule: generation rows before replay pieces, FIFO within each.

No engine: these are the pure scheduling parts of service/vllm_plugin/emitter.py, fed with
hand-built rows. The engine-level behaviour (records joined to tokens) is in test_capture.py.
"""

import threading
import time

import pytest
import torch

from alignlens.probe.record import Detail
from alignlens.service.engine.wire import Kind
from alignlens.service.vllm_plugin import emitter as capture
from alignlens.service.vllm_plugin.emitter import (
    GEN_PRIORITY,
    REPLAY_PIECE_ROWS,
    REPLAY_PRIORITY,
    BackgroundEmitter,
    split_step,
)
from alignlens.service.vllm_plugin.rows import Row

GEN, REPLAY = Kind.GEN, Kind.REPLAY


def _rows(kinds: list[Kind]) -> tuple[list[Row], torch.Tensor]:
    rows = [Row(batch_index=i, rid=f"r{k.value}", kind=k, index=i, token=i, detail=Detail.SUMMARY, ship_resid=False)
            for i, k in enumerate(kinds)]
    tensors = torch.arange(len(kinds), dtype=torch.float32)[:, None, None].expand(-1, 3, 2).clone()
    return rows, tensors


def test_split_step_gen_only_is_one_item_unchanged():
    rows, tensors = _rows([GEN] * 5)
    [(priority, part, t, h)] = split_step(rows, tensors)
    assert priority == GEN_PRIORITY and part == rows and t is tensors and h is None


def test_split_step_separates_kinds_and_pieces_replay():
    n_replay = 2 * REPLAY_PIECE_ROWS + 3
    kinds = [REPLAY] * 10 + [GEN, GEN] + [REPLAY] * (n_replay - 10)
    rows, tensors = _rows(kinds)
    heads = tensors[:, :2, :1] * 10  # [rows, L, width]: the heads' outputs travel with their rows
    items = split_step(rows, tensors, heads)
    assert [p for p, _, _, _ in items] == [GEN_PRIORITY] + [REPLAY_PRIORITY] * 3
    assert [len(r) for _, r, _, _ in items] == [2, REPLAY_PIECE_ROWS, REPLAY_PIECE_ROWS, 3]
    for _, part, t, h in items:  # every row keeps its own tensor row
        assert [r.batch_index for r in part] == t[:, 0, 0].long().tolist()
        assert [10 * r.batch_index for r in part] == h[:, 0, 0].long().tolist()
        assert len({r.kind for r in part}) == 1
    assert sorted(r.batch_index for _, part, _, _ in items for r in part) == list(range(len(rows)))


def test_emitter_runs_generation_before_queued_replay(monkeypatch):
    done: list[tuple[int, str]] = []
    gate, started = threading.Event(), threading.Event()

    def fake_build(step, rows, tensors, heads=None):
        started.set()
        gate.wait(10)
        done.append((step, rows[0].kind))

    monkeypatch.setattr(capture, "build_message", fake_build)
    emitter = BackgroundEmitter(idle_helper=False)
    rows, tensors = _rows([REPLAY])
    gen_rows, gen_tensors = _rows([GEN])
    emitter.submit(1, rows, tensors, REPLAY_PRIORITY)  # taken at once; blocks on the gate
    assert started.wait(10)
    emitter.submit(2, rows, tensors, REPLAY_PRIORITY)
    emitter.submit(3, rows, tensors, REPLAY_PRIORITY)
    emitter.submit(4, gen_rows, gen_tensors, GEN_PRIORITY)
    emitter.submit(5, gen_rows, gen_tensors, GEN_PRIORITY)
    gate.set()
    assert emitter.wait_idle(10)
    assert done[0] == (1, REPLAY)  # already running when the others arrived
    assert done[1:] == [(4, GEN), (5, GEN), (2, REPLAY), (3, REPLAY)]


@pytest.fixture
def pinned_to_first_core():
    """Pin this thread like vLLM pins its worker, so the emitter has another core to move to."""
    import os

    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip("needs 2 cores")
    os.sched_setaffinity(0, {min(before)})
    yield
    os.sched_setaffinity(0, before)


def test_idle_helper_piece_stuck_is_recomputed_and_sent_once(monkeypatch, pinned_to_first_core):
    sent: list[int] = []
    emitter_busy, release_emitter = threading.Event(), threading.Event()
    helper_took, release_helper = threading.Event(), threading.Event()

    def fake_build(step, rows, tensors, heads=None):
        if rows[0].kind == GEN:  # only the emitter thread takes generation rows
            emitter_busy.set()
            release_emitter.wait(10)
        elif threading.current_thread().name == "alignlens-idle-helper":
            helper_took.set()
            release_helper.wait(10)  # a helper starved by a busy engine
        return {"step": step, "records": rows}

    monkeypatch.setattr(capture, "build_message", fake_build)
    monkeypatch.setattr(capture, "send_message", lambda message: sent.append(message["step"]))
    emitter = BackgroundEmitter(idle_helper=True, helper_takes_generation=False)
    assert emitter.helper is not None
    gen_rows, gen_tensors = _rows([GEN])
    rows, tensors = _rows([REPLAY])
    emitter.submit(0, gen_rows, gen_tensors, GEN_PRIORITY)  # holds the emitter thread...
    assert emitter_busy.wait(10)
    emitter.submit(1, rows, tensors, REPLAY_PRIORITY)  # ...so the idle helper takes piece 1
    assert helper_took.wait(10)
    for step in (2, 3):
        emitter.submit(step, rows, tensors, REPLAY_PRIORITY)
    release_emitter.set()
    t0 = time.monotonic()
    while sorted(sent) != [0, 1, 2, 3] and time.monotonic() - t0 < 10:  # the emitter thread steals piece 1
        time.sleep(0.01)
    assert sorted(sent) == [0, 1, 2, 3]
    release_helper.set()  # the helper finishes piece 1 late: not sent a second time
    assert emitter.wait_idle(10)
    assert sorted(sent) == [0, 1, 2, 3]


def _thread_per_step(monkeypatch, gate: threading.Event | None = None) -> tuple[dict[int, list[str]], list[int]]:
    """build_message that records which threads built each step (optionally blocking the helper
    on `gate`), and send_message that records the steps sent."""
    built: dict[int, list[str]] = {}
    sent: list[int] = []

    def fake_build(step, rows, tensors, heads=None):
        built.setdefault(step, []).append(threading.current_thread().name)
        if gate is not None and threading.current_thread().name == "alignlens-idle-helper":
            gate.wait(10)  # a helper whose core a step took
        return {"step": step}

    monkeypatch.setattr(capture, "build_message", fake_build)
    monkeypatch.setattr(capture, "send_message", lambda message: sent.append(message["step"]))
    return built, sent


def test_generation_goes_to_the_idle_helper_between_steps(monkeypatch, pinned_to_first_core):
    built, sent = _thread_per_step(monkeypatch)
    monkeypatch.setattr(capture.STATE, "in_step", False)
    monkeypatch.setattr(capture, "GEN_HANDOFF_S", 5.0)  # a busy CI core may delay the SCHED_IDLE helper
    emitter = BackgroundEmitter(idle_helper=True, helper_takes_generation=True)
    gen_rows, gen_tensors = _rows([GEN])
    for step in range(5):
        emitter.submit(step, gen_rows, gen_tensors, GEN_PRIORITY)
        time.sleep(0.02)
    assert emitter.wait_idle(10)
    assert sorted(sent) == list(range(5))
    assert all(names == ["alignlens-idle-helper"] for names in built.values()), built


def test_generation_during_a_step_goes_to_the_emitter_thread(monkeypatch, pinned_to_first_core):
    built, sent = _thread_per_step(monkeypatch)
    monkeypatch.setattr(capture.STATE, "in_step", True)  # the next step runs: the helper's core is taken
    emitter = BackgroundEmitter(idle_helper=True, helper_takes_generation=True)
    gen_rows, gen_tensors = _rows([GEN])
    t0 = time.monotonic()
    emitter.submit(1, gen_rows, gen_tensors, GEN_PRIORITY)
    assert emitter.wait_idle(10)
    assert time.monotonic() - t0 >= capture.GEN_HANDOFF_S  # left to the helper first
    assert built == {1: ["alignlens-emitter"]} and sent == [1]


def test_generation_held_by_a_preempted_helper_is_recomputed_and_sent_once(monkeypatch, pinned_to_first_core):
    gate = threading.Event()
    built, sent = _thread_per_step(monkeypatch, gate)
    monkeypatch.setattr(capture.STATE, "in_step", False)
    monkeypatch.setattr(capture, "GEN_HANDOFF_S", 5.0)  # the helper takes it first, however late it runs
    emitter = BackgroundEmitter(idle_helper=True, helper_takes_generation=True)
    gen_rows, gen_tensors = _rows([GEN])
    t0 = time.monotonic()
    emitter.submit(1, gen_rows, gen_tensors, GEN_PRIORITY)
    while sent != [1] and time.monotonic() - t0 < 10:
        time.sleep(0.005)
    assert sent == [1] and time.monotonic() - t0 >= capture.GEN_STEAL_S
    assert built[1] == ["alignlens-idle-helper", "alignlens-emitter"]
    gate.set()  # the helper finishes late: not sent a second time
    assert emitter.wait_idle(10)
    assert sent == [1]
