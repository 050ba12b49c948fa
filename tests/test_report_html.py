"""The static HTML report: every link resolves, and a real headless browser renders every figure."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from _report_store import build_store
from click.testing import CliRunner

from fpstore.cli.main import cli
from fpstore.errors import StoreError
from fpstore.report.embed import EmbedConfig
from fpstore.report.html import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.headings = [], [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    store = build_store(root / "store")
    return build_report(
        store, "mil-run", root / "out", n_heatmaps=2, n_boot=200, embed=EmbedConfig(seed=0)
    )


def _parsed(report):
    parser = _Links()
    parser.feed(report.index.read_text())
    return parser


def test_report_has_every_section_and_its_links_resolve(report):
    page = _parsed(report)
    for heading in ("Cohort", "Compare", "ROC curves", "Heatmaps", "Fingerprint map"):
        assert any(h.startswith(heading) for h in page.headings), heading
    # roc + 2 heatmaps + 3 maps + montages (one per selected cluster)
    assert len(page.images) == 1 + 2 + 3 + len(report.embedding.clusters)
    assert len(report.embedding.clusters) >= 2
    for target in page.images + page.links:
        assert not re.match(r"^[a-z]+:", target) and not target.startswith("/"), target
        assert (report.out / target).is_file(), target
    assert sum(t.endswith(".geojson") for t in page.links) == 2
    # The compare table lists both stored ER runs of the cohort.
    text = report.index.read_text()
    assert "logreg-run" in text and "mil-run" in text and "p_vs_this_run" in text
    assert report.heatmaps and all(s.startswith("S") for s in report.heatmaps)


# A script injected into a copy of the page (same folder, so relative links behave the same):
# once everything has loaded it writes each image's natural size into the DOM.
_PROBE = """<script>
window.addEventListener('load', () => {
  const sizes = Array.from(document.images).map(
    i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify(sizes);
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (scripts/install.sh installs "
    "Debian's chromium package); the report's browser test cannot run",
)
def test_headless_chromium_renders_every_figure(report, tmp_path):
    probe_page = report.out / "probe.html"
    probe_page.write_text(report.index.read_text().replace("</body>", _PROBE + "</body>"))
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe_page.resolve().as_uri(),
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, f"the page's load handler did not run; stdout: {done.stdout[-500:]}"
    sizes = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(sizes) == len(_parsed(report).images)
    for src, complete, width, height in sizes:
        assert complete and width > 0 and height > 0, f"{src} did not render"


def test_report_without_embedding_or_heatmaps_and_errors(tmp_path):
    store = build_store(tmp_path / "store")
    result = CliRunner().invoke(
        cli,
        [
            "report",
            "--store",
            str(store),
            "--run",
            "logreg-run",
            "--out",
            str(tmp_path / "out"),
            "--embed-method",
            "none",
            "--heatmaps",
            "0",
            "--bootstrap",
            "100",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["embedding"] is None and doc["heatmaps"] == [] and doc["n_figures"] == 1
    assert Path(doc["index"]).is_file()
    with pytest.raises(StoreError, match="logreg-run, mil-run"):
        build_report(store, "missing", tmp_path / "x")
