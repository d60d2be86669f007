"""resolve_base_model: folders as they are, hub ids unchanged, the embedded default materialised once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from producer import base_models
from producer.base_models import EMBEDDED_DEFAULT, embedded_default_path, resolve_base_model


def test_a_local_folder_is_itself(tmp_path: Path) -> None:
    assert resolve_base_model(str(tmp_path)) == str(tmp_path.resolve())


def test_a_hub_id_is_returned_unchanged(tmp_path: Path) -> None:
    assert resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_cache_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRAINQ_CACHE_DIR", str(tmp_path))
    assert embedded_default_path() == tmp_path / "models" / "smollm2-135m-instruct"


def test_concurrent_callers_materialise_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    conversions: list[Path] = []

    def slow_fake_convert(gguf: Path, out: Path, progress: bool) -> None:
        conversions.append(out)
        time.sleep(0.3)  # long enough for the other callers to arrive and wait on the lock
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(base_models, "_convert_gguf", slow_fake_convert)
    monkeypatch.setattr(base_models, "_find_gguf", lambda: Path("unused.gguf"))
    results: list[str] = []
    callers = [
        threading.Thread(target=lambda: results.append(resolve_base_model(EMBEDDED_DEFAULT, tmp_path, False)))
        for _ in range(3)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()

    assert len(conversions) == 1
    assert results == [str(embedded_default_path(tmp_path))] * 3
    # The work folder was renamed into place: nothing half-written is left beside it.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        ".smollm2-135m-instruct.lock", "smollm2-135m-instruct",
    ]


def test_a_failed_conversion_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken_convert(gguf: Path, out: Path, progress: bool) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(base_models, "_convert_gguf", broken_convert)
    monkeypatch.setattr(base_models, "_find_gguf", lambda: Path("unused.gguf"))
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_base_model(EMBEDDED_DEFAULT, tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2-135m-instruct.lock"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_embedded_default_materialises_loads_chats_and_is_instant_the_second_time(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    path = resolve_base_model(EMBEDDED_DEFAULT, tmp_path, progress=False)
    first_s = time.monotonic() - started
    started = time.monotonic()
    assert resolve_base_model(EMBEDDED_DEFAULT, tmp_path, progress=False) == path
    assert time.monotonic() - started < 0.1
    assert Path(path) == embedded_default_path(tmp_path)
    print(f"materialised {EMBEDDED_DEFAULT} in {first_s:.1f} s")

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.dtype == torch.bfloat16
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say yes."}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new_tokens) <= 4
    assert tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_command_line_prints_the_resolved_path_last(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The trainer worker resolves through `python -m producer.base_models NAME` and reads the last line.
    base_models.main([str(tmp_path), "--quiet"])

    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path.resolve())
