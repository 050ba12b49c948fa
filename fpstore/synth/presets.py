"""Sizes of the synthetic cohorts: ``small`` (tests), ``demo``, ``paper`` (the paper's scale)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from fpstore.config import check_range
from fpstore.errors import ConfigError, unknown_name
from fpstore.synth.render import RENDER_MPPS
from fpstore.synth.sites import SITES


@dataclass(frozen=True)
class SynthPreset:
    """How much to make and how. Sizes in level-0 pixels (0.25 um/px) or microns."""

    name: str
    tcga_patients: int  # with a slide and a clinical record
    external_patients: int
    slide_size: tuple[int, int]  # whole-slide images, level-0 px (W, H)
    tma_train: tuple[int, int]  # (patients, cores), 1-2 cores each; paper: (104, 207)
    tma_test: tuple[int, int]  # other patients; paper: (104, 208)
    core_um: float  # TMA core diameter
    render_mpp: float = 0.5  # resolution the tissue is drawn at, upsampled to 0.25 um/px
    effect: float = 1.0  # how strongly receptor status shapes morphology
    label_noise: float = 0.05  # share of recorded statuses flipped
    tcga_sites: tuple[str, ...] = ("A2", "BH", "E2", "AR")
    external_sites: tuple[str, ...] = ("X1", "X2")

    def __post_init__(self):
        owner = f"SynthPreset[{self.name}]"
        check_range(owner, "tcga_patients", self.tcga_patients, 2, 100_000)
        check_range(owner, "external_patients", self.external_patients, 1, 100_000)
        for name in ("tma_train", "tma_test"):
            patients, cores = getattr(self, name)
            check_range(owner, f"{name} patients", patients, 2, 10_000)
            check_range(owner, f"{name} cores", cores, patients, 2 * patients)
        check_range(owner, "core_um", self.core_um, 100.0, 3000.0)
        check_range(owner, "effect", self.effect, 0.0, 5.0)
        check_range(owner, "label_noise", self.label_noise, 0.0, 0.5)
        w, h = self.slide_size
        check_range(owner, "slide width", w, 512, 200_000)
        check_range(owner, "slide height", h, 512, 200_000)
        if self.render_mpp not in RENDER_MPPS:
            raise ConfigError(
                f"{owner}.render_mpp={self.render_mpp!r}; choose one of: "
                f"{', '.join(map(str, RENDER_MPPS))}"
            )
        for s in self.tcga_sites + self.external_sites:
            if s not in SITES:
                raise unknown_name("site", s, SITES)
        if len(self.tcga_sites) < 2:
            raise ConfigError(f"{owner}.tcga_sites={self.tcga_sites!r}: give at least two sites")

    def as_dict(self) -> dict:
        return asdict(self)


SIX_SITES = ("A2", "BH", "E2", "AR", "A8", "D8")

PRESETS: dict[str, SynthPreset] = {
    p.name: p
    for p in (
        # Seconds: for tests. Tissue drawn at 1 um/px; TMA cores smaller than real ones.
        SynthPreset(
            "small",
            tcga_patients=8,
            external_patients=4,
            slide_size=(3072, 2048),
            tma_train=(4, 6),
            tma_test=(3, 5),
            core_um=320.0,
            render_mpp=1.0,
        ),
        # About two minutes on two cores: every patient has >= 30 squares of 112 um of tissue.
        # Tissue drawn at 1 um/px (0.5 um/px would take about 3x longer).
        # Six tissue-source sites, so that `classify --split site` can hold out whole sites.
        # 48 external patients (the same two sites): with 24, a seed could leave 4 ER-negative
        # or 1 Her2-positive patients, too few for an external AUC's CI to say anything.
        SynthPreset(
            "demo",
            tcga_patients=48,
            external_patients=48,
            slide_size=(5120, 3072),
            tma_train=(24, 36),
            tma_test=(24, 36),
            core_um=700.0,
            render_mpp=1.0,
            tcga_sites=SIX_SITES,
        ),
        # For evidence with power (fpstore evidence), not for the demo: the demo's world, sites
        # and arrays with more patients (>= 200 TCGA-like, >= 150 external at the two unseen
        # sites) on smaller slides (768 x 512 um: >= 12 squares of 112 um of tissue each), so
        # that a difference of a few AUC points between encoders has a chance to show.
        SynthPreset(
            "evidence",
            tcga_patients=200,
            external_patients=150,
            slide_size=(3072, 2048),
            tma_train=(24, 36),
            tma_test=(24, 36),
            core_um=700.0,
            render_mpp=1.0,
            tcga_sites=SIX_SITES,
        ),
        # The paper's scale: 104 patients per array, a few hundred whole-slide patients;
        # slides of 4 x 3 mm so the set stays in tens of GB. Hours; only on request.
        SynthPreset(
            "paper",
            tcga_patients=400,
            external_patients=120,
            slide_size=(16384, 12288),
            tma_train=(104, 207),
            tma_test=(104, 208),
            core_um=700.0,
            tcga_sites=SIX_SITES,
        ),
    )
}


def get_preset(name: str, slide_size: tuple[int, int] | None = None) -> SynthPreset:
    """The named preset, with whole slides resized when ``slide_size`` is given."""
    if name not in PRESETS:
        raise unknown_name("preset", name, PRESETS)
    preset = PRESETS[name]
    return replace(preset, slide_size=tuple(slide_size)) if slide_size else preset
