"""`alignlens probe collect|train|eval` end to end on a tiny random Llama that borrows the default
model's tokenizer (skipped when that checkpoint has not been fetched)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignlens.probe.artifact import load_artifact, read_metadata
from alignlens.service.modelstore import DEFAULT_MODEL_NAME, MARKER_NAME, alignlens_home

DEFAULT = alignlens_home() / "models" / DEFAULT_MODEL_NAME  # where `alignlens model fetch` puts it


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    if not (DEFAULT / MARKER_NAME).is_file():
        pytest.skip("default model not fetched (alignlens model fetch): its tokenizer is borrowed here")
    out = tmp_path_factory.mktemp("tiny-host")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (DEFAULT / name).is_file():
            shutil.copy(DEFAULT / name, out / name)
    return out


def test_collect_train_eval(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from alignlens.service.cli.main import main

    monkeypatch.setenv("ALIGNLENS_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "chat": i % 2 == 0})
                                 for i, p in enumerate(["Hello there", "def add(", "List three colors", "2 + 2 ="])))
    trace = tmp_path / "t.safetensors"
    assert main(["probe", "collect", "--engine", "replica", "--model", str(tiny_checkpoint), "--prompts", str(prompts),
                 "--split", "all", "--max-tokens", "6", "--label-rows", "2", "--k", "8", "--out", str(trace)]) == 0
    artifact = tmp_path / "probe.safetensors"
    assert main(["probe", "train", "--model", str(tiny_checkpoint), "--data", str(trace), "--out", str(artifact),
                 "--steps", "10", "--k", "8", "--width", "16", "--encoder-layers", "1", "--top-k", "8"]) == 0
    act_only = tmp_path / "act.safetensors"
    assert main(["probe", "train", "--model", str(tiny_checkpoint), "--data", str(trace), "--out", str(act_only),
                 "--steps", "10", "--k", "8", "--width", "16", "--encoder-layers", "1", "--top-k", "8",
                 "--no-alignment-features"]) == 0
    capsys.readouterr()
    assert main(["probe", "eval", "--probe", str(artifact), "--model", str(tiny_checkpoint),
                 "--data", f"tiny={trace}", "--ablation-per-prompt", "2", "--tuned-lens-data", str(trace),
                 "--tuned-lens-steps", "5", "--activation-only", str(act_only), "--boot", "20",
                 "--json", "--write"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("readout_top1_agreement", "depth_kl", "logit_lens_kl", "depth_top1", "logit_lens_top1",
                "tuned_lens_kl", "tuned_lens_top1", "activation_only_kl", "activation_only_top1",
                "faithfulness_spearman", "faithfulness_top_vs_random", "null_faithfulness_spearman",
                "null_faithfulness_top_vs_random", "tokens", "by_set", "headline"):
        assert key in result, key
    assert len(result["depth_kl"]) == 4 and len(result["tuned_lens_kl"]) == 4 and result["ablation_tokens"] == 8
    for prefix in ("tuned_lens", "activation_only"):  # paired differences: the probe's KL minus the baseline's
        diff, ci = result[f"depth_kl_minus_{prefix}"], result[f"depth_kl_minus_{prefix}_ci"]
        assert len(diff) == len(ci) == 4 and all(lo <= hi for lo, hi in ci)
        assert diff[1] == pytest.approx(result["depth_kl"][1] - result[f"{prefix}_kl"][1], abs=1e-9)
    for scorer in ("family_attribution", "family_importance", "mean_profile", "mean_profile_uncertainty",
                   "host_linearized", "dla", "untrained_head"):
        for metric in ("per_token_spearman", "token_resolved_spearman", "share_centered_spearman", "top_pair_hit",
                       "top_vs_random"):
            m = result["headline"]["faithfulness"][scorer][metric]
            assert m["ci"][0] <= m["ci"][1] and -1 <= m["value"] <= max(1.0, m["value"] * (metric == "top_vs_random"))
    # a token-independent profile has no share-centered signal (its centred shares are all 0)
    assert result["headline"]["faithfulness"]["mean_profile"]["share_centered_spearman"]["value"] == 0.0
    # probe-guided refinement at the budgets below 3L = 9 (k = 3): each proposer's three target
    # metrics; three exact ablations per token give even the constant profile token-specific shares
    refine = result["refinement"]
    assert list(refine) == ["3"] and set(refine["3"]) == {"family_attribution", "mean_profile", "host_linearized"}
    head = result["headline"]["faithfulness"]
    hit = head["refined_family_attribution_k3"]["top_pair_hit"]["value"]
    assert refine["3"]["family_attribution"]["top_pair_hit"] == hit
    assert refine["3"]["mean_profile"]["share_centered_spearman"] > 0
    # paired: the probe's refinement minus the same budget spent by each baseline, per token
    paired = result["refinement_paired"]["3"]["mean_profile"]["top_pair_hit"]
    assert paired["ci"][0] <= paired["ci"][1] and paired["value"] == pytest.approx(
        refine["3"]["family_attribution"]["top_pair_hit"] - refine["3"]["mean_profile"]["top_pair_hit"], abs=1e-9)
    assert read_metadata(artifact)["evaluation"]["tokens"] == result["tokens"]
    # more labels, then `train --head-of`: the evaluation reuses the depth curves (same trunk and
    # readout) and measures faithfulness anew; a probe with another trunk is refused
    assert main(["probe", "label", "--model", str(tiny_checkpoint), "--data", str(trace), "--label-rows", "4",
                 "--no-gradients", "--k", "8"]) == 0
    head = tmp_path / "head.safetensors"
    assert main(["probe", "train", "--model", str(tiny_checkpoint), "--data", str(trace), "--out", str(head),
                 "--head-of", str(artifact), "--steps", "20", "--centred-weight", "1"]) == 0
    meta = read_metadata(head)
    assert meta["data"]["ablation_labelled_tokens"] == 16
    assert meta["head_retrained"]["from_ablation_labelled_tokens"] == 8
    capsys.readouterr()
    assert main(["probe", "eval", "--probe", str(head), "--model", str(tiny_checkpoint), "--data", f"tiny={trace}",
                 "--ablation-per-prompt", "2", "--boot", "20", "--depth-from", str(artifact), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["depth_kl"] == result["depth_kl"] and again["tuned_lens_kl"] == result["tuned_lens_kl"]
    assert again["depth_reused_from"] == str(artifact)
    assert meta["data"]["train_mean_abs_drop"] != read_metadata(artifact)["data"]["train_mean_abs_drop"]  # the new null
    with pytest.raises(SystemExit, match="trunk or readout differs"):
        main(["probe", "eval", "--probe", str(head), "--model", str(tiny_checkpoint), "--data", f"tiny={trace}",
              "--boot", "20", "--depth-from", str(act_only), "--json"])
    with pytest.raises(ValueError, match="token counts differ"):  # depth curves of other tokens are not reused
        main(["probe", "eval", "--probe", str(head), "--model", str(tiny_checkpoint), "--data", f"tiny={trace}",
              "--ablation-per-prompt", "2", "--boot", "20", "--tokens-per-set", "5", "--depth-from", str(artifact),
              "--json"])
    # `train --readout-of`: a tuned lens under the readout, trunk and head untouched, so an evaluation
    # measures the same faithfulness; `--lens-from` reuses that lens for another probe (the
    # activation-only twin); the flags that retrain different parts are refused together
    readout = tmp_path / "readout.safetensors"
    assert main(["probe", "train", "--model", str(tiny_checkpoint), "--data", str(trace), "--out", str(readout),
                 "--readout-of", str(head), "--lens-steps", "5", "--steps", "10"]) == 0
    meta = read_metadata(readout)
    assert meta["probe_config"]["tuned_lens"] and meta["readout_retrained"]["fit"]["steps_done"] == 10
    assert meta["readout_retrained"]["fit"]["tuned_lens"]["config"]["steps"] == 5
    twin = tmp_path / "twin.safetensors"
    assert main(["probe", "train", "--model", str(tiny_checkpoint), "--data", str(trace), "--out", str(twin),
                 "--readout-of", str(act_only), "--lens-from", str(readout), "--steps", "10"]) == 0
    assert read_metadata(twin)["readout_retrained"]["fit"]["tuned_lens"]["from"] == str(readout)
    loaded_readout, _ = load_artifact(readout)
    loaded_twin, _ = load_artifact(twin)
    assert torch.equal(loaded_twin.lens.weight, loaded_readout.lens.weight)
    from safetensors import safe_open
    with safe_open(str(readout), "pt") as f:  # the translators are stored as float16, the rest float32
        assert f.get_tensor("lens.weight").dtype == torch.float16 and f.get_tensor("out.weight").dtype == torch.float32
    assert loaded_readout.lens.weight.dtype == torch.float32
    capsys.readouterr()
    assert main(["probe", "eval", "--probe", str(readout), "--model", str(tiny_checkpoint), "--data", f"tiny={trace}",
                 "--ablation-per-prompt", "2", "--boot", "20", "--activation-only", str(twin), "--json"]) == 0
    third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for scorer in ("family_attribution", "family_importance"):
        assert third["headline"]["faithfulness"][scorer] == again["headline"]["faithfulness"][scorer]
    assert third["depth_kl"] != again["depth_kl"]
    with pytest.raises(SystemExit, match="give one"):
        main(["probe", "train", "--model", str(tiny_checkpoint), "--data", str(trace), "--out", str(readout),
              "--readout-of", str(head), "--head-of", str(head)])
    with pytest.raises(SystemExit, match="only apply with --readout-of"):  # not silently ignored
        main(["probe", "train", "--model", str(tiny_checkpoint), "--data", str(trace), "--out", str(readout),
              "--tuned-lens", "--lens-steps", "50"])
    with pytest.raises(SystemExit, match="give one"):
        main(["probe", "train", "--model", str(tiny_checkpoint), "--data", str(trace), "--out", str(twin),
              "--readout-of", str(act_only), "--lens-from", str(readout), "--lens-steps", "5"])
