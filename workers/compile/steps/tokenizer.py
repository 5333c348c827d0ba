"""The tokenizer step: the gateway's limits, then the special tokens and the chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workers.compile.steps.base import TOKENIZER_FILE, Job, Model, Step, first_line
from workers.compile.text_checks import check_chat_template, check_tokenizer
from workers.compile.validate import CompileError
from workers.contract import Runtime

SPECIAL_KEYS = ("chat_template", "bos_token_id", "eos_token_ids", "pad_token_id")


def prepare(job: Job, step: Step, model: Model) -> dict[str, Any]:
    """The artifact's tokenizer.json text and special tokens; {} for a tensor model."""
    if job.runtime == Runtime.TENSOR:
        step.skip("tensor models take tensors, not text: no tokenizer")
        return {}
    from tokenizers import Tokenizer

    assert model.tokenizer_dir is not None
    path = model.tokenizer_dir / TOKENIZER_FILE
    check_tokenizer(step.say, path, job.tokenizer_limits, job.tokenizer_probe_s)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises bare Exceptions
        raise CompileError(
            f"{TOKENIZER_FILE} is not a valid Hugging Face tokenizers file: {first_line(exc)}",
            code="invalid_tokenizer",
        ) from exc
    # Consumers truncate and pad themselves (docs/artifacts.md): counting
    # must count real tokens, so a baked-in truncation/padding is removed.
    data = json.loads(path.read_text(encoding="utf-8"))
    stripped = [k for k in ("truncation", "padding") if data.get(k) is not None]
    data["truncation"] = None
    data["padding"] = None
    info: dict[str, Any] = {"tokenizer_json": json.dumps(data, ensure_ascii=False)}
    partial = model.partial_manifest
    if partial:
        info.update({k: partial.get(k) for k in SPECIAL_KEYS})
    else:
        info.update(special_tokens(model.tokenizer_dir, tok))
    _check_template(job, step, info)
    step.metrics.update(
        {
            "vocab_size": tok.get_vocab_size(),
            "chat_template": bool(info.get("chat_template")),
            "bos_token_id": info.get("bos_token_id"),
            "eos_token_ids": info.get("eos_token_ids"),
            "pad_token_id": info.get("pad_token_id"),
            "removed": stripped,
        }
    )
    step.say(
        "tokenizer: %d tokens, chat template %s",
        tok.get_vocab_size(),
        "captured" if info.get("chat_template") else "none",
    )
    return info


def _check_template(job: Job, step: Step, info: dict[str, Any]) -> None:
    """A chat model has a template, and any template renders within the gateway's budget."""
    if job.request.kind == "chat" and not info.get("chat_template"):
        raise CompileError(
            "a chat model needs a chat template (tokenizer_config.json `chat_template`): "
            "add one, or compile it as kind `completion`",
            code="missing_chat_template",
        )
    if info.get("chat_template"):
        step.metrics["chat_template_render"] = check_chat_template(
            step.say, str(info["chat_template"]), job.template_budget
        )


def special_tokens(directory: Path, tok: Any) -> dict[str, Any]:
    """bos/eos/pad ids and the chat template of an uploaded tokenizer's config."""
    config: dict[str, Any] = {}
    path = directory / "tokenizer_config.json"
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CompileError(
                f"tokenizer_config.json is not valid JSON: {exc}", code="invalid_tokenizer"
            ) from exc
        config = loaded if isinstance(loaded, dict) else {}

    def token_id(key: str) -> int | None:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return tok.token_to_id(value) if isinstance(value, str) else None

    eos = token_id("eos_token")
    template = config.get("chat_template")
    return {
        "chat_template": template if isinstance(template, str) else None,
        "bos_token_id": token_id("bos_token"),
        "eos_token_ids": [eos] if eos is not None else [],
        "pad_token_id": token_id("pad_token"),
    }
