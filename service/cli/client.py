"""Client commands: `alignlens generate`, `alignlens audit`, `alignlens info` (service/client.py).

`generate` streams one line per token: its text, logprob, crystallization depth, the weight
family that carried most of the decision (server.convert.dominant_family), the (block, family) the
probe attributes most to (server.convert.top_pair: the block named, with its predicted effect in
nats) and the largest direct-logit component (server.convert.top_dla); `--json` prints
JSON lines instead (one per token, then one `finished` object).

`audit --in logs.jsonl --out out.jsonl` reads one logged generation per line,
    {"id": any (optional), "prompt": text | [token ids] | [{"role", "content"}, ...],
     "completion": text | [token ids]}
and writes one line per input, in order: {"id", "prompt_tokens", "tokens": [...]} or
{"id", "error": {"code", "message"}}. Token ids replay exactly; text is re-tokenized.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

_TARGET_HELP = "server address host:port [env ALIGNLENS_TARGET; default localhost:50051]"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("ALIGNLENS_TARGET", "localhost:50051"), help=_TARGET_HELP)
    p.add_argument("--timeout-seconds", type=float, default=None, help="deadline of each call (default: none)")
    p.add_argument("--wait-seconds", type=float, default=300.0,
                   help="wait this long for a starting server to become SERVING (0: do not wait)")


def _connect(args: argparse.Namespace):
    """A client, after waiting for the server's health to say SERVING (it may be starting)."""
    from alignlens.service.client import AttributionClient

    client = AttributionClient(args.target, timeout_s=args.timeout_seconds)
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
    _common(g)
    g.set_defaults(func=run_generate)

    a = sub.add_parser("audit", help="attribute logged generations (JSONL in, JSONL out) through a server")
    a.add_argument("--in", dest="inp", required=True, help="JSONL of {id?, prompt, completion}")
    a.add_argument("--out", required=True, help="output JSONL, one line per input line")
    a.add_argument("--detail", choices=["unspecified", "none", "summary", "full", "causal"], default="unspecified",
                   help="attribution detail")
    a.add_argument("--causal", action="store_true",
                   help="also compute each token's exact family_drop on the engine (detail causal; completions of "
                        "at most 16 tokens, or name them per line with \"causal_indices\")")
    a.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    _common(a)
    a.set_defaults(func=run_audit)

    i = sub.add_parser("info", help="print the server's model and probe facts as JSON")
    _common(i)
    i.set_defaults(func=run_info)


def _to_dict(msg) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _rpc_error(err) -> dict:
    return {"code": err.code().name, "message": err.details()}


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
    with _connect(args) as client:
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


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_audit(args: argparse.Namespace) -> int:
    import grpc
    from tqdm import tqdm

    from alignlens.service.server.convert import token_to_dict

    rows = _read_jsonl(args.inp)
    with _connect(args) as client:
        def one(item: tuple[int, dict]) -> dict:
            n, row = item
            rid = row.get("id", n)
            try:
                resp = client.audit(row["prompt"], row["completion"], detail="causal" if args.causal else args.detail,
                                    request_id=str(rid)[:128], causal_indices=row.get("causal_indices", ()))
            except grpc.RpcError as err:
                return {"id": rid, "error": _rpc_error(err)}
            return {"id": rid, "prompt_tokens": resp.prompt_tokens, "tokens": [token_to_dict(t) for t in resp.tokens]}

        failed = 0
        with ThreadPoolExecutor(max(1, args.concurrency)) as pool, open(args.out, "w") as out, \
                tqdm(total=len(rows), unit="gen", desc="audit", disable=None) as bar:
            for result in pool.map(one, enumerate(rows)):  # map keeps input order
                failed += "error" in result
                out.write(json.dumps(result, ensure_ascii=False) + "\n")
                bar.update(1)
    if failed:
        print(f"alignlens audit: {failed} of {len(rows)} lines failed (see 'error' in {args.out})", file=sys.stderr)
    return 1 if failed else 0


def run_info(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        print(json.dumps(_to_dict(client.model_info()), indent=2))
    return 0
