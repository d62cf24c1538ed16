"""The gRPC service end to end: the real `alignlens serve` process on loopback, the real client.

One server per module (engine start-up dominates: ~30-60 s eager here) hosting a tiny random
Llama with an untrained probe artifact made for it: these tests check the plumbing (fields,
shapes, live/audit agreement, concurrency, cancellation, validation, metrics, health,
reflection, drain), not the science; probe quality is tested in tests/test_probe_*.
Tests run in file order; the last one drains the shared server with SIGTERM.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from alignlens.service.client import AttributionClient, field_violations, pb2
from alignlens.service.server.convert import token_to_dict
from tests.support.tiny import make_probe_artifact
from tools.serve_process import REPO, ServeProcess, ServeProcessError, free_port
from tools.soak import GAUGES, wait_gauges_zero

MAX_MODEL_LEN = 512
SLOTS, MAX_QUEUE = 8, 2
PROMPTS = ["The capital of France is", "def add(a, b):", "1, 2, 3, 4, 5,", "Question: what is two plus two?",
           "Lists: apples, pears,", "The quick brown fox", "return a + b", "Answer: four."]


class ServerProcess(ServeProcess):
    """tools.serve_process.ServeProcess with this module's limits, a client and a /metrics reader."""

    def __init__(self, model: Path, log_path: Path, *extra: str):
        super().__init__(["--model", str(model), "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(SLOTS),
                          "--max-queue", str(MAX_QUEUE), "--health-poll-seconds", "0.2",
                          "--grace-period-seconds", "30", *extra], log_path)
        self.start()
        self.client = AttributionClient(self.target, timeout_s=120)
        self.statuses_while_starting: set[str] = set()

    def wait_ready(self, timeout_s: float = 400) -> ServerProcess:
        try:
            self.wait_serving(timeout_s, on_status=self.statuses_while_starting.add)
        except ServeProcessError as exc:
            pytest.fail(str(exc))
        return self

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted label items): value} scraped from /metrics."""
        import urllib.request

        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def wait_metric(self, name: str, value: float, timeout_s: float = 10.0) -> float:
        deadline = time.monotonic() + timeout_s
        while (got := self.metrics()[(name, ())]) != value and time.monotonic() < deadline:
            time.sleep(0.1)
        return got

    def stop(self) -> None:
        self.client.close()
        super().stop()


@pytest.fixture(scope="module")
def probe_path(tiny_llama, tmp_path_factory) -> Path:
    return make_probe_artifact(tiny_llama, tmp_path_factory.mktemp("probe") / "tiny.safetensors")


@pytest.fixture(scope="module")
def server(tiny_llama, probe_path, tmp_path_factory):
    srv = ServerProcess(tiny_llama, tmp_path_factory.mktemp("serve") / "server.log", "--probe", str(probe_path),
                        "--enforce-eager")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def _generate(client, prompt, **kw) -> tuple[list[dict], object]:
    stream = client.generate(prompt, **kw)
    tokens = [token_to_dict(t) for t in stream]
    return tokens, stream.finished


def test_record_and_proto_fields_match():
    """probe/record.py TokenAttribution and the proto message carry the same fields (no server)."""
    from alignlens.probe.record import Direction, TokenAttribution
    from alignlens.service.server.convert import attribution_from_proto, attribution_to_proto

    for record, message in ((TokenAttribution, pb2.TokenAttribution), (Direction, pb2.Direction)):
        assert set(record.__struct_fields__) == {f.name for f in message.DESCRIPTOR.fields}
    rec = TokenAttribution(token_id=3, depth_gain=[0.5, -0.25], depth_importance=[1.0, 0.0], crystallization_depth=1,
                           family_importance=[[0.5, 0.25, 0.25]], family_attribution=[[2.0, 1.0, 1.0]],
                           top_directions=[Direction(block=1, family="mlp_in", index=4, score=-0.5)],
                           readout_prob=0.5, readout_top1=True, host_logprob=-0.75,
                           dla_embed=0.25, dla_attn=[-1.5], dla_mlp=[1.0], dla_total=-0.25,
                           dla_attn_out_directions=[[0.5, -0.25]], dla_heads=[[-1.0, -0.5]])
    assert TokenAttribution.from_dict(rec.to_dict()) == rec
    # the typed wire record survives the side channel's encoding unchanged
    from alignlens.service.engine.wire import Kind, StepMessage, TokenRecord, decode_step, encode_step

    step = StepMessage(step=1, attr_seconds=0.0, n_blocks=1, d_model=2, dtype="float32",
                       records=[TokenRecord(rid="r", kind=Kind.GEN, index=0, token=3, attr=rec)])
    assert decode_step(encode_step(step)) == step
    assert attribution_from_proto(attribution_to_proto(rec)) == rec
    from alignlens.service.server.convert import top_dla, top_pair

    assert top_pair(rec) == (1, "qkv", 2.0) and top_dla(rec) == ("attn 1", -1.5)


def test_health_reflection_and_model_info(server, tiny_llama, probe_path):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    from alignlens.probe.fingerprint import host_fingerprint
    from alignlens.probe.host import Host

    # health answered during the engine's start-up (the event loop is not blocked by it; a check
    # may still time out on a busy machine, so only the answer is required)
    assert "NOT_SERVING" in server.statuses_while_starting, server.statuses_while_starting
    assert server.client.health() == "SERVING"
    assert server.client.health("alignlens.v1.AttributionService") == "SERVING"
    services = ProtoReflectionDescriptorDatabase(server.client.channel).get_services()
    assert {"alignlens.v1.AttributionService", "grpc.health.v1.Health"} <= set(services)
    info = server.client.model_info()
    assert (info.n_layers, info.d_model, list(info.families), info.k) == (4, 256, ["qkv", "attn_out", "mlp_in"], 8)
    assert info.fingerprint == host_fingerprint(Host.from_checkpoint(tiny_llama))
    assert info.max_model_len == MAX_MODEL_LEN and info.probe.loaded and info.probe.path == str(probe_path)
    assert info.probe.fingerprint == info.fingerprint and info.probe.metadata["k"] == 8


def test_generate_fields_and_shapes(server, tiny_llama):
    from transformers import AutoTokenizer

    info = server.client.model_info()
    L = info.n_layers
    tokens, fin = _generate(server.client, PROMPTS[0], max_tokens=20, temperature=0, ignore_eos=True,
                            detail="full", request_id="shapes-1")
    assert [t["index"] for t in tokens] == list(range(20))
    assert fin.finish_reason == pb2.FINISH_REASON_LENGTH and fin.completion_tokens == 20
    assert fin.prompt_tokens == len(fin.prompt_token_ids) > 0
    assert 0 < fin.time_to_first_token_seconds <= fin.e2e_seconds and fin.queue_seconds >= 0
    for t in tokens:
        a = t["attribution"]
        assert 0 <= t["token_id"] < info.vocab_size and t["logprob"] <= 0
        assert len(a["depth_gain"]) == L + 1 and len(a["depth_importance"]) == L + 1
        assert len(a["family_importance"]) == L and all(len(r) == 3 for r in a["family_importance"])
        assert len(a["family_attribution"]) == L
        assert 0 <= a["crystallization_depth"] <= L + 1 and 0 < a["readout_prob"] <= 1
        assert a["token_id"] == t["token_id"] and a["top_directions"]
        assert all(1 <= d["block"] <= L and d["family"] in info.families and d["index"] < info.k
                   for d in a["top_directions"])
        # vLLM's sampler logprob and the probe's host logprob come from the same logits
        assert math.isclose(a["host_logprob"], t["logprob"], rel_tol=1e-3, abs_tol=1e-4)
        # direct logit attribution: the parts sum to the total; per head (captured in the forward)
        # they sum to the attention write's term (the tiny Llama's o_proj has no bias)
        assert abs(a["dla_embed"] + sum(a["dla_attn"]) + sum(a["dla_mlp"]) - a["dla_total"]) < 1e-4
        assert len(a["dla_heads"]) == L and len(a["dla_attn_out_directions"]) == L
        for per_head, attn in zip(a["dla_heads"], a["dla_attn"], strict=True):
            assert abs(sum(per_head) - attn) < 1e-4 + 1e-4 * abs(attn), (per_head, attn)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert list(fin.prompt_token_ids) == tokenizer(PROMPTS[0])["input_ids"]
    ids = [t["token_id"] for t in tokens]
    assert "".join(t["text"] for t in tokens) == tokenizer.decode(ids, skip_special_tokens=True)
    summary, _ = _generate(server.client, PROMPTS[0], max_tokens=4, temperature=0, detail="summary")
    assert summary[0]["attribution"]["top_directions"] == [] and summary[0]["attribution"]["depth_gain"]
    plain, _ = _generate(server.client, PROMPTS[0], max_tokens=4, temperature=0, detail="none")
    assert plain[0]["attribution"] is None and [t["token_id"] for t in plain] == ids[:4]


def test_stop_strings_and_chat_prompts(server, tiny_llama):
    from transformers import AutoTokenizer

    tokens, _ = _generate(server.client, PROMPTS[1], max_tokens=24, temperature=0, ignore_eos=True, detail="none")
    text = "".join(t["text"] for t in tokens)
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].strip())
    cut, fin = _generate(server.client, PROMPTS[1], max_tokens=24, temperature=0, ignore_eos=True, detail="none",
                         stop=[stop])
    assert fin.finish_reason == pb2.FINISH_REASON_STOP_STRING and fin.stop_string == stop
    assert "".join(t["text"] for t in cut) == text[:text.find(stop)]  # the stop string is not shown
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    _, fin = _generate(server.client, turns, max_tokens=2, detail="none")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert list(fin.prompt_token_ids) == tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                                                       tokenize=True, return_dict=False)


def _close(a, b, rtol: float = 1e-3, atol: float = 1e-5) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b, strict=True))
    return abs(a - b) <= atol + rtol * max(abs(a), abs(b))


def test_live_and_audit_agree(server):
    """Live decode rows and one teacher-forced replay pass give the same attributions."""
    continuous = ("depth_gain", "depth_importance", "family_importance", "family_attribution", "readout_prob",
                  "host_logprob", "dla_attn", "dla_mlp", "dla_total", "dla_heads")
    discrete_same, discrete_total, worst = 0, 0, 0.0
    for prompt in PROMPTS[:4]:
        live, fin = _generate(server.client, prompt, max_tokens=32, temperature=0, ignore_eos=True, detail="full")
        audit = server.client.audit(list(fin.prompt_token_ids), [t["token_id"] for t in live], detail="full")
        replayed = [token_to_dict(t) for t in audit.tokens]
        assert [t["token_id"] for t in replayed] == [t["token_id"] for t in live]
        assert "".join(t["text"] for t in replayed) == "".join(t["text"] for t in live)
        for a, b in zip(live, replayed, strict=True):
            la, lb = a["attribution"], b["attribution"]
            for name in continuous:
                assert _close(la[name], lb[name]), (name, la[name], lb[name])
            worst = max(worst, max(abs(x - y) for x, y in zip(la["depth_gain"], lb["depth_gain"], strict=True)))
            for name in ("crystallization_depth", "readout_top1"):
                discrete_same += la[name] == lb[name]
                discrete_total += 1
            discrete_same += [(d["block"], d["family"], d["index"]) for d in la["top_directions"]] == \
                [(d["block"], d["family"], d["index"]) for d in lb["top_directions"]]
            discrete_total += 1
    assert discrete_same >= 0.99 * discrete_total, (discrete_same, discrete_total)
    print(f"live vs audit: max |depth_gain| difference {worst:.2e} nats; discrete {discrete_same}/{discrete_total}")


def test_eight_concurrent_streams(server):
    results: dict[int, tuple[list[dict], object]] = {}

    def run(i: int) -> None:
        results[i] = _generate(server.client, PROMPTS[i], max_tokens=32, temperature=0.8, seed=i, ignore_eos=True,
                               detail="summary", request_id=f"concurrent-{i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(8))
    for tokens, fin in results.values():
        assert [t["index"] for t in tokens] == list(range(32)) and fin.completion_tokens == 32
        assert all(t["attribution"] is not None for t in tokens)
    assert server.wait_metric("alignlens_requests_running", 0) == 0


def test_cancel_and_deadline_free_everything(server):
    stream = server.client.generate(PROMPTS[1], max_tokens=400, ignore_eos=True, detail="summary")
    for n, _token in enumerate(stream):
        if n == 4:
            stream.cancel()
            break
    with pytest.raises(grpc.RpcError) as err:
        list(server.client.generate(PROMPTS[2], max_tokens=400, ignore_eos=True, detail="summary", timeout_s=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_gauges_zero(server.metrics_url) == dict.fromkeys(GAUGES, 0.0)  # every buffer freed
    # the RPC counter is incremented as the handler unwinds, just after its engine slot is freed
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = server.metrics()
        codes = {dict(labels).get("code"): v for (name, labels), v in m.items()
                 if name == "alignlens_requests_total" and dict(labels).get("rpc") == "Generate"}
        if codes.get("CANCELLED", 0) >= 1 and codes.get("DEADLINE_EXCEEDED", 0) >= 1:
            break
        time.sleep(0.1)
    assert codes.get("CANCELLED", 0) >= 1 and codes.get("DEADLINE_EXCEEDED", 0) >= 1, codes


def test_cli_generate_json_and_audit(server, tmp_path):
    import json

    target = ["--target", f"127.0.0.1:{server.port}"]
    cli = [sys.executable, "-m", "alignlens.service.cli"]
    out = subprocess.run([*cli, "generate", PROMPTS[0], "--max-tokens", "6", "--detail", "summary", "--json", *target],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 0 and len(lines) == 7 and "finished" in lines[-1], out.stderr[-2000:]
    assert all(line["attribution"]["depth_gain"] for line in lines[:-1])
    ids = [line["token_id"] for line in lines[:-1]]
    prompt_ids = lines[-1]["finished"]["prompt_token_ids"]
    logs = tmp_path / "logs.jsonl"
    rows = [{"id": "a", "prompt": prompt_ids, "completion": ids},
            {"id": "b", "prompt": "Hi", "completion": ""},  # the server says: empty completion
            "not json {",
            {"id": "d", "prompt": PROMPTS[3], "completion": " four"},
            {"id": "e", "completion": "x"},  # no prompt
            *({"id": f"r{i}", "prompt": PROMPTS[i % len(PROMPTS)], "completion": " and so on"} for i in range(6))]
    logs.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    result, errors = tmp_path / "out.jsonl", tmp_path / "out.jsonl.errors.jsonl"
    audit = [*cli, "audit", "--in", str(logs), "--out", str(result), "--detail", "summary", "--concurrency", "2",
             *target]
    # killed at a random point, then re-run to the end: every line exactly once, in one of the files
    proc = subprocess.Popen(audit, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not result.exists() or len(result.read_bytes()) < 2):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    with open(result, "ab") as fh:
        fh.write(b'{"line": 99, "inp')  # as if the kill had cut a record in half
    out = subprocess.run(audit, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]  # errors were written
    done = [json.loads(line) for line in result.read_text().splitlines()]
    bad = [json.loads(line) for line in errors.read_text().splitlines()]
    assert sorted(r["line"] for r in done) == [1, 4, *range(6, 12)], out.stderr
    assert sorted(r["line"] for r in bad) == [2, 3, 5]
    first = next(r for r in done if r["line"] == 1)
    assert [t["token_id"] for t in first["tokens"]] == ids and first["tokens"][0]["attribution"]["depth_gain"]
    reasons = {r["line"]: r["reason"] for r in bad}
    assert reasons[2].startswith("INVALID_ARGUMENT") and "not JSON" in reasons[3] and "'prompt'" in reasons[5]
    again = subprocess.run(audit, cwd=REPO, capture_output=True, text=True, timeout=120)  # nothing left to do
    assert "11 lines already done, 0 to go" in again.stderr and len(result.read_text().splitlines()) == len(done)
    logs.write_text(logs.read_text().replace("and so on", "and more"))
    changed = subprocess.run(audit, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert changed.returncode != 0 and "not the line" in changed.stderr
    # --causal --causal-pairs 2: standard JSON (the pairs not ablated are null, not NaN), the budget
    # kept in the record, the engine-checked panel in the page, and no resume with another budget
    one, causal_out, page = tmp_path / "one.jsonl", tmp_path / "causal.jsonl", tmp_path / "causal.html"
    one.write_text(json.dumps({"id": "a", "prompt": prompt_ids, "completion": ids[:2]}) + "\n")
    causal = [*cli, "audit", "--in", str(one), "--out", str(causal_out), "--causal", "--causal-pairs", "2",
              "--html", str(page), *target]
    out = subprocess.run(causal, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]

    def strict(constant):
        raise ValueError(f"not standard JSON: {constant}")

    record = json.loads(causal_out.read_text(), parse_constant=strict)
    assert record["detail"] == "causal" and record["causal_pairs"] == 2
    for token in record["tokens"]:
        drop = token["attribution"]["family_drop"]
        assert sum(v is not None for row in drop for v in row) == 2 and len(drop) == server.client.model_info().n_layers
    L = len(record["tokens"][0]["attribution"]["family_drop"])
    html = page.read_text()
    assert html.count('class="unmeasured"') == 2 * (3 * L - 2) and html.count("rank corr.") == 2
    other = subprocess.run([*cli, "audit", "--in", str(one), "--out", str(causal_out), "--causal",
                            "--causal-pairs", "3", *target], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and "was made with" in other.stderr


def test_audit_stream_equals_audit(server):
    tokens, fin = _generate(server.client, PROMPTS[4], max_tokens=12, detail="full")
    ids = [t["token_id"] for t in tokens]
    unary = server.client.audit(list(fin.prompt_token_ids), ids, detail="full")
    stream = server.client.audit_stream(list(fin.prompt_token_ids), ids, detail="full")
    streamed = list(stream)
    assert stream.summary.completion_tokens == len(ids) == len(streamed)
    assert stream.summary.prompt_tokens == len(fin.prompt_token_ids)
    for a, b in zip(unary.tokens, streamed, strict=True):
        assert (a.index, a.token_id, a.text) == (b.index, b.token_id, b.text)
        x, y = token_to_dict(a)["attribution"], token_to_dict(b)["attribution"]
        assert _close(x["depth_gain"], y["depth_gain"]) and _close(x["dla_total"], y["dla_total"])
    # cancelled half-way: everything is freed
    stream = server.client.audit_stream(PROMPTS[0], list(range(5, 200)), detail="summary")
    for n, _token in enumerate(stream):
        if n == 3:
            stream.cancel()
            break
    assert wait_gauges_zero(server.metrics_url) == dict.fromkeys(GAUGES, 0.0)  # every buffer freed


def _page_structure(page: str) -> dict:
    """Counts of what a rendered report holds, read with the standard HTML parser."""
    from html.parser import HTMLParser

    found = {"tok": 0, "titles": [], "ids": set(), "sections": 0, "external": []}

    class Reader(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if a.get("class") == "tok":
                found["tok"] += 1
                found["titles"].append(a.get("title", ""))
            if a.get("class") == "generation":
                found["sections"] += 1
            if "id" in a:
                found["ids"].add(a["id"])
            for key in ("src", "href"):
                if key in a:
                    found["external"].append((tag, a[key]))

    Reader().feed(page)
    return found


def test_cli_pictures_html_and_png(server, tmp_path):
    """`generate --html/--png` and `audit --html/--png` draw the real attribution, self-contained."""
    import json

    from PIL import Image

    target = ["--target", f"127.0.0.1:{server.port}"]
    cli = [sys.executable, "-m", "alignlens.service.cli"]
    page, png = tmp_path / "gen.html", tmp_path / "gen.png"
    out = subprocess.run([*cli, "generate", PROMPTS[0], "--max-tokens", "6", "--detail", "full", "--json",
                          "--html", str(page), "--png", str(png), *target],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    tokens = [json.loads(line) for line in out.stdout.splitlines()][:-1]
    text = page.read_text()
    found = _page_structure(text)
    assert found["tok"] == 6 and found["sections"] == 1
    assert {"depth-heatmap-svg", "family-shares-svg", "dla-svg", "text-0"} <= found["ids"], found["ids"]
    assert not found["external"] and "url(" not in text and "@import" not in text  # nothing fetched at view time
    for title, token in zip(found["titles"], tokens, strict=True):  # the numbers on hover are the served ones
        a = token["attribution"]
        assert f"crystallization depth {a['crystallization_depth']}" in title and f"id {token['token_id']}" in title
        assert f"total {a['dla_total']:+.3f}" in title
    image = Image.open(png)
    assert image.size[0] > 100 and len(image.getcolors(maxcolors=1 << 20)) > 10  # drawn, not blank
    logs = tmp_path / "logs.jsonl"
    logs.write_text("".join(json.dumps({"prompt": p, "completion": " and so on"}) + "\n" for p in PROMPTS[:3]))
    out = subprocess.run([*cli, "audit", "--in", str(logs), "--out", str(tmp_path / "a.jsonl"), "--detail", "summary",
                          "--html", str(tmp_path / "a.html"), "--png", str(tmp_path / "a.png"), *target],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _page_structure((tmp_path / "a.html").read_text())["sections"] == 3
    assert all((tmp_path / f"a-{line}.png").is_file() for line in (1, 2, 3))


def _gen(prompt=None, detail=pb2.ATTRIBUTION_DETAIL_NONE, request_id="", **sampling) -> "pb2.GenerateRequest":
    return pb2.GenerateRequest(prompt=prompt, sampling=pb2.SamplingParameters(**sampling), detail=detail,
                               request_id=request_id)


def _chat(*roles: str) -> "pb2.Prompt":
    return pb2.Prompt(chat=pb2.Chat(messages=[pb2.ChatMessage(role=r, content="hi") for r in roles]))


TEXT = pb2.Prompt(text="Hello")
BAD_GENERATE = [  # (request, the field the error must name)
    (_gen(), "prompt"),
    (_gen(pb2.Prompt(text="")), "prompt.text"),
    (_gen(pb2.Prompt(token_ids=pb2.TokenIds(ids=[]))), "prompt.token_ids.ids"),
    (_gen(pb2.Prompt(token_ids=pb2.TokenIds(ids=[5, 10**6]))), "prompt.token_ids.ids"),
    (_gen(pb2.Prompt(token_ids=pb2.TokenIds(ids=[5] * 500)), max_tokens=100), "sampling.max_tokens"),
    (_gen(pb2.Prompt(token_ids=pb2.TokenIds(ids=[5] * MAX_MODEL_LEN))), "prompt"),
    (_gen(TEXT, max_tokens=0), "sampling.max_tokens"),
    (_gen(TEXT, temperature=3.0), "sampling.temperature"),
    (_gen(TEXT, temperature=float("nan")), "sampling.temperature"),
    (_gen(TEXT, top_p=0.0), "sampling.top_p"),
    (_gen(TEXT, top_p=1.5), "sampling.top_p"),
    (_gen(TEXT, top_k=10**6), "sampling.top_k"),
    (_gen(TEXT, seed=2**64 - 1), "sampling.seed"),
    (_gen(TEXT, stop=["x"] * 17), "sampling.stop"),
    (_gen(TEXT, stop=[""]), "sampling.stop[0]"),
    (_gen(_chat("user", "robot")), "prompt.chat.messages[1].role"),
    (_gen(pb2.Prompt(chat=pb2.Chat())), "prompt.chat.messages"),
    (_gen(TEXT, detail=7), "detail"),
    (_gen(TEXT, request_id="x" * 200), "request_id"),
]
BAD_AUDIT = [
    (pb2.AuditRequest(prompt=TEXT), "completion"),
    (pb2.AuditRequest(prompt=TEXT, completion_text=""), "completion_text"),
    (pb2.AuditRequest(prompt=TEXT, completion_token_ids=pb2.TokenIds(ids=[10**6])), "completion_token_ids.ids"),
    (pb2.AuditRequest(prompt=TEXT, completion_token_ids=pb2.TokenIds(ids=[5] * MAX_MODEL_LEN)), "completion"),
]


def _invalid_argument_count(server) -> float:
    return sum(v for (name, labels), v in server.metrics().items()
               if name == "alignlens_requests_total" and ("code", "INVALID_ARGUMENT") in labels)


def test_bad_inputs_are_invalid_argument_and_harmless(server):
    stub = server.client.stub
    before = _invalid_argument_count(server)
    for request, field in BAD_GENERATE + BAD_AUDIT:
        with pytest.raises(grpc.RpcError) as err:
            if isinstance(request, pb2.AuditRequest):
                stub.Audit(request, timeout=30)
            else:
                list(stub.Generate(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert [f for f, _ in field_violations(err.value)] == [field], (field, err.value.details())
        assert field.split("[")[0].split(".")[-1] in err.value.details()
    assert server.client.health() == "SERVING"
    tokens, fin = _generate(server.client, "Hello", max_tokens=3, detail="none")
    assert len(tokens) == 3 and fin.completion_tokens == 3
    assert _invalid_argument_count(server) - before == len(BAD_GENERATE) + len(BAD_AUDIT)


def test_full_queue_is_resource_exhausted(server):
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()
    go = threading.Barrier(SLOTS + MAX_QUEUE + 4)

    def run() -> None:
        go.wait()
        try:
            _generate(server.client, PROMPTS[3], max_tokens=200, ignore_eos=True, detail="none")
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=run) for _ in range(SLOTS + MAX_QUEUE + 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.OK) >= SLOTS + MAX_QUEUE and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert server.wait_metric("alignlens_requests_waiting", 0) == 0


def test_detail_none_is_served_as_stock(server):
    """Generate and Audit at detail NONE never reach the capture path: no records leave the worker,
    no buffer opens; the tokens still come with vLLM's logprobs. SUMMARY right after does capture."""
    def records() -> float:
        return server.metrics()[("alignlens_capture_records_total", ())]

    before = records()
    tokens, fin = _generate(server.client, PROMPTS[0], max_tokens=6, temperature=0.0, ignore_eos=True, detail="none")
    assert len(tokens) == 6 == fin.completion_tokens
    assert all(t["attribution"] is None and t["logprob"] is not None for t in tokens)
    audit = server.client.audit(fin.prompt_token_ids, [t["token_id"] for t in tokens], detail="none")
    assert [t.token_id for t in audit.tokens] == [t["token_id"] for t in tokens]
    assert not any(t.HasField("attribution") for t in audit.tokens)
    time.sleep(0.5)  # a record would have arrived by now
    assert records() == before, "a detail NONE request shipped capture records"
    assert server.metrics()[("alignlens_capture_open_requests", ())] == 0
    _generate(server.client, PROMPTS[0], max_tokens=3, temperature=0.0, ignore_eos=True, detail="summary")
    assert records() >= before + 3


def test_interventions_through_the_server(server, tiny_llama, probe_path):
    """A Generate with an intervention equals the replica with the same projection (the probe's own
    k = 8 basis), an Audit under it agrees with it, and bad interventions name their field."""
    from alignlens.probe.artifact import read_metadata
    from alignlens.probe.host import Host
    from alignlens.probe.intervene import Spec, greedy
    from alignlens.probe.svd import load_or_compute
    from alignlens.service.client import intervention
    from tests.support.capture_check import load_replica

    host = Host.from_checkpoint(tiny_llama)
    basis = load_or_compute(host, k=read_metadata(probe_path)["k"]).basis
    assert server.client.model_info().k == basis.shape[2]
    ivs = [intervention(2, "mlp_in"), intervention(1, "attn_out", [0, 1], 2.5, start_position=3)]
    tokens, fin = _generate(server.client, PROMPTS[3], max_tokens=6, temperature=0.0, ignore_eos=True,
                            detail="summary", interventions=ivs)
    specs = [Spec(2, 2), Spec(1, 1, (0, 1), 2.5, 3)]
    want, want_lp = greedy(load_replica(tiny_llama), list(fin.prompt_token_ids), 6, specs, basis, host.attn_out_bias)
    assert [t["token_id"] for t in tokens] == want
    assert max(abs(t["logprob"] - lp) for t, lp in zip(tokens, want_lp)) <= 1e-3
    audit = server.client.audit(list(fin.prompt_token_ids), want, detail="summary", interventions=ivs)
    assert max(abs(t.logprob - lp) for t, lp in zip(audit.tokens, want_lp)) <= 1e-3
    for bad, field in ((intervention(99, "qkv"), "interventions[0].block"),
                       (intervention(1, "qkv", [8]), "interventions[0].directions[0]"),
                       (intervention(1, "qkv", scale=1e9), "interventions[0].scale")):
        with pytest.raises(grpc.RpcError) as err:
            list(server.client.generate(PROMPTS[0], max_tokens=2, interventions=[bad]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(err.value)[0][0] == field
    assert server.client.health() == "SERVING"


def test_causal_audit_family_drop_equals_replica_ablation(server, tiny_llama, probe_path):
    """detail CAUSAL: the engine's family_drop equals probe.ablation's exact drops on the replica (all
    3L pairs, and the probe's 3L - 2 largest with causal_pairs), family_refined combines them."""
    from alignlens.probe.ablation import DecisionAblator
    from alignlens.probe.artifact import read_metadata
    from alignlens.probe.host import Host
    from alignlens.probe.refine import select_pairs
    from alignlens.probe.svd import load_or_compute
    from alignlens.service.server.convert import per_family_rows
    from tests.support.capture_check import load_replica

    tokens, fin = _generate(server.client, PROMPTS[1], max_tokens=6, temperature=0.0, ignore_eos=True,
                            detail="none")
    prompt, completion = list(fin.prompt_token_ids), [t["token_id"] for t in tokens]
    audit = server.client.audit(prompt, completion, detail="causal", causal_indices=[0, 3, 5])
    L = server.client.model_info().n_layers
    host = Host.from_checkpoint(tiny_llama)
    basis = load_or_compute(host, k=read_metadata(probe_path)["k"]).basis
    ablator = DecisionAblator(load_replica(tiny_llama), basis, host.attn_out_bias)
    rows = torch.tensor([0, 3, 5])
    _base, want = ablator.drops(torch.tensor(prompt + completion), len(prompt) - 1 + rows,
                                torch.tensor(completion)[rows])
    for j, t in enumerate(rows.tolist()):
        got = [[getattr(r, f) for f in ("qkv", "attn_out", "mlp_in")] for r in audit.tokens[t].attribution.family_drop]
        assert len(got) == L
        assert (torch.tensor(got) - want[j]).abs().max() <= 1e-3, (t, got, want[j])
    assert all(len(audit.tokens[t].attribution.family_drop) == 0 for t in (1, 2, 4))
    assert want.abs().max() > 1e-2  # the drops are not all zero (else the check proves nothing)
    for t in rows.tolist():  # all 3L ablated: family_refined is |family_drop|
        a = audit.tokens[t].attribution
        assert per_family_rows(a.family_refined) == [[abs(v) for v in r] for r in per_family_rows(a.family_drop)]
    assert all(len(audit.tokens[t].attribution.family_refined) == 0 for t in (1, 2, 4))
    # probe-guided refinement: only the probe's k largest pairs are ablated (the same drops), the rest NaN
    k = 3 * L - 2
    budget = server.client.audit(prompt, completion, detail="causal", causal_indices=[0, 3, 5], causal_pairs=k)
    for j, t in enumerate(rows.tolist()):
        a = budget.tokens[t].attribution
        score, drop = torch.tensor(per_family_rows(a.family_attribution)), torch.tensor(per_family_rows(a.family_drop))
        refined = torch.tensor(per_family_rows(a.family_refined))
        measured = ~torch.isnan(drop).flatten()
        top = select_pairs(score, k)
        assert measured.sum() == k and measured[top].all(), (t, score, drop)
        assert len({int(i) // 3 for i in top}) == L  # every block has a measured pair: block order checked too
        assert (drop.flatten()[top] - want[j].flatten()[top]).abs().max() <= 1e-3
        assert torch.equal(refined.flatten()[measured], drop.flatten()[measured].abs())
        assert torch.equal(refined.flatten()[~measured], score.flatten()[~measured])
    assert all(len(budget.tokens[t].attribution.family_drop) == 0 for t in (1, 2, 4))
    for kwargs, field in (({"detail": "causal", "causal_indices": [6]}, "causal_indices[0]"),
                          ({"detail": "summary", "causal_indices": [0]}, "causal_indices"),
                          ({"detail": "causal", "causal_indices": [0], "causal_pairs": 3 * L + 1}, "causal_pairs"),
                          ({"detail": "full", "causal_pairs": 1}, "causal_pairs")):
        with pytest.raises(grpc.RpcError) as err:
            server.client.audit(prompt, completion, **kwargs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(err.value)[0][0] == field
    with pytest.raises(grpc.RpcError) as err:
        list(server.client.generate(PROMPTS[0], max_tokens=2, detail="causal"))
    assert field_violations(err.value)[0][0] == "detail"


def test_metrics_parse_with_the_right_names(server):
    m = server.metrics()
    names = {name for name, _labels in m}
    for base in ("alignlens_time_to_first_token_seconds", "alignlens_inter_token_latency_seconds",
                 "alignlens_e2e_request_latency_seconds", "alignlens_queue_time_seconds",
                 "alignlens_attribution_step_seconds", "alignlens_crystallization_depth"):
        assert {base + "_bucket", base + "_count", base + "_sum"} <= names, base
    for counter in ("alignlens_requests_total", "alignlens_prompt_tokens_total", "alignlens_generation_tokens_total",
                    "alignlens_attributed_tokens_total", "alignlens_readout_top1_total",
                    "alignlens_capture_records_total", "alignlens_attribution_errors_total",
                    "alignlens_family_importance_share_total"):
        assert counter in names, counter
    assert m[("alignlens_queue_capacity", ())] == MAX_QUEUE
    assert m[("alignlens_engine_healthy", ())] == 1
    ok = m[("alignlens_requests_total", (("code", "OK"), ("rpc", "Generate")))]
    assert ok >= 20 and m[("alignlens_time_to_first_token_seconds_count", ())] >= ok
    assert m[("alignlens_generation_tokens_total", ())] >= 20 * 3
    attributed = m[("alignlens_attributed_tokens_total", ())]
    assert attributed > 0 and 0 <= m[("alignlens_readout_top1_total", ())] <= attributed
    assert m[("alignlens_attribution_step_seconds_count", ())] > 0
    assert m[("alignlens_attribution_errors_total", ())] == 0
    L = server.client.model_info().n_layers
    buckets = [float(dict(labels)["le"]) for name, labels in m if name == "alignlens_crystallization_depth_bucket"]
    assert sorted(buckets) == [*map(float, range(L + 2)), math.inf]
    assert m[("alignlens_crystallization_depth_count", ())] == attributed
    shares = sum(m[("alignlens_family_importance_share_total", (("family", f),))]
                 for f in ("qkv", "attn_out", "mlp_in"))
    assert 0 < shares <= attributed + 1e-6  # each token's shares sum to 1 (or 0 if nothing supported it)
    assert not any("request_id" in dict(labels) for _name, labels in m)


def test_probe_for_another_model_stops_startup(tiny_llama, tmp_path):
    fake = make_probe_artifact(tiny_llama, tmp_path / "other.safetensors", fingerprint="0" * 64)
    out = subprocess.run([sys.executable, "-m", "alignlens.service.cli", "serve", "--model", str(tiny_llama), "--probe",
                          str(fake), "--port", str(free_port()), "--metrics-port", str(free_port())],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "fingerprint 0000000000000000..." in out.stderr and "cannot start" in out.stderr


def test_sigterm_drains_in_flight_streams(server):
    """Last test of the module: it stops the shared server."""
    stream = server.client.generate(PROMPTS[4], max_tokens=300, ignore_eos=True, detail="summary")
    received: list = []
    first = threading.Event()

    def consume() -> None:
        for token in stream:
            received.append(token)
            first.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert first.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while server.client.health() == "SERVING" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.client.health() == "NOT_SERVING"
    with pytest.raises(grpc.RpcError) as err:
        list(server.client.generate("Hello", max_tokens=2, detail="none"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    consumer.join(60)
    assert len(received) == 300 and stream.finished is not None and stream.finished.completion_tokens == 300
    assert server.proc.wait(60) == 0, server.log_tail()
    assert "draining 1 requests" in server.log_path.read_text()


@pytest.mark.slow
def _engine_processes(pid: int) -> list:
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True)]


def test_dead_engine_turns_not_serving_then_exits(tiny_llama, tmp_path):
    """A second server (no probe, eager) whose engine core process is killed under it: health says
    NOT_SERVING and RPCs UNAVAILABLE, then the server exits with status 3 for its supervisor."""
    from alignlens.service.server.app import EXIT_ENGINE_DIED

    srv = ServerProcess(tiny_llama, tmp_path / "server.log", "--probe", "none", "--enforce-eager")
    try:
        srv.wait_ready()
        assert srv.metrics()[("alignlens_engine_healthy", ())] == 1
        children = _engine_processes(srv.proc.pid)
        cores = [p for p in children if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
        assert cores, [p.cmdline() for p in children]
        for p in cores:
            p.kill()
        seen, codes = set(), set()
        deadline = time.monotonic() + 30
        while srv.proc.poll() is None and time.monotonic() < deadline:
            seen.add(srv.client.health(timeout_s=1.0))
            try:
                list(srv.client.generate("Hello", max_tokens=2, detail="none", timeout_s=2))
            except grpc.RpcError as err:
                codes.add((err.code(), "died" in (err.details() or "")))
            time.sleep(0.1)
        assert srv.proc.wait(30) == EXIT_ENGINE_DIED, srv.log_tail()
        assert "NOT_SERVING" in seen and (grpc.StatusCode.UNAVAILABLE, True) in codes, (seen, codes)
        deadline = time.monotonic() + 15
        while any(p.is_running() and p.status() != "zombie" for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in children if p.is_running() and p.status() != "zombie"]
    finally:
        srv.stop()


def test_kill_9_leaves_no_engine_processes_or_files(tiny_llama, tmp_path):
    """`kill -9` of the server: its engine core, worker and resource-tracker processes exit by
    themselves within seconds, and its runtime folder (ZeroMQ sockets, torch's file store) is gone."""
    import os

    runtime = Path(os.environ["ALIGNLENS_RUNTIME_DIR"])
    srv = ServerProcess(tiny_llama, tmp_path / "server.log", "--probe", "none", "--enforce-eager")
    try:
        srv.wait_ready()
        children = _engine_processes(srv.proc.pid)
        names = " ".join(" ".join(p.cmdline()) + p.name() for p in children)
        assert "EngineCore" in names and "resource_tracker" in names, names
        private = [p for p in runtime.glob(f"serve-{srv.proc.pid}-*")]
        assert len(private) == 1 and any(private[0].iterdir()), private  # the engine's IPC files are in it
        srv.proc.kill()
        srv.proc.wait()
        t0 = time.monotonic()
        while any(p.is_running() and p.status() != "zombie" for p in children) and time.monotonic() - t0 < 20:
            time.sleep(0.2)
        left = [(p.pid, p.name()) for p in children if p.is_running() and p.status() != "zombie"]
        assert not left, f"still running {time.monotonic() - t0:.0f} s after kill -9: {left}"
        print(f"engine processes gone {time.monotonic() - t0:.1f} s after kill -9")
        assert time.monotonic() - t0 < 10, f"engine processes took {time.monotonic() - t0:.1f} s to exit"
        assert not private[0].exists(), list(private[0].iterdir())
    finally:
        srv.stop()


@pytest.mark.slow
def test_gemma3_270m_served_with_attribution(tmp_path):
    """Gemma 3 270M through `alignlens serve --model gemma3-270m --probe ...` (compiled): attribution
    streams with every token, the direct logit attribution splits each logit exactly through the
    sandwich norms, live and audit agree, and tokens are the model's. The probe here is untrained
    (its numbers mean nothing; the trained one is rebuilt by the command in the README): this checks
    the engine path, and without a probe the server says why attribution is off."""
    from alignlens.service.modelstore import fetch_model
    from alignlens.service.server.model_info import choose_probe, host_facts

    checkpoint = fetch_model("gemma3-270m", progress=False)
    facts = host_facts(checkpoint)
    assert not facts.probe_unsupported and choose_probe("auto", facts).path is None  # no shipped probe
    probe = make_probe_artifact(checkpoint, tmp_path / "gemma-probe.safetensors")
    srv = ServerProcess("gemma3-270m", tmp_path / "server.log", "--probe", str(probe))
    try:
        srv.wait_ready(900)
        info = srv.client.model_info()
        assert (info.n_layers, info.d_model, info.vocab_size) == (18, 640, 262144) and info.probe.loaded
        tokens, fin = _generate(srv.client, "The capital of France is", max_tokens=8, temperature=0.0, detail="full")
        assert "".join(t["text"] for t in tokens).startswith(" the capital of the country of France"), tokens
        assert fin.prompt_token_ids[0] == 2  # BOS first
        for t in tokens:
            a = t["attribution"]
            assert abs(a["dla_embed"] + sum(a["dla_attn"]) + sum(a["dla_mlp"]) - a["dla_total"]) < 1e-4
            assert math.isclose(a["host_logprob"], t["logprob"], rel_tol=1e-3, abs_tol=1e-4)
            for per_head, attn in zip(a["dla_heads"], a["dla_attn"], strict=True):  # through the post-norm
                assert abs(sum(per_head) - attn) < 1e-3 + 1e-3 * abs(attn), (per_head, attn)
        audit = srv.client.audit(list(fin.prompt_token_ids), [t["token_id"] for t in tokens], detail="full")
        assert [t.token_id for t in audit.tokens] == [t["token_id"] for t in tokens]
        for live, replay in zip(tokens, map(token_to_dict, audit.tokens), strict=True):
            a, b = live["attribution"], replay["attribution"]
            assert a["crystallization_depth"] == b["crystallization_depth"]
            assert abs(a["dla_total"] - b["dla_total"]) < 1e-3
            assert max(abs(x - y) for r, q in zip(a["family_attribution"], b["family_attribution"], strict=True)
                       for x, y in zip(r, q, strict=True)) < 1e-3
    finally:
        srv.stop()

