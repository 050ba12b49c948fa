"""The matching game of the paper's Table 2.

Fingerprints of the LEFT halves of one section's cores are matched to the nearest RIGHT
half of another section (another site) in 512-D: a half's fingerprint is the mean of the
L2-normalised fingerprints of its tissue patches, normalised again, so nearest in Euclidean
distance is nearest in cosine. A left half is correct when its nearest right half is the same
physical core. Ties (several right halves at the same distance) earn the expected credit of
breaking the tie at random: 1/k when the right core is among the k tied. The pooled patient
accuracy (the paper's "pooled" variant) matches each patient's mean left fingerprint to the
nearest patient's mean right fingerprint. The rank of the true right half (1 = nearest; ties
count in its favour) gives the median rank and the top-5 accuracy, which show progress while
top-1 accuracy is still near chance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from fpstore.errors import ConfigError, TrainingError

TIE_TOLERANCE = 1e-6


@dataclass
class MatchResult:
    n_cores: int
    core_correct: float
    core_accuracy: float
    chance_core: float
    n_patients: int
    patient_correct: float
    patient_accuracy: float
    chance_patient: float
    ties: int  # left halves whose nearest distance was shared by several right halves
    median_rank: float  # of the true right half among all right halves
    top5_accuracy: float  # share of left halves whose true right half is among the 5 nearest
    unmatchable: int  # left halves whose core has no right half in the other section
    misses: list[dict] = field(default_factory=list)
    sections: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def _credit(dist_row: np.ndarray, correct: np.ndarray) -> tuple[float, np.ndarray]:
    """(expected credit under random tie-breaking, indices tied at the minimum)."""
    tied = np.flatnonzero(dist_row <= dist_row.min() + TIE_TOLERANCE)
    return float(correct[tied].mean()), tied


def _pool(fp: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    names = np.unique(groups)
    return names, normalise(np.stack([fp[groups == g].mean(axis=0) for g in names]))


def match_halves(
    left_fp, left_key, left_patient, right_fp, right_key, right_patient
) -> MatchResult:
    """Play the game on given fingerprints: ``left_*`` [n], ``right_*`` [m]; keys name the
    physical core (the same key on both sides means a correct match)."""
    left_fp, right_fp = normalise(left_fp), normalise(right_fp)
    left_key, right_key = np.asarray(left_key).astype(str), np.asarray(right_key).astype(str)
    left_patient, right_patient = (
        np.asarray(left_patient).astype(str),
        np.asarray(right_patient).astype(str),
    )
    if len(left_fp) == 0 or len(right_fp) == 0:
        raise TrainingError(
            f"the matching game needs halves on both sides (left {len(left_fp)}, right {len(right_fp)})"
        )
    dist = _distances(left_fp, right_fp)
    playable = np.isin(left_key, right_key)
    total, ties, misses, ranks = 0.0, 0, [], []
    for i in np.flatnonzero(playable):
        correct = right_key == left_key[i]
        credit, tied = _credit(dist[i], correct)
        total += credit
        ties += len(tied) > 1
        true_d = dist[i][correct].min()
        ranks.append(int((dist[i] < true_d - TIE_TOLERANCE).sum()) + 1)
        if credit < 1.0:
            chosen = tied[~correct[tied]][0]  # the wrong half it was (or could be) matched to
            misses.append(
                {
                    "left": left_key[i],
                    "patient": left_patient[i],
                    "matched": right_key[chosen],
                    "matched_patient": right_patient[chosen],
                    "same_patient": bool(right_patient[chosen] == left_patient[i]),
                    "distance_matched": round(float(dist[i, chosen]), 4),
                    "distance_true": round(float(true_d), 4),
                    "rank_of_true": ranks[-1],
                    "credit": round(credit, 4),
                }
            )
    n_cores = int(playable.sum())
    lp_names, lp_fp = _pool(left_fp, left_patient)
    rp_names, rp_fp = _pool(right_fp, right_patient)
    pdist = _distances(lp_fp, rp_fp)
    p_total, n_patients = 0.0, 0
    for i, name in enumerate(lp_names):
        correct = rp_names == name
        if correct.any():
            p_total += _credit(pdist[i], correct)[0]
            n_patients += 1
    return MatchResult(
        n_cores=n_cores,
        core_correct=total,
        core_accuracy=total / max(1, n_cores),
        chance_core=1.0 / len(right_fp),
        n_patients=n_patients,
        patient_correct=p_total,
        patient_accuracy=p_total / max(1, n_patients),
        chance_patient=1.0 / len(rp_names),
        ties=int(ties),
        median_rank=float(np.median(ranks)) if ranks else float("nan"),
        top5_accuracy=float(np.mean(np.asarray(ranks) <= 5)) if ranks else float("nan"),
        unmatchable=int((~playable).sum()),
        misses=misses,
    )


@torch.no_grad()
def half_fingerprints(
    model,
    pre: dict,
    halves: np.ndarray,
    tissue: np.ndarray,
    mpp: float,
    device="cpu",
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """[n, dim]: per half, the normalised mean of its tiled tissue patches' fingerprints."""
    from tqdm import tqdm

    from fpstore.encoders.fingerprint_net import to_input
    from fpstore.fingerprint.data import gather, grid_crops

    patch_px = int(round(pre["patch_um"] / mpp))
    crops = grid_crops(tissue, halves.shape[1:3], patch_px)
    owner = np.array([i for i, _, _ in crops])
    device = torch.device(device)
    model = model.to(device).eval()
    feats = np.empty((len(crops), model.dim), np.float32)
    for start in tqdm(
        range(0, len(crops), batch_size), desc="fingerprints", unit="batch", disable=not progress
    ):
        chunk = crops[start : start + batch_size]
        x = to_input(
            torch.from_numpy(gather(halves, chunk, patch_px)).to(device),
            pre["mean"],
            pre["std"],
            pre["out_px"],
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats[start : start + len(chunk)] = model.features(x).float().cpu().numpy()
    feats = normalise(feats)
    return normalise(np.stack([feats[owner == i].mean(axis=0) for i in range(len(halves))])).astype(
        np.float32
    )


def default_sections(cores) -> tuple[str, str]:
    """The first section and the first section at another site (the paper: slides 4 and 5)."""
    sections = list(dict.fromkeys(cores.section.tolist()))
    site = dict(zip(cores.section.tolist(), cores.site.tolist()))
    if len(sections) < 2:
        raise ConfigError(
            f"the matching game needs two sections of the test array, found {sections}"
        )
    other = [s for s in sections[1:] if site[s] != site[sections[0]]]
    return sections[0], (other or sections[1:])[0]


def play(
    model,
    pre: dict,
    cores,
    left_section: str | None = None,
    right_section: str | None = None,
    device="cpu",
    progress: bool = False,
) -> MatchResult:
    """Left halves of ``left_section`` against right halves of ``right_section`` of a CoreSet."""
    if left_section is None or right_section is None:
        d_left, d_right = default_sections(cores)
        left_section, right_section = left_section or d_left, right_section or d_right
    known = sorted(set(cores.section.tolist()))
    for name in (left_section, right_section):
        if name not in known:
            raise ConfigError(
                f"section {name!r} is not in the test array; sections: {', '.join(known)}"
            )
    lrows = np.flatnonzero(cores.section == left_section)
    rrows = np.flatnonzero(cores.section == right_section)
    left_fp = half_fingerprints(
        model,
        pre,
        np.asarray(cores.left[lrows]),
        cores.tissue_left[lrows],
        cores.mpp,
        device,
        progress=progress,
    )
    right_fp = half_fingerprints(
        model,
        pre,
        np.asarray(cores.right[rrows]),
        cores.tissue_right[rrows],
        cores.mpp,
        device,
        progress=progress,
    )
    result = match_halves(
        left_fp,
        cores.key[lrows],
        cores.patient_id[lrows],
        right_fp,
        cores.key[rrows],
        cores.patient_id[rrows],
    )
    site = dict(zip(cores.section.tolist(), cores.site.tolist()))
    result.sections = {
        "left": left_section,
        "left_site": site[left_section],
        "right": right_section,
        "right_site": site[right_section],
    }
    return result


RESTYLE_METHOD = "macenko"  # how the cohort game restyles right halves to another site


def cohort_pairs(cores, patients) -> tuple[np.ndarray, np.ndarray, dict]:
    """(left rows, right rows, how) of the held-out ``patients``' pseudo-cores.

    A patient with pseudo-cores at two or more sites gives the left halves of its first
    site's cores and the right halves of its other sites' cores (a real cross-site pair);
    a patient at one site gives left and right halves of the same cores, and ``how`` lists
    those right rows for restyling to another site.
    """
    left, right, restyle = [], [], []
    for patient in patients:
        rows = np.flatnonzero(cores.patient_id == patient)
        sites = sorted(set(cores.site[rows].tolist()))
        if len(sites) > 1:
            left.extend(rows[cores.site[rows] == sites[0]])
            right.extend(rows[cores.site[rows] != sites[0]])
        else:
            left.extend(rows)
            right.extend(rows)
            restyle.extend(rows)
    if not left:
        raise TrainingError(f"none of the {len(patients)} held-out patients has a pseudo-core")
    return np.array(left, int), np.array(right, int), {"restyle_rows": restyle}


def cohort_game(model, pre: dict, cores, patients, device="cpu", progress=False) -> MatchResult:
    """The matching game on a cohort's held-out patients (pseudo-cores): each left half against
    every right half; correct when the nearest right half is the same patient's. Right halves
    come from another site where the patient has one, else they are restyled (Macenko) to the
    target core of another site of the cohort; ``sections`` says how many of each."""
    from fpstore.fingerprint.stain import fitted_normaliser, normalise_image, site_targets

    left_rows, right_rows, how = cohort_pairs(cores, patients)
    right = np.asarray(cores.right[right_rows]).copy()
    sites = sorted(set(cores.site.tolist()))
    restyled, failures = 0, 0
    if how["restyle_rows"] and len(sites) > 1:
        targets = site_targets(cores, np.arange(len(cores)))
        norms = {s: fitted_normaliser(RESTYLE_METHOD, targets[s]) for s in sites}
        for j, row in enumerate(right_rows):
            if row in how["restyle_rows"]:
                other = sites[(sites.index(cores.site[row]) + 1) % len(sites)]
                right[j], ok = normalise_image(norms[other], right[j])
                restyled += ok
                failures += not ok
    left_fp = half_fingerprints(
        model,
        pre,
        np.asarray(cores.left[left_rows]),
        cores.tissue_left[left_rows],
        cores.mpp,
        device,
        progress=progress,
    )
    right_fp = half_fingerprints(
        model, pre, right, cores.tissue_right[right_rows], cores.mpp, device, progress=progress
    )
    patient_l, patient_r = cores.patient_id[left_rows], cores.patient_id[right_rows]
    result = match_halves(left_fp, patient_l, patient_l, right_fp, patient_r, patient_r)
    # A patient has several pseudo-cores: chance is the share of right halves that are its own.
    result.chance_core = float(np.mean([np.mean(patient_r == p) for p in patient_l]))
    cross = len(right_rows) - len(how["restyle_rows"])
    result.sections = {
        "left": "left halves of the held-out patients' pseudo-cores",
        "right": (
            f"{cross} right halves from another site, {restyled} restyled ({RESTYLE_METHOD}) "
            f"to another site, {failures + (len(how['restyle_rows']) if len(sites) < 2 else 0)}"
            " as they are (same site)"
        ),
        "left_site": ",".join(sorted(set(cores.site[left_rows].tolist()))),
        "right_site": "other sites" if len(sites) > 1 else sites[0],
        "cross_site_pairs": cross,
        "restyled": restyled,
        "same_site": failures + (len(how["restyle_rows"]) if len(sites) < 2 else 0),
    }
    return result
