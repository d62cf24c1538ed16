"""The HTML report renders in a real browser (Debian's headless Chromium; slow).

A page drawn from real attribution (a tiny random Llama served with an untrained probe: the
numbers are meaningless, every element is produced as with a trained one) is opened with networking
off; the screenshot must not be blank and the browser's own DOM must hold every part of the page.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from alignlens.service.client import AttributionClient
from alignlens.service.report import Section, render_html
from alignlens.service.server.convert import token_to_dict
from tests.support.servers import started
from tests.support.tiny import make_probe_artifact

pytestmark = pytest.mark.slow


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("no Chromium: `make test-slow` installs Debian's chromium (deploy/scripts/install-tools.sh)")


def test_report_renders_in_headless_chromium(tiny_llama, tmp_path):
    from PIL import Image

    probe = make_probe_artifact(tiny_llama, tmp_path / "tiny.safetensors")
    srv = started(["--model", str(tiny_llama), "--probe", str(probe), "--enforce-eager", "--max-model-len", "512"],
                  tmp_path / "server.log")
    try:
        with AttributionClient(srv.target, timeout_s=120) as client:
            stream = client.generate("The capital of France is", max_tokens=12, detail="full", ignore_eos=True)
            tokens = [token_to_dict(t) for t in stream]
            info = client.model_info()
            # a CAUSAL Audit of two of them, 4 pairs each: the engine-checked panel, grey where not ablated
            audit = client.audit(list(stream.finished.prompt_token_ids), [t["token_id"] for t in tokens],
                                 detail="causal", causal_indices=[0, 5], causal_pairs=4)
            audited = [token_to_dict(t) for t in audit.tokens]
    finally:
        srv.stop()
    page = tmp_path / "report.html"
    page.write_text(render_html([Section("generate", "The capital of France is", tokens),
                                 Section("audit", "The capital of France is", audited)], title="alignlens report",
                                model=info.name, n_layers=info.n_layers))
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network at view time
               f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    out = subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file(), out.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    colours = len(image.getcolors(maxcolors=1 << 24))
    assert colours > 50, f"screenshot looks blank ({colours} colours)"
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    for element in ('id="text-0"', 'id="depth-heatmap-svg"', 'id="family-shares-svg"', 'id="dla-svg"'):
        assert element in dom, element
    assert dom.count('class="tok"') == 24
    # the causal panel: only the audit's two CAUSAL tokens, 3L - 4 pairs of each not ablated
    assert dom.count('id="causal-svg"') == 1 and dom.count("rank corr.") == 2
    assert dom.count('class="unmeasured"') == 2 * (3 * info.n_layers - 4)
