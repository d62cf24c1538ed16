"""Client commands: `alignlens generate`, `alignlens audit`, `alignlens info` (service/client.py).

`generate` streams one line per token: its text, logprob, crystallization depth, the weight
family that carried most of the decision (server.convert.dominant_family), the (block, family) the
probe attributes most to (server.convert.top_pair: the block named, with its predicted effect in
nats) and the largest direct-logit component (server.convert.top_dla); `--json` prints
JSON lines instead (one per token, then one `finished` object).

`audit --in logs.jsonl --out out.jsonl` reads one logged generation per line,
    {"id": any (optional), "prompt": text | [token ids] | [{"role", "content"}, ...],
     "completion": text | [token ids], "causal_indices": [ints] (optional)}
Token ids replay exactly; text is re-tokenized. It writes, as each finishes, one record per input
line (1-based `line`, `input_sha` = a digest of that line) to `--out`,
    {"line", "input_sha", "id", "prompt_tokens", "tokens": [...]},
and for a line that cannot be attributed (not JSON, missing fields, or a server answer that the
line is wrong: INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE) one record with the reason to
`--errors` (default OUT.errors.jsonl). Transient failures (UNAVAILABLE, RESOURCE_EXHAUSTED, ...)
are retried 3 times, then left out. It can be killed at any point: a re-run of the same command
skips every line already in either file (a record cut off by the kill is dropped first) and
finishes the rest, so each input line ends up exactly once. Exit status 0 when every line was
attributed, 1 when some were errors or left for a re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_TARGET_HELP = "server address host:port [env ALIGNLENS_TARGET; default localhost:50051]"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("ALIGNLENS_TARGET", "localhost:50051"), help=_TARGET_HELP)
    p.add_argument("--timeout-seconds", type=float, default=None, help="deadline of each call (default: none)")
    p.add_argument("--wait-seconds", type=float, default=300.0,
                   help="wait this long for a starting server to become SERVING (0: do not wait)")
    env = os.environ.get
    t = p.add_argument_group("security (a server started with --tls-* / --auth-token-file)")
    t.add_argument("--tls", action="store_true", default=bool(env("ALIGNLENS_TLS")),
                   help="connect with TLS, verifying the server against the system's CAs [env ALIGNLENS_TLS]")
    t.add_argument("--tls-ca", default=env("ALIGNLENS_TLS_CA"),
                   help="PEM CA bundle to verify the server with (implies --tls) [env ALIGNLENS_TLS_CA]")
    t.add_argument("--tls-cert", default=env("ALIGNLENS_TLS_CERT"),
                   help="PEM client certificate, for mutual TLS [env ALIGNLENS_TLS_CERT]")
    t.add_argument("--tls-key", default=env("ALIGNLENS_TLS_KEY"),
                   help="PEM private key of --tls-cert [env ALIGNLENS_TLS_KEY]")
    t.add_argument("--tls-server-name", default=env("ALIGNLENS_TLS_SERVER_NAME"),
                   help="name the server's certificate carries, if not the target's host")
    t.add_argument("--token-file", default=env("ALIGNLENS_TOKEN_FILE"),
                   help="file holding the bearer token (else the variable ALIGNLENS_TOKEN; never a flag value)")


def _connect(args: argparse.Namespace):
    """A client, after waiting for the server's health to say SERVING (it may be starting)."""
    from alignlens.service.client import AttributionClient

    token = os.environ.get("ALIGNLENS_TOKEN") or None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise SystemExit(f"alignlens: --token-file {args.token_file}: {exc.strerror}") from None
    try:
        client = AttributionClient(args.target, timeout_s=args.timeout_seconds, tls=args.tls, ca_file=args.tls_ca,
                                   cert_file=args.tls_cert, key_file=args.tls_key,
                                   server_name=args.tls_server_name, token=token)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"alignlens: {exc}") from None
    if args.wait_seconds > 0 and client.health() != "SERVING":
        print(f"waiting up to {args.wait_seconds:.0f} s for {args.target} to be ready ...", file=sys.stderr)
        try:
            client.wait_ready(args.wait_seconds)
        except TimeoutError as exc:
            client.close()
            raise SystemExit(f"alignlens: {exc}") from None
    return client


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="stream a completion with each token's attribution from a server")
    g.add_argument("prompt", help="prompt text")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user turn (model's chat template)")
    g.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (server default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--detail", choices=["unspecified", "none", "summary", "full"], default="unspecified",
                   help="attribution detail (default: summary when the server has a probe)")
    g.add_argument("--intervene", action="append", default=[], metavar="BLOCK:FAMILY[:DIRS[:SCALE[:START[:END]]]]",
                   help="scale a (block, family)'s top singular directions in this request's forward (repeatable): "
                        "DIRS comma-separated indices or empty for all k, SCALE default 0 (ablate), START/END "
                        "sequence positions; e.g. 24:mlp_in ablates block 24's mlp_in top-k")
    g.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    g.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page of the attribution")
    g.add_argument("--png", metavar="FILE", help="also write a static figure (depth heatmap + family shares)")
    _common(g)
    g.set_defaults(func=run_generate)

    a = sub.add_parser("audit", help="attribute logged generations (JSONL in, JSONL out) through a server")
    a.add_argument("--in", dest="inp", required=True, help="JSONL of {id?, prompt, completion}")
    a.add_argument("--out", required=True, help="output JSONL: one record per attributed input line, keyed by "
                                                "\"line\"; an existing file is resumed")
    a.add_argument("--errors", default=None, help="JSONL of the input lines that cannot be attributed, with the "
                                                  "reason (default: OUT.errors.jsonl)")
    a.add_argument("--detail", choices=["unspecified", "none", "summary", "full", "causal"], default="unspecified",
                   help="attribution detail")
    a.add_argument("--causal", action="store_true",
                   help="also compute each token's exact family_drop on the engine (detail causal; completions of "
                        "at most 16 tokens, or name them per line with \"causal_indices\")")
    a.add_argument("--causal-pairs", type=int, default=0, metavar="K",
                   help="with --causal: ablate only the K (block, family) pairs the probe ranks first per token "
                        "(K + 1 engine requests instead of 3L + 1; family_refined combines them with the probe's "
                        "prediction); 0 = all 3L")
    a.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    a.add_argument("--html", metavar="FILE", help="also write one self-contained HTML page with a section per "
                                                  "attributed line (everything in --out, in line order)")
    a.add_argument("--png", metavar="FILE", help="also write a static figure per attributed line: FILE with the "
                                                 "line number before its suffix (out.png -> out-3.png)")
    _common(a)
    a.set_defaults(func=run_audit)

    i = sub.add_parser("info", help="print the server's model and probe facts as JSON")
    _common(i)
    i.set_defaults(func=run_info)


def _to_dict(msg) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def run_generate(args: argparse.Namespace) -> int:
    import grpc

    from alignlens.service.client import parse_intervention
    from alignlens.service.server.convert import (
        attribution_from_proto,
        dominant_family,
        token_to_dict,
        top_dla,
        top_pair,
    )

    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    client_info = None
    with _connect(args) as client:
        if args.html:
            client_info = client.model_info()
        try:
            interventions = [parse_intervention(spec) for spec in args.intervene]
        except ValueError as exc:
            raise SystemExit(f"alignlens generate: --intervene {exc}") from None
        stream = client.generate(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                                 detail=args.detail, interventions=interventions)
        try:
            if not args.json:
                print(f"{'#':>4}  {'token':<18} {'logprob':>8}  {'cryst':>5}  {'dominant family':<20} "
                      f"{'top (block, family)':<24} top direct logit", flush=True)
            for token in stream:
                row = token_to_dict(token)
                if args.json:
                    print(json.dumps({"request_id": stream.request_id, **row}), flush=True)
                    continue
                lp = f"{row['logprob']:8.3f}" if row["logprob"] is not None else f"{'-':>8}"
                if token.HasField("attribution"):
                    attr = attribution_from_proto(token.attribution)
                    family, share = dominant_family(attr)
                    cryst = f"{attr.crystallization_depth:5d}"
                    fam = f"{family} ({share:.2f})" if share > 0 else "none supported it"
                    pair, dla = top_pair(attr), top_dla(attr)
                    pair_s = f"block {pair[0]} {pair[1]} {pair[2]:.2f} nats" if pair else "-"
                    dla_s = f"{dla[0]} {dla[1]:+.2f}" if dla else "-"
                else:
                    cryst, fam, pair_s, dla_s = f"{'-':>5}", "-", "-", "-"
                print(f"{row['index']:4d}  {json.dumps(row['text'], ensure_ascii=False):<18} {lp}  {cryst}  {fam:<20} "
                      f"{pair_s:<24} {dla_s}", flush=True)
        except grpc.RpcError as err:
            print(f"alignlens generate: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            stream.cancel()
            return 130
    fin = stream.finished
    if args.html or args.png:
        from alignlens.service.report import Section

        section = Section(title="completion" + (f" (request {stream.request_id})" if stream.request_id else ""),
                          prompt=args.prompt,
                          tokens=[token_to_dict(t) for t in stream.tokens])
        _write_pictures(args, [(None, section)], info=client_info)
    if args.json:
        print(json.dumps({"request_id": stream.request_id, "finished": _to_dict(fin)}))
        return 0
    from alignlens.service.client import pb2

    n = fin.completion_tokens
    rate = n / max(fin.e2e_seconds - fin.time_to_first_token_seconds, 1e-9) if n > 1 else 0.0
    print(f"\n{args.prompt}{stream.text}\n")
    if stream.tokens and not any(t.HasField("attribution") for t in stream.tokens) and args.detail == "unspecified":
        print("(no attribution: the server has no probe loaded; `alignlens info` says why)", file=sys.stderr)
    print(f"-- {n} tokens, {pb2.FinishReason.Name(fin.finish_reason).removeprefix('FINISH_REASON_').lower()}; "
          f"time to first token {fin.time_to_first_token_seconds * 1000:.0f} ms, {rate:.1f} tokens/s after it")
    return 0


def _write_pictures(args: argparse.Namespace, sections: list, info=None) -> None:
    """--html (one page, every section) and --png (one figure per section) for generate / audit."""
    from alignlens.service.report import render_html, render_png

    if args.html:
        title = f"alignlens audit of {args.inp}" if hasattr(args, "inp") else "alignlens generate"
        page = render_html([s for _, s in sections], title=title, model=info.name if info is not None else "",
                           n_layers=info.n_layers if info is not None else None)
        Path(args.html).write_text(page, encoding="utf-8")
        print(f"alignlens: wrote {args.html}", file=sys.stderr)
    if args.png:
        for line, section in sections:
            if not section.attributed:
                continue
            path = Path(args.png)
            if line is not None:
                path = path.with_name(f"{path.stem}-{line}{path.suffix}")
            render_png(section, str(path))
            print(f"alignlens: wrote {path}", file=sys.stderr)


# A server's answer that says the line itself is wrong: written to the errors file, not retried.
_CLIENT_MISTAKES = ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE")
_RETRY_DELAYS_S = (1.0, 4.0, 15.0)


def _line_key(raw: bytes) -> str:
    """A short digest of an input line, so a re-run can tell that the input file changed."""
    import hashlib

    return hashlib.sha256(raw.rstrip(b"\r\n")).hexdigest()[:16]


def _finished_lines(path: Path) -> dict[int, str]:
    """{input line: its digest} of the records already in `path` (JSONL); a last line cut off by a
    kill is removed from the file first."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    done = {}
    for n, line in enumerate(data.splitlines(), 1):
        try:
            record = json.loads(line)
            done[int(record["line"])] = record["input_sha"]
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"alignlens audit: {path} line {n} is not a record this command wrote; "
                             "remove the file or name another --out / --errors") from None
    return done


def _parse_line(raw: bytes) -> dict:
    """One input line -> {prompt, completion, id?, causal_indices?}; ValueError says what is wrong."""
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "completion"):
        if key not in row:
            raise ValueError(f"missing {key!r}")
    prompt, completion = row["prompt"], row["completion"]
    is_ids = lambda v: isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)  # noqa: E731
    is_chat = (isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt))
    if not (isinstance(prompt, str) or is_ids(prompt) or is_chat):
        raise ValueError("'prompt' must be text, a list of token ids or a list of {role, content} messages")
    if not (isinstance(completion, str) or is_ids(completion)):
        raise ValueError("'completion' must be text or a list of token ids")
    if "causal_indices" in row and not is_ids(row["causal_indices"]):
        raise ValueError("'causal_indices' must be a list of integers")
    return row


def run_audit(args: argparse.Namespace) -> int:
    """Resumable: records are keyed by input line; a re-run of the same command finishes the rest."""
    import time
    from concurrent.futures import as_completed

    import grpc
    from tqdm import tqdm

    from alignlens.service.server.convert import token_to_dict

    if args.causal_pairs < 0:
        raise SystemExit(f"alignlens audit: --causal-pairs must be >= 0, not {args.causal_pairs}")
    detail = "causal" if args.causal else args.detail
    if args.causal_pairs and detail != "causal":
        raise SystemExit("alignlens audit: --causal-pairs needs --causal (or --detail causal)")
    settings = {"detail": detail, "causal_pairs": args.causal_pairs}  # kept in every record
    out_path = Path(args.out)
    err_path = Path(args.errors or f"{args.out}.errors.jsonl")
    done = {**_finished_lines(out_path), **_finished_lines(err_path)}
    if out_path.exists():
        for line in out_path.read_text().splitlines():
            try:
                earlier = {k: v for k, v in json.loads(line).items() if k in settings}
            except (ValueError, AttributeError):
                continue
            if earlier and earlier != settings:
                raise SystemExit(f"alignlens audit: {args.out} was made with {earlier}, not {settings}; resume with "
                                 "the same options or use another --out")
    todo: list[tuple[int, str, dict]] = []
    malformed: list[dict] = []
    with open(args.inp, "rb") as fh:
        lines = list(fh)
    for n, raw in enumerate(lines, 1):
        key = _line_key(raw)
        if n in done:
            if done[n] != key:
                raise SystemExit(f"alignlens audit: {args.inp} line {n} is not the line {args.out} was made from; "
                                 "use the same input or another --out")
            continue
        if not raw.strip():
            continue
        try:
            todo.append((n, key, _parse_line(raw)))
        except ValueError as exc:
            malformed.append({"line": n, "input_sha": key, "reason": str(exc),
                              "input": raw.decode(errors="replace").rstrip("\r\n")[:200]})
    if done:
        print(f"alignlens audit: resuming: {len(done)} lines already done, {len(todo) + len(malformed)} to go",
              file=sys.stderr)

    def one(item: tuple[int, str, dict]) -> tuple[str, dict]:
        n, key, row = item
        rid = row.get("id", n)
        for attempt in range(len(_RETRY_DELAYS_S) + 1):
            try:
                resp = client.audit(row["prompt"], row["completion"], detail=detail, request_id=str(rid)[:128],
                                    causal_indices=row.get("causal_indices", ()), causal_pairs=args.causal_pairs)
            except grpc.RpcError as err:
                code = err.code().name
                if code in _CLIENT_MISTAKES:
                    return "error", {"line": n, "input_sha": key, "id": rid, "reason": f"{code}: {err.details()}"}
                if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or attempt == len(_RETRY_DELAYS_S):
                    return "retry", {"line": n, "reason": f"{code}: {err.details()}"}
                time.sleep(_RETRY_DELAYS_S[attempt])
                continue
            return "ok", {"line": n, "input_sha": key, "id": rid, **settings, "prompt_tokens": resp.prompt_tokens,
                          "tokens": [token_to_dict(t) for t in resp.tokens]}
        raise AssertionError("unreachable")

    counts = {"ok": 0, "error": len(malformed), "retry": 0}
    last_retry = None
    with _connect(args) as client, open(out_path, "a") as out, open(err_path, "a") as errors, \
            ThreadPoolExecutor(max(1, args.concurrency)) as pool, \
            tqdm(total=len(todo), unit="gen", desc="audit", disable=None) as bar:
        for record in malformed:
            errors.write(json.dumps(record, ensure_ascii=False) + "\n")
        errors.flush()
        futures = [pool.submit(one, item) for item in todo]
        try:
            for future in as_completed(futures):  # written as they finish: a kill loses nothing finished
                kind, record = future.result()
                counts[kind] += 1
                if kind == "retry":
                    last_retry = record
                else:
                    fh = out if kind == "ok" else errors
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                    fh.flush()
                bar.update(1)
        except KeyboardInterrupt:
            for future in futures:
                future.cancel()
            print("\nalignlens audit: interrupted; run the same command again to finish", file=sys.stderr)
            return 130
    if args.html or args.png:
        _audit_pictures(args, lines, out_path)
    ok_total = sum(1 for _ in open(out_path))
    err_total = sum(1 for _ in open(err_path))
    print(f"alignlens audit: {ok_total} lines attributed in {out_path} ({counts['ok']} by this run), {err_total} "
          f"could not be, with the reason in {err_path}" + (
              f"; {counts['retry']} not done (last: {last_retry['reason']}): run the same command again to retry them"
              if counts["retry"] else ""), file=sys.stderr)
    return 1 if counts["retry"] or err_total else 0


def _audit_pictures(args: argparse.Namespace, lines: list[bytes], out_path: Path) -> None:
    """Pictures of every attributed line in --out (this run's and earlier runs'), in line order."""
    from alignlens.service.report import Section

    records = sorted((json.loads(r) for r in out_path.read_text().splitlines()), key=lambda r: r["line"])
    sections = []
    for r in records:
        row = json.loads(lines[r["line"] - 1])
        prompt = row["prompt"] if isinstance(row["prompt"], str) else json.dumps(row["prompt"], ensure_ascii=False)
        sections.append((r["line"], Section(title=f"line {r['line']} (id {r['id']})", prompt=prompt,
                                            tokens=r["tokens"])))
    if sections:
        _write_pictures(args, sections)


def run_info(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        print(json.dumps(_to_dict(client.model_info()), indent=2))
    return 0
