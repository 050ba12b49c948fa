"""Pathology foundation models by name, as data: one :class:`FoundationModel` each.

Each entry holds what its model card (and the code that loads it in TRIDENT, Slideflow and
LazySlide) says: the timm architecture and keyword arguments, the normalisation, how the
token output becomes one vector (``cls``: the class token; ``cls+mean``: the class token
concatenated with the mean of the patch tokens, registers left out), the dimension, the
scale (224 px at 0.5 um/px = 112 um, the store's patch) and the Hugging Face repository with
its licence. ``timm.create_model(arch, pretrained=False, **kwargs)`` builds it; nothing is
fetched from the hub's config.

Weights, in this order: ``weights=FILE_OR_FOLDER`` (safetensors or a torch state dict read
with ``weights_only=True``), the local Hugging Face cache (offline: ``hf download REPO FILE``
fills it), or, with ``download=True`` only, ``huggingface_hub.hf_hub_download`` with the
user's own token. A state dict is checked against the architecture (names and shapes, on the
``meta`` device, no memory) before it is loaded strictly: a wrong file is refused whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from fpstore.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    Preprocessing,
    check_state_dict,
    load_state_dict_file,
    state_dict_hash,
)
from fpstore.encoders.registry import register_encoder
from fpstore.errors import EncoderError

POOLINGS = ("cls", "cls+mean")
# H-optimus-0's normalisation (its model card), shared by H-optimus-1 and H0-mini.
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# timm keyword arguments that name a layer class: kept as names so that entries stay data.
_LAYERS = {"SwiGLUPacked": ("timm.layers", "SwiGLUPacked"), "SiLU": ("torch.nn", "SiLU")}


@dataclass(frozen=True)
class FoundationModel:
    """One foundation encoder: how to build it, read its output and find its weights."""

    name: str
    repo: str  # Hugging Face repository the weights come from
    arch: str  # timm architecture
    kwargs: dict  # timm keyword arguments; layer classes by name (_LAYERS)
    pooling: str
    dim: int
    licence: str
    gated: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    out_px: int = 224
    mpp: float = 0.5
    files: tuple[str, ...] = WEIGHT_FILES
    note: str = ""
    sources: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise EncoderError(f"{self.name}: pooling {self.pooling!r}; use one of {POOLINGS}")
        bad = [k for k, v in self.kwargs.items() if k.endswith("_layer") and v not in _LAYERS]
        if bad:
            raise EncoderError(f"{self.name}: layer {bad[0]!r} not in {sorted(_LAYERS)}")

    @property
    def patch_um(self) -> float:
        return self.out_px * self.mpp

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.mean, self.std, self.patch_um, self.out_px)

    def fetch_command(self) -> str:
        return f"hf download {self.repo} {self.files[-1]}"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "repo": self.repo,
            "arch": self.arch,
            "kwargs": dict(self.kwargs),
            "pooling": self.pooling,
            "mean": list(self.mean),
            "std": list(self.std),
            "out_px": self.out_px,
            "mpp": self.mpp,
            "patch_um": self.patch_um,
            "licence": self.licence,
            "gated": self.gated,
            "files": list(self.files),
            "fetch": self.fetch_command(),
            "note": self.note,
            "sources": list(self.sources),
        }


_VIRCHOW = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    "mlp_layer": "SwiGLUPacked",
    "act_layer": "SiLU",
}
_HOPTIMUS = {
    "img_size": 224,
    "num_classes": 0,
    "global_pool": "token",
    "init_values": 1e-5,
    "dynamic_img_size": True,
}
_NC_ND = "CC-BY-NC-ND-4.0 (non-commercial, no derivatives); gated: accept the terms on the hub"

FOUNDATION_MODELS: tuple[FoundationModel, ...] = (
    FoundationModel(
        name="uni",
        repo="MahmoodLab/UNI",
        arch="vit_large_patch16_224",
        kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        pooling="cls",
        dim=1024,
        licence=_NC_ND,
        files=("pytorch_model.bin",),
        sources=("huggingface.co/MahmoodLab/UNI", "TRIDENT uni_v1"),
    ),
    FoundationModel(
        name="uni2-h",
        repo="MahmoodLab/UNI2-h",
        arch="vit_giant_patch14_224",
        kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        pooling="cls",
        dim=1536,
        licence=_NC_ND,
        files=("pytorch_model.bin",),
        sources=("huggingface.co/MahmoodLab/UNI2-h", "TRIDENT uni_v2"),
    ),
    FoundationModel(
        name="virchow",
        repo="paige-ai/Virchow",
        arch="vit_huge_patch14_224",
        kwargs=_VIRCHOW,
        pooling="cls+mean",
        dim=2560,
        licence="Apache-2.0 with Paige's terms (non-commercial); gated: accept them on the hub",
        note="class token + mean of the 256 patch tokens",
        sources=("huggingface.co/paige-ai/Virchow", "TRIDENT virchow"),
    ),
    FoundationModel(
        name="virchow2",
        repo="paige-ai/Virchow2",
        arch="vit_huge_patch14_224",
        kwargs={**_VIRCHOW, "reg_tokens": 4},
        pooling="cls+mean",
        dim=2560,
        licence=_NC_ND,
        note="class token + mean of the 256 patch tokens (the 4 registers left out)",
        sources=("huggingface.co/paige-ai/Virchow2", "TRIDENT virchow2"),
    ),
    FoundationModel(
        name="h-optimus-0",
        repo="bioptimus/H-optimus-0",
        arch="vit_giant_patch14_reg4_dinov2",
        kwargs=_HOPTIMUS,
        pooling="cls",
        dim=1536,
        licence="Apache-2.0; gated (accepted at once): accept the terms on the hub",
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        sources=("huggingface.co/bioptimus/H-optimus-0", "TRIDENT hoptimus0"),
    ),
    FoundationModel(
        name="h-optimus-1",
        repo="bioptimus/H-optimus-1",
        arch="vit_giant_patch14_reg4_dinov2",
        kwargs=_HOPTIMUS,
        pooling="cls",
        dim=1536,
        licence="Bioptimus' terms on the model card; gated: access granted on request",
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        sources=("huggingface.co/bioptimus/H-optimus-1", "TRIDENT hoptimus1"),
    ),
    FoundationModel(
        name="h0-mini",
        repo="bioptimus/H0-mini",
        arch="vit_base_patch14_reg4_dinov2",
        kwargs={
            "img_size": 224,
            "num_classes": 0,
            "init_values": 1e-5,
            "mlp_ratio": 4096 / 768,
            "global_pool": "",
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU",
        },
        pooling="cls",
        dim=768,
        licence=_NC_ND.replace("accept the terms", "access granted on request"),
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        note="class token, as TRIDENT's h0-mini (the model card also shows cls+mean, 1536-D)",
        sources=("huggingface.co/bioptimus/H0-mini", "TRIDENT h0-mini", "Slideflow h0_mini"),
    ),
    FoundationModel(
        name="gigapath",
        repo="prov-gigapath/prov-gigapath",
        arch="vit_giant_patch14_dinov2",
        kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        pooling="cls",
        dim=1536,
        licence="Apache-2.0, research use only; gated: share contact details on the hub",
        files=("pytorch_model.bin",),
        note="Prov-GigaPath's tile encoder (the card: 256 px resized, 224 cropped at 0.5 um/px)",
        sources=("huggingface.co/prov-gigapath/prov-gigapath", "TRIDENT gigapath"),
    ),
)


def _layer(name: str):
    import importlib

    module, attr = _LAYERS[name]
    return getattr(importlib.import_module(module), attr)


def build_model(model: FoundationModel, device: str | torch.device = "meta") -> torch.nn.Module:
    """The timm network of ``model`` with no weights loaded (on ``meta``: no memory)."""
    try:
        import timm
    except ImportError as error:
        raise EncoderError(f"encoder {model.name} needs timm: pip install 'timm>=1.0'") from error
    kwargs = {k: _layer(v) if k.endswith("_layer") else v for k, v in model.kwargs.items()}
    with torch.device(device):
        return timm.create_model(model.arch, pretrained=False, **kwargs)


class TokenPool(torch.nn.Module):
    """A ViT's normalised tokens -> one vector: the class token, or the class token and the
    mean of the patch tokens (registers and other prefix tokens left out)."""

    def __init__(self, vit: torch.nn.Module, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise EncoderError(f"pooling {pooling!r}; use one of {POOLINGS}")
        self.vit = vit
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        return torch.cat([cls, tokens[:, self.vit.num_prefix_tokens :].mean(1)], dim=1)


def _where_to_get(model: FoundationModel) -> str:
    gate = f"accept its terms at https://huggingface.co/{model.repo}, then " if model.gated else ""
    return (
        f"{gate}fetch it with `{model.fetch_command()}` (or add --download; your token from "
        "`hf auth login`), or point at a file or folder with --weights PATH"
    )


def _cached_file(model: FoundationModel, cache_dir: str | Path | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in model.files:
        found = try_to_load_from_cache(model.repo, name, cache_dir=cache_dir)
        if isinstance(found, str):  # None: not cached; a sentinel: known to be absent
            return Path(found)
    return None


def _file_in_folder(model: FoundationModel, folder: Path) -> Path:
    for name in model.files:
        if (folder / name).is_file():
            return folder / name
    raise EncoderError(
        f"encoder {model.name}: folder {folder} holds none of {', '.join(model.files)} "
        f"({model.repo}); {_where_to_get(model)}"
    )


def _download(model: FoundationModel, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )

    for name in model.files:
        try:
            return Path(hf_hub_download(model.repo, name, cache_dir=cache_dir))
        except EntryNotFoundError:
            continue
        except GatedRepoError as error:
            raise EncoderError(
                f"encoder {model.name}: {model.repo} is gated and your token has no access: "
                f"accept its terms at https://huggingface.co/{model.repo} and log in with "
                "`hf auth login`, or pass --weights PATH"
            ) from error
        except RepositoryNotFoundError as error:
            raise EncoderError(
                f"encoder {model.name}: {model.repo} not found or not visible to your token "
                "(`hf auth login`); or pass --weights PATH"
            ) from error
        except (HfHubHTTPError, OSError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise EncoderError(
                f"encoder {model.name}: downloading {model.repo} failed ({first}); "
                f"{_where_to_get(model)}"
            ) from error
    raise EncoderError(
        f"encoder {model.name}: {model.repo} has none of {', '.join(model.files)}; "
        "pass --weights PATH"
    )


def find_weights(
    model: FoundationModel,
    weights: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> tuple[Path, str]:
    """(file, where from: 'given', 'cache' or 'download'); never touches the network unless
    ``download``. ``cache_dir``: the Hugging Face cache (default: its usual place)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            return _file_in_folder(model, path), "given"
        if not path.is_file():
            raise EncoderError(
                f"encoder {model.name}: weights {path} do not exist ({model.repo}); "
                f"{_where_to_get(model)}"
            )
        return path, "given"
    cached = _cached_file(model, cache_dir)
    if cached is not None:
        return cached, "cache"
    if download:
        return _download(model, cache_dir), "download"
    raise EncoderError(
        f"no weights for encoder {model.name} on this machine (Hugging Face {model.repo}, not in "
        f"the local cache): {_where_to_get(model)}"
    )


def weights_status(model: FoundationModel, cache_dir: str | Path | None = None) -> dict:
    """Where this machine has ``model``'s weights: {'status': 'cache', 'path': ...} or
    {'status': 'missing', 'fetch': command}. Offline."""
    cached = _cached_file(model, cache_dir)
    if cached is None:
        return {"status": "missing", "path": None, "fetch": model.fetch_command()}
    return {"status": "cache", "path": str(cached), "fetch": None}


def load_model(model: FoundationModel, path: Path) -> torch.nn.Module:
    """The network of ``model`` with the state dict in ``path``: names and shapes checked on
    the meta device first (a wrong file is refused before any memory is spent), then loaded
    strictly (``assign``: the file's tensors become the parameters, no random init)."""
    state = load_state_dict_file(path, f"pass the weights of {model.repo} with --weights PATH")
    net = build_model(model, "meta")
    check_state_dict(
        net,
        state,
        f"weights {path} do not fit encoder {model.name} ({model.arch})",
        f"pass the weights of {model.repo} (`{model.fetch_command()}`) with --weights PATH",
    )
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:  # a buffer outside the state dict would be uninitialised
        raise EncoderError(f"encoder {model.name}: {left[0]} is not in {path}; cannot build")
    return net.eval()


def foundation_encoder(
    model: FoundationModel,
    weights: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> Encoder:
    path, where = find_weights(model, weights, download, cache_dir)
    net = load_model(model, path)
    return Encoder(
        model.name,
        TokenPool(net, model.pooling),
        model.dim,
        model.preprocessing,
        state_dict_hash(net),
        f"{model.name} ({model.repo}, {model.arch}, {model.pooling}), weights from {path} "
        f"({where}); licence: {model.licence}",
    )


FOUNDATION: dict[str, FoundationModel] = {}


def register_foundation(model: FoundationModel) -> FoundationModel:
    """Add ``model`` to the registry under its name (``create_encoder(model.name, ...)``)."""
    register_encoder(model.name)(partial(foundation_encoder, model))
    FOUNDATION[model.name] = model
    return model


for _model in FOUNDATION_MODELS:
    register_foundation(_model)
