"""Model and GPU catalogues: bundled data files, validated once, looked up by name or alias."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from vramplan.allocator import DEFAULT_CUDA_CONTEXT_BYTES, HOPPER_CUBLAS_WORKSPACE_BYTES
from vramplan.arch import FAMILIES, ArchConfig, ModelSpec, arch_from_hf_config, build_spec
from vramplan.datafiles import load_yaml
from vramplan.errors import VramplanError, unknown
from vramplan.units import MiB


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CatalogModel:
    name: str
    aliases: tuple[str, ...]
    default_for: tuple[str, ...]
    source: str
    config: dict[str, Any]


@cache
def model_catalog() -> dict[str, CatalogModel]:
    """Every bundled model by canonical name, validated (each config must parse)."""
    out: dict[str, CatalogModel] = {}
    for row in load_yaml("models.yaml")["models"]:
        m = CatalogModel(
            name=row["name"], aliases=tuple(str(a) for a in row.get("aliases", ())),
            default_for=tuple(str(a) for a in row.get("default_for", ())),
            source=row["source"], config=dict(row["config"]),
        )
        if m.config.get("model_type") not in FAMILIES:
            raise AssertionError(f"models.yaml: {m.name}: unsupported model_type {m.config.get('model_type')!r}")
        arch_from_hf_config(m.config, m.name)  # raises on a malformed row
        if m.name in out:
            raise AssertionError(f"models.yaml: duplicate name {m.name}")
        out[m.name] = m
    return out


@cache
def _model_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for m in model_catalog().values():
        for key in (m.name, *m.aliases):
            k = _norm(key)
            if k in index and index[k] != m.name:
                raise AssertionError(f"models.yaml: alias {key!r} names both {index[k]} and {m.name}")
            index[k] = m.name
    return index


def model_names() -> list[str]:
    return list(model_catalog())


@cache
def _catalog_spec(name: str) -> ModelSpec:
    m = model_catalog()[name]
    return build_spec(arch_from_hf_config(m.config, m.name))


def load_config_json(path: Path) -> dict[str, Any]:
    """A local HF config.json (the file, or a directory holding one) as a dict."""
    f = path / "config.json" if path.is_dir() else path
    if not f.is_file():
        raise VramplanError(f"no config.json at {str(path)!r}")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VramplanError(f"malformed config.json {str(f)!r}: {e}") from None
    if not isinstance(cfg, dict):
        raise VramplanError(f"malformed config.json {str(f)!r}: top level must be a JSON object")
    # Multimodal wrappers keep the language model under text_config (Gemma 3, Llama 4, ...).
    if cfg.get("model_type") not in FAMILIES and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    return cfg


def _hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether huggingface.co answers within `timeout_s` (HF_HUB_OFFLINE=1 means no): an offline
    look-up fails at once instead of retrying for ~25 s."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _hub_config(model_id: str, trust_remote_code: bool) -> dict[str, Any]:
    """A hub id's config through transformers (its offline cache counts); never executes remote
    code unless asked."""
    try:
        from transformers import AutoConfig  # heavy and optional: imported only here
    except ImportError:
        raise VramplanError(
            f"unknown model {model_id!r}: not in the catalogue (see `vramplan models`), not a local path, "
            "and transformers is not installed to read it from the hub"
        ) from None
    try:  # the local cache first: no network, no retries
        return AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code, local_files_only=True).to_dict()
    except Exception:  # not cached: ask the hub below, if it can be reached
        pass
    if not _hub_reachable():
        raise VramplanError(f"could not read config of {model_id!r}: not in the catalogue (see `vramplan models`), "
                            "not a local path, not in the hub cache, and the hub cannot be reached (offline)")
    try:
        cfg = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError variants; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VramplanError(f"could not read config of {model_id!r} from the hub or its cache: {first}") from None
    return cfg.to_dict()


def _looks_like_path(text: str) -> bool:
    """A local path the user meant as one (./x, /x, ~/x, x/config.json), not a hub id."""
    return text.startswith((".", "/", "~")) or text.endswith(".json") or Path(text).expanduser().is_dir()


def catalogue_entry(model: str) -> str | None:
    """The catalogue entry that answers for `model` (a name, alias or hub id), or None when a local
    path or the hub answers: tools say which entry answered for an alias."""
    path = Path(model).expanduser()
    if _looks_like_path(model) and path.exists():
        return None
    return _model_index().get(_norm(model))


def _config_label(path: Path) -> str:
    """The name a local config answers as: its folder's for a dir or a config.json, else the
    file's stem (data/cases/configs/qwen3-30b-a3b-6l.json -> qwen3-30b-a3b-6l)."""
    if path.is_dir():
        return path.resolve().name
    if path.name == "config.json" and path.resolve().parent.name:
        return path.resolve().parent.name
    return path.stem


def resolve_model(model: str | Path | ModelSpec, *, trust_remote_code: bool = False) -> ModelSpec:
    """A ModelSpec from a catalogue name/alias, a local config.json (file or directory), or a hub id."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, ArchConfig):
        return build_spec(model)
    text = str(model)
    path = Path(text).expanduser()
    hit = _model_index().get(_norm(text))
    if hit and not (_looks_like_path(text) and path.exists()):
        return _catalog_spec(hit)
    if path.exists():
        return build_spec(arch_from_hf_config(load_config_json(path), _config_label(path)))
    if "/" in text and not text.startswith((".", "/")):
        return build_spec(arch_from_hf_config(_hub_config(text, trust_remote_code), text))
    raise unknown("model", text, _model_index().keys(), hint="see `vramplan models`, or pass a config.json path")


# --------------------------------------------------------------------------------------------
# GPUs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    name: str
    aliases: tuple[str, ...]
    vendor: str
    memory_bytes: int
    usable_bytes: int
    bandwidth_gbs: float
    bf16_tflops: float
    bf16: bool
    price_hour_usd: float | None
    source: str
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES  # outside the allocator (gpu_specs.yaml cuda_context)
    cublas_workspace_bytes: int = HOPPER_CUBLAS_WORKSPACE_BYTES  # per cuBLAS handle, from the allocator


def _context_by_gpu(rows: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """gpu_specs.yaml `cuda_context`: each card's generation figures (CUDA context, cuBLAS
    workspace per handle), in bytes (validated)."""
    out: dict[str, tuple[int, int]] = {}
    for row in rows:
        if not row.get("source") or not isinstance(row.get("cuda_context_mib"), int) or row["cuda_context_mib"] <= 0:
            raise AssertionError(f"gpu_specs.yaml: cuda_context {row.get('generation')}: bad figure or missing source")
        ws = row.get("cublas_workspace_kib")
        if not isinstance(ws, int) or ws <= 0:
            raise AssertionError(f"gpu_specs.yaml: cuda_context {row.get('generation')}: bad cublas_workspace_kib={ws!r}")
        for name in row["gpus"]:
            if name in out:
                raise AssertionError(f"gpu_specs.yaml: cuda_context: {name} in two generations")
            out[name] = (row["cuda_context_mib"] * MiB, ws * 1024)
    return out


@cache
def gpu_catalog() -> dict[str, GPU]:
    out: dict[str, GPU] = {}
    context = _context_by_gpu(load_yaml("gpu_specs.yaml").get("cuda_context", []))
    for row in load_yaml("gpu_specs.yaml")["gpus"]:
        for key, typ in (("memory_mib", int), ("bandwidth_gbs", (int, float)), ("bf16_tflops", (int, float))):
            if not isinstance(row.get(key), typ) or row[key] <= 0:
                raise AssertionError(f"gpu_specs.yaml: {row.get('name')}: bad {key}={row.get(key)!r}")
        if not row.get("source"):
            raise AssertionError(f"gpu_specs.yaml: {row['name']}: missing source")
        mem = row["memory_mib"] * MiB
        ctx, workspace = context.get(row["name"], (DEFAULT_CUDA_CONTEXT_BYTES, HOPPER_CUBLAS_WORKSPACE_BYTES))
        out[row["name"]] = GPU(
            name=row["name"], aliases=tuple(str(a) for a in row.get("aliases", ())), vendor=row["vendor"], memory_bytes=mem,
            usable_bytes=row.get("usable_mib", row["memory_mib"]) * MiB, bandwidth_gbs=float(row["bandwidth_gbs"]),
            bf16_tflops=float(row["bf16_tflops"]), bf16=bool(row.get("bf16", True)),
            price_hour_usd=row.get("price_hour_usd"), source=row["source"],
            cuda_context_bytes=ctx, cublas_workspace_bytes=workspace,
        )
    return out


@cache
def _gpu_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for g in gpu_catalog().values():
        for key in (g.name, *g.aliases):
            index[_norm(key).replace(" ", "-")] = g.name
    return index


def resolve_gpu(name: str) -> GPU:
    hit = _gpu_index().get(_norm(name).replace(" ", "-"))
    if hit is None:
        raise unknown("GPU", name, [g.name for g in gpu_catalog().values()] + list(_gpu_index()),
                      hint="see `vramplan gpus`")
    return gpu_catalog()[hit]
