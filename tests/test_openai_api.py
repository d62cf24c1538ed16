"""The OpenAI-compatible HTTP API with real clients: the `openai` SDK and lm-evaluation-harness.

One server for the module: the default model (SmolLM2-135M-Instruct) with its shipped probe, eager,
serving gRPC and `--http-port` from the same engine, so every HTTP answer can be checked against
the gRPC one for the same request. The lm-eval tests (slow) run two small tasks shipped as local
files (tests/data/lm_eval: a 24-question multiple-choice log-likelihood task and a 16-question
generate_until task) through alignlens and through lm-eval's own `hf` backend on the same
checkpoint, and require the same per-sample answers.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from alignlens.service.client import AttributionClient
from alignlens.service.server.convert import token_to_dict
from tests.support.servers import started
from tools.serve_process import free_port

DATA = Path(__file__).parent / "data" / "lm_eval"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    http_port = free_port()
    log = tmp_path_factory.mktemp("openai") / "serve.log"
    srv = started(["--model", str(default_model), "--enforce-eager", "--max-model-len", "1024",
                   "--http-port", str(http_port)], log)
    srv.http = f"http://127.0.0.1:{http_port}/v1"
    srv.grpc = AttributionClient(srv.target, timeout_s=120)
    yield srv
    srv.grpc.close()
    srv.stop()


@pytest.fixture(scope="module")
def sdk(server):
    import openai

    return openai.OpenAI(base_url=server.http, api_key="unused", max_retries=0, timeout=120)


def _model(server) -> str:
    return server.grpc.model_info().name


def test_models_and_completion_match_grpc(server, sdk):
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse

    models = sdk.models.list()
    assert [m.id for m in models.data] == [_model(server)]
    resp = sdk.completions.create(model=_model(server), prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    choice = resp.choices[0]
    stream = server.grpc.generate(PROMPT, max_tokens=12, temperature=0, detail="none")
    grpc_tokens = [token_to_dict(t) for t in stream]
    assert choice.text == "".join(t["text"] for t in grpc_tokens)
    assert resp.usage.completion_tokens == 12 and resp.usage.prompt_tokens == stream.finished.prompt_tokens
    assert choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    for got, want, top in zip(lp.token_logprobs, grpc_tokens, lp.top_logprobs, strict=True):
        assert math.isclose(got, want["logprob"], abs_tol=1e-4)
        assert 3 <= len(top) <= 4 and max(top.values()) >= got - 1e-6  # top 3 plus the token itself
    # the raw body is vLLM's own response shape, and carries no attribution when none was asked for
    raw = httpx.post(f"{server.http}/completions", json={"model": _model(server), "prompt": PROMPT, "max_tokens": 3,
                                                         "temperature": 0}, timeout=120).json()
    CompletionResponse.model_validate(raw)
    assert "alignlens" not in json.dumps(raw)


def test_streaming_completion_and_chat(server, sdk):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse

    whole = sdk.completions.create(model=_model(server), prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(sdk.completions.create(model=_model(server), prompt=PROMPT, max_tokens=16, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-2].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "Name one colour."}]
    chat = sdk.chat.completions.create(model=_model(server), messages=messages, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=2)
    grpc_text = "".join(t.text for t in server.grpc.generate(messages, max_tokens=12, temperature=0, detail="none"))
    assert chat.choices[0].message.content == grpc_text and chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    streamed = list(sdk.chat.completions.create(model=_model(server), messages=messages, max_tokens=12,
                                                temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == grpc_text
    raw = httpx.post(f"{server.http}/chat/completions", json={"messages": messages, "max_tokens": 3}, timeout=120)
    ChatCompletionResponse.model_validate(raw.json())


def test_stop_seed_and_batch(server, sdk):
    stopped = sdk.completions.create(model=_model(server), prompt="1, 2, 3, 4,", max_tokens=20, temperature=0,
                                     stop=[" 7"])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text.endswith("6,")
    a, b = (sdk.completions.create(model=_model(server), prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    batch = sdk.completions.create(model=_model(server), prompt=[PROMPT, "1, 2, 3,"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == sdk.completions.create(model=_model(server), prompt=PROMPT, max_tokens=4,
                                                           temperature=0).choices[0].text


def test_echo_scores_the_prompt_like_an_audit(server, sdk):
    """echo + max_tokens 0 (what harnesses send for log-likelihood): the prompt's log-probabilities
    equal the host log-probabilities of a gRPC Audit replaying the same tokens; with attribution,
    each prompt token's attribution equals the Audit's."""
    resp = httpx.post(f"{server.http}/completions", timeout=120, json={
        "prompt": PROMPT + " Paris.", "max_tokens": 0, "echo": True, "logprobs": 1, "return_token_ids": True,
        "alignlens": {"detail": "summary"}}).json()
    choice = resp["choices"][0]
    ids = choice["prompt_token_ids"]
    assert choice["text"] == PROMPT + " Paris." and choice["token_ids"] == [] and resp["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    audit = server.grpc.audit(ids[:1], ids[1:], detail="summary")
    for j, token in enumerate(audit.tokens):
        d = token_to_dict(token)
        assert math.isclose(lp["token_logprobs"][j + 1], d["logprob"], abs_tol=1e-4)
        mine = lp["alignlens"][j + 1]
        assert mine["crystallization_depth"] == d["attribution"]["crystallization_depth"]
        assert max(abs(x - y) for r, s in zip(mine["family_attribution"], d["attribution"]["family_attribution"],
                                              strict=True) for x, y in zip(r, s, strict=True)) < 1e-4
    assert lp["alignlens"][0] is None


def test_attribution_extension_matches_grpc(server, sdk):
    body = {"model": _model(server), "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
            "alignlens": {"detail": "summary"}}
    resp = httpx.post(f"{server.http}/completions", json=body, timeout=120).json()
    lp = resp["choices"][0]["logprobs"]
    grpc_tokens = [token_to_dict(t) for t in server.grpc.generate(PROMPT, max_tokens=6, temperature=0,
                                                                  detail="summary")]
    assert len(lp["alignlens"]) == len(lp["tokens"]) == 6
    for mine, theirs in zip(lp["alignlens"], grpc_tokens, strict=True):
        a = theirs["attribution"]
        assert mine["token_id"] == a["token_id"] and mine["crystallization_depth"] == a["crystallization_depth"]
        assert abs(mine["dla_total"] - a["dla_total"]) < 1e-3
    # streamed chat with attribution: one attribution beside each token's logprobs entry
    chunks = list(sdk.chat.completions.create(model=_model(server), messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=5, temperature=0, stream=True,
                                              extra_body={"alignlens": {"detail": "full"}}))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 5 and all(e.model_extra["alignlens"]["top_directions"] for e in entries)


def test_errors_name_the_parameter_and_the_server_keeps_serving(server, sdk):
    import openai

    cases = [({"temperature": 7}, 400, "temperature"), ({"n": 2}, 400, "n"), ({"max_tokens": 0}, 400, "max_tokens"),
             ({"max_tokens": 5000}, 400, "max_tokens"), ({"logprobs": 50}, 400, "logprobs"),
             ({"model": "gpt-4"}, 404, "model"), ({"top_p": 0}, 400, "top_p"), ({"stop": ["x"] * 20}, 400, "stop"),
             ({"prompt": [10**9]}, 400, "prompt"), ({"suffix": "x"}, 400, "suffix"),
             ({"alignlens": {"detail": "loud"}}, 400, "alignlens.detail"), ({"max_tokens": "a"}, 400, "max_tokens")]
    for extra, status, param in cases:
        body = {"model": _model(server), "prompt": PROMPT, "max_tokens": 4, **extra}
        r = httpx.post(f"{server.http}/completions", json=body, timeout=60)
        assert r.status_code == status, (extra, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == status and err["message"], (extra, err)
    r = httpx.post(f"{server.http}/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=_model(server), messages=[{"role": "robot", "content": "x"}], max_tokens=2)
    assert "role" in str(info.value)
    assert sdk.completions.create(model=_model(server), prompt=PROMPT, max_tokens=2).choices[0].text
    metrics = httpx.get(server.metrics_url).text
    assert 'alignlens_requests_total{code="INVALID_ARGUMENT",rpc="http_completions"}' in metrics
    assert 'alignlens_requests_total{code="OK",rpc="http_chat_completions"}' in metrics


# -- lm-evaluation-harness ------------------------------------------------------------------------------------


def _tasks(folder: Path) -> Path:
    """The two shipped tasks as lm-eval YAML (data paths made absolute for this checkout)."""
    folder.mkdir(parents=True, exist_ok=True)
    common = "test_split: test\ndataset_path: json\n"
    (folder / "mc.yaml").write_text(
        f"task: alignlens_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {DATA / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
        "    higher_is_better: true\n")
    (folder / "gen.yaml").write_text(
        f"task: alignlens_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {DATA / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n"
        "filter_list:\n  - name: number\n    filter:\n      - function: regex\n        regex_pattern: '(\\d+)'\n"
        "        group_select: -1\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    higher_is_better: true\n")
    return folder


def _lm_eval(args: list[str], out: Path, harness: bool = False) -> dict[str, dict[int, dict]]:
    """Run lm-eval (or `alignlens harness`); {task: {doc_id: sample}} from its --log_samples files."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "alignlens.service.cli", "harness"] if harness else [sys.executable, "-m", "lm_eval"]
    proc = subprocess.run([*cmd, *args, "--log_samples", "--output_path", str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = {}
    for path in glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True):
        task = Path(path).name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = {s["doc_id"]: s for s in map(json.loads, Path(path).read_text().splitlines())}
    return samples


def _accuracy(samples: dict[int, dict], metric: str) -> float:
    return sum(float(s[metric]) for s in samples.values()) / len(samples)


@pytest.mark.slow
def test_lm_eval_through_alignlens_equals_hf_backend(server, default_model, tmp_path):
    tasks = _tasks(tmp_path / "tasks")
    common = ["--tasks", "alignlens_mc,alignlens_gen", "--include_path", str(tasks)]
    ours = _lm_eval(["--model", "local-completions", "--model_args",
                     f"model={_model(server)},base_url={server.http}/completions,tokenizer_backend=huggingface,"
                     f"tokenizer={default_model},num_concurrent=4", *common], tmp_path / "ours")
    hf = _lm_eval(["--model", "hf", "--model_args", f"pretrained={default_model},dtype=float32", "--device", "cpu",
                   *common], tmp_path / "hf")
    mc, gen = ours["alignlens_mc"], ours["alignlens_gen"]
    assert len(mc) == 24 and len(gen) == 16
    # neither task is trivial for this model, so equal accuracy is a real check
    assert 0 < _accuracy(mc, "acc") < 1 and 0 < _accuracy(gen, "exact_match") < 1
    assert _accuracy(mc, "acc") == _accuracy(hf["alignlens_mc"], "acc")
    assert _accuracy(gen, "exact_match") == _accuracy(hf["alignlens_gen"], "exact_match")
    for doc, s in mc.items():  # per choice, the log-likelihoods agree
        for (ll, _), (ll_hf, _) in zip(s["filtered_resps"], hf["alignlens_mc"][doc]["filtered_resps"], strict=True):
            assert abs(float(ll) - float(ll_hf)) < 1e-3
    assert all(gen[d]["resps"] == hf["alignlens_gen"][d]["resps"] for d in gen)
    # chat: local-chat-completions with the chat template, against hf with the same template
    chat = _lm_eval(["--model", "local-chat-completions", "--model_args",
                     f"model={_model(server)},base_url={server.http}/chat/completions,num_concurrent=4",
                     "--apply_chat_template", "--tasks", "alignlens_gen", "--include_path", str(tasks)], tmp_path / "chat")
    hf_chat = _lm_eval(["--model", "hf", "--model_args", f"pretrained={default_model},dtype=float32", "--device",
                        "cpu", "--apply_chat_template", "--tasks", "alignlens_gen", "--include_path", str(tasks)],
                       tmp_path / "hf-chat")
    assert all(chat["alignlens_gen"][d]["resps"] == hf_chat["alignlens_gen"][d]["resps"] for d in gen)
    assert _accuracy(chat["alignlens_gen"], "exact_match") == _accuracy(hf_chat["alignlens_gen"], "exact_match")


@pytest.mark.slow
def test_harness_attribution_and_report(server, default_model, tmp_path):
    tasks = _tasks(tmp_path / "tasks")
    out = tmp_path / "run"
    samples = _lm_eval(["--model", "alignlens", "--model_args",
                        f"model={_model(server)},base_url={server.http}/completions,tokenizer={default_model},"
                        "num_concurrent=4", "--tasks", "alignlens_mc,alignlens_gen", "--include_path", str(tasks)],
                       out, harness=True)
    assert 0 < _accuracy(samples["alignlens_mc"], "acc") < 1  # the extra fields change no answer
    records = [json.loads(line) for line in (out / "alignlens-attributions.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "loglikelihood" for r in records) == 24 * 4
    assert sum(r["kind"] == "generate" for r in records) == 16
    assert all(t["attribution"]["token_id"] == t["token_id"] for r in records for t in r["tokens"])
    png = tmp_path / "report.png"
    report = subprocess.run([sys.executable, "-m", "alignlens.service.cli", "harness-report", "--samples", str(out),
                             "--attributions", str(out / "alignlens-attributions.jsonl"), "--png", str(png),
                             "--json", str(tmp_path / "report.json")], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "| alignlens_mc | correct |" in report.stdout and "| alignlens_mc | incorrect |" in report.stdout
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["missing"] == 0 and summary["samples"] == 24 + 16
    n_mc = summary["summary"]["alignlens_mc"]
    assert n_mc["correct"]["n"] + n_mc["incorrect"]["n"] == 24
    from PIL import Image

    with Image.open(png) as img:
        assert img.size[0] > 300 and len(set(img.convert("RGB").getdata())) > 5
