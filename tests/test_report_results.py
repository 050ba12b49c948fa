"""The report opens with the comparison the demo prints, and lists every compare run."""

import re
from html.parser import HTMLParser

import pytest

from fpstore.classify.pipeline import ClassifyConfig, CompareConfig, classify, compare
from fpstore.report.html import build_report
from tests._classify_store import add_cohort

FAST = {"max_epochs": 5, "patience": 2}
# Two comparisons with external validation and a classify run: 97-169 s on the shared 2-core
# machine at load 28.
pytestmark = pytest.mark.slow


class _Tables(HTMLParser):
    """Section headings and each section's table as a list of {column: cell} rows."""

    def __init__(self):
        super().__init__()
        self.sections: list[tuple[str, list[dict]]] = []
        self._tag, self._head, self._row, self._cell = None, [], None, ""

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "th":
            self._head.append(self._cell)
        elif tag == "td":
            self._row.append(self._cell)
        elif tag == "tr" and self._row:
            self.sections[-1][1].append(dict(zip(self._head, self._row)))
        elif tag == "thead":
            pass
        self._tag = None

    def handle_data(self, data):
        if self._tag == "h2":
            self.sections.append((data, []))
            self._head = []
        elif self._tag in ("td", "th"):
            self._cell += data


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """Two encoders on a training and an external cohort; compare ER and PR with external
    validation (as the demo does), then classify ER by CV alone (the demo's report run)."""
    store = tmp_path_factory.mktemp("results") / "store"
    add_cohort(store, "tcga", 40, seed=1, tissue=True, encoders=("enc", "enc2"))
    add_cohort(store, "external", 24, seed=2, tissue=False, encoders=("enc", "enc2"))
    docs = {
        marker: compare(
            store,
            CompareConfig(
                marker=marker,
                cohort="tcga",
                external="external",
                methods=("mil", "logreg"),
                pools=("all",),
                folds=3,
                n_boot=100,
                classifier={"mil": FAST},
            ),
            progress=False,
        )
        for marker in ("ER", "PR")
    }
    run = classify(
        store,
        ClassifyConfig(
            marker="ER", cohort="tcga", encoder="enc", n_boot=100, classifier=FAST, site_probe=False
        ),
        progress=False,
    )
    out = store.parent / "report"
    build_report(store, run["run_id"], out, n_heatmaps=0, embed=None, n_boot=100)
    parser = _Tables()
    parser.feed((out / "index.html").read_text())
    return docs, run, dict(parser.sections), [title for title, _ in parser.sections]


def test_the_report_opens_with_every_comparison_row_and_delong_between_encoders(demo_like):
    docs, _, sections, titles = demo_like
    assert titles[0] == "Results: stored comparisons on tcga"
    rows = sections[titles[0]]
    assert len(rows) == 2 * 2 * 2  # markers x methods x encoders
    for marker, doc in docs.items():
        for want in doc["rows"]:
            got = [
                r
                for r in rows
                if (r["marker"], r["method"], r["encoder"])
                == (marker, want["method"], want["encoder"])
            ]
            assert len(got) == 1 and got[0]["evaluated_on"] == "external"
            assert float(got[0]["auc"]) == pytest.approx(want["auc"], abs=5e-4)
            assert re.fullmatch(r"0\.\d{3}", got[0]["ci_low"])
            if want["encoder"] == "enc2":
                assert got[0]["vs_encoder"] == "enc"
                names = doc["names"]
                i = names.index(want["name"])
                j = names.index(want["name"].replace("enc2", "enc"))
                assert float(got[0]["p_vs_encoder"]) == pytest.approx(
                    doc["pairwise_p"][i][j], abs=5e-4, rel=1e-2
                )
            else:
                assert got[0]["p_vs_encoder"] == ""


def test_the_compare_section_lists_the_comparison_runs_beside_the_classify_run(demo_like):
    docs, run, sections, titles = demo_like
    title = next(t for t in titles if t.startswith("Compare: every stored ER run on tcga"))
    rows = sections[title]
    runs = {r["run"] for r in rows}
    assert run["run_id"] in runs
    assert {row["run_id"] for row in docs["ER"]["rows"]} <= runs
    assert not {row["run_id"] for row in docs["PR"]["rows"]} & runs  # another marker
    external = [r for r in rows if r["role"] == "external"]
    assert len(external) == 4 and {r["cohort"] for r in external} == {"external"}
