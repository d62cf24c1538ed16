"""The probe in its own process (service/vllm_plugin/probe_process.py), without an engine.

A real child process with a real (untrained) probe: what it sends equals what the probe computes
in this process on the same rows, and when the child dies the worker side falls back to the
in-process emitter without losing an item. The engine-level path (records joined to tokens, the
stats) is in test_capture.py.
"""

import os
import signal
import time

import pytest
import torch

from alignlens.probe.attribution import Attributor
from alignlens.probe.record import Detail
from alignlens.service.engine.channel import CaptureSender, SyncCaptureSink
from alignlens.service.engine.wire import Kind
from alignlens.service.vllm_plugin.emitter import GEN_PRIORITY, REPLAY_PRIORITY
from alignlens.service.vllm_plugin.probe_process import ProbeProcess
from alignlens.service.vllm_plugin.rows import Row
from alignlens.service.vllm_plugin.state import STATE


@pytest.fixture()
def setup(tiny_llama, tmp_path, monkeypatch):
    from tests.support.tiny import make_probe_artifact

    probe = make_probe_artifact(tiny_llama, tmp_path / "probe.safetensors")
    attributor = Attributor.load(probe, tiny_llama)
    sink = SyncCaptureSink()
    sender = CaptureSender(sink.address)
    # what the worker holds: the probe and the sender (the fallback emitter uses them)
    monkeypatch.setattr(STATE, "attributor", attributor)
    monkeypatch.setattr(STATE, "sender", sender)
    proc = ProbeProcess(sink.address, str(probe), str(tiny_llama), idle_helper=False)
    yield proc, attributor, sink
    proc.close()
    sender.close()
    sink.shutdown()


def _item(attributor: Attributor, n: int, kind: Kind, seed: int, with_logits: bool):
    g = torch.Generator().manual_seed(seed)
    L, d, V = attributor.L, attributor.host.d_model, attributor.host.W_U.shape[0]
    tensors = torch.randn(n, 2 * L + 1, d, generator=g)
    rows = [Row(i, f"req-{seed}", kind, i, int(torch.randint(V, (), generator=g)), Detail.SUMMARY, False,
                logits=torch.randn(V, generator=g) if with_logits else None) for i in range(n)]
    return rows, tensors


def _close(a, b) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)


def _expected(attributor: Attributor, rows, tensors):
    logits = torch.stack([r.logits for r in rows]) if rows[0].logits is not None else None
    return attributor(tensors[:, 0::2], tensors[:, 1::2], torch.tensor([r.token for r in rows]), logits=logits)


def test_child_sends_what_the_probe_computes_and_the_worker_falls_back_when_it_dies(setup):
    proc, attributor, sink = setup
    assert proc.pid != os.getpid() and proc.helper is None  # idle_helper=False
    items = [_item(attributor, 3, Kind.GEN, 1, True), _item(attributor, 5, Kind.REPLAY, 2, False)]
    for step, (rows, tensors) in enumerate(items):
        proc.submit(step, rows, tensors, GEN_PRIORITY if rows[0].kind == Kind.GEN else REPLAY_PRIORITY)
    got = {(rec.rid, rec.index): rec for _, rec in sink.drain(8)}
    for rows, tensors in items:
        for r, want in zip(rows, _expected(attributor, rows, tensors)):
            rec = got[(r.rid, r.index)]
            assert rec.kind == r.kind and rec.token == r.token and rec.error is None
            assert _close(rec.attr.family_attribution, want.family_attribution)
            assert rec.attr.host_logprob == pytest.approx(want.host_logprob, abs=1e-5)
    assert proc.wait_idle(10) and proc.counters() == (8, 0) and proc.backlog == 0

    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while proc._proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # items the child had not finished when it died are computed by the fallback, once
    lost = [_item(attributor, 6, Kind.REPLAY, 4, False), _item(attributor, 2, Kind.GEN, 5, True)]
    proc2 = ProbeProcess(*proc.args)
    for step, (rows, tensors) in enumerate(lost):
        proc2.submit(20 + step, rows, tensors, GEN_PRIORITY if rows[0].kind == Kind.GEN else REPLAY_PRIORITY)
    os.kill(proc2.pid, signal.SIGKILL)
    assert proc2.wait_idle(20) and proc2.pid is None
    got = {(rec.rid, rec.index): rec for _, rec in sink.drain(8)}
    assert len(got) == 8
    for rows, tensors in lost:
        for r, want in zip(rows, _expected(attributor, rows, tensors)):
            assert _close(got[(r.rid, r.index)].attr.family_attribution, want.family_attribution)
    proc2.close()

    rows, tensors = _item(attributor, 4, Kind.GEN, 3, True)
    for attempt in range(3):  # the first send after the death may still land in the socket buffer
        proc.submit(10 + attempt, rows, tensors, GEN_PRIORITY)
        if proc._fallback is not None:
            break
    assert proc._fallback is not None, "the worker side did not notice its probe process died"
    recs = [rec for _, rec in sink.drain(4)]
    want = _expected(attributor, rows, tensors)
    assert len(recs) == 4 and all(rec.error is None for rec in recs)
    for rec in recs:
        assert _close(rec.attr.family_attribution, want[rec.index].family_attribution)
