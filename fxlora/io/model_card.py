"""The model card (``README.md``) `save_pretrained` writes beside the adapter, as PEFT does.

PEFT writes its card into the save directory (not into the subdirectories of other adapters):
YAML front matter with ``library_name`` and tags, and a "Framework versions" line appended to the
text; a card already there is updated, not replaced. fxlora does the same, with its own
content: the front matter gets ``library_name: fxlora``, ``base_model`` and ``tags`` where the
card has no such key yet (keys already there are never changed: unlike PEFT, which overwrites
``library_name`` and ``tags``, and writes an empty ``base_model`` for a model without a name),
and the text gets one section between `BEGIN` and `END` markers, describing the base model and
the adapters saved, which each save rewrites; everything outside the markers is the user's and
stays as it was. A card that is not UTF-8 text is left alone (with a warning).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from fxlora.io.adapter_dir import replace_file
from fxlora.io.atomic import check_writable_dir, fs_errors
from fxlora.io.peft_format import CARD_NAME

__all__ = ["CARD_NAME", "BEGIN", "END", "CardAdapter", "CardFacts", "card_text", "updated_card", "write_card"]

BEGIN = "<!-- fxlora:begin (written by fxlora's save_pretrained; edits inside this section are replaced) -->"
END = "<!-- fxlora:end -->"
_FRONT = "---"


@dataclass(frozen=True)
class CardAdapter:
    """One saved adapter, as the card lists it."""

    name: str
    directory: str  # relative to the card: "." or the adapter's subdirectory
    config: dict[str, Any]  # its adapter_config.json
    modules: tuple[str, ...]  # full names of the modules that carry it


@dataclass(frozen=True)
class CardFacts:
    """What the card says: the base model (class path, name or path if known, its own tags) and
    the adapters saved with it."""

    base_class: str
    base_name: Optional[str]
    base_tags: tuple[str, ...]
    adapters: tuple[CardAdapter, ...]

    @property
    def tags(self) -> list[str]:
        tags = {"fxlora", "lora", *self.base_tags}
        if self.base_name:
            tags.add(f"base_model:adapter:{self.base_name}")
        return sorted(tags)


def updated_card(directory: Path, facts: CardFacts) -> Optional[str]:
    """The card to write into `directory`: its current ``README.md`` updated (`card_text`), or a
    new one; None (and a warning) when the current one is not UTF-8 text."""
    path = directory / CARD_NAME
    try:
        existing = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        existing = None
    except UnicodeDecodeError:
        warnings.warn(f"fxlora: {str(path)!r} is not UTF-8 text; left as it is (no model card written)", stacklevel=4)
        return None
    return card_text(existing, facts)


def write_card(directory: Path, facts: CardFacts) -> None:
    """Update the card in `directory` on its own (a save whose adapters all lie in subdirectories;
    otherwise the card is part of the save of the directory's pair): one atomic replacement."""
    check_writable_dir(directory)

    def write(path: Path) -> bool:
        content = updated_card(directory, facts)
        if content is None:
            return False
        with fs_errors("write", path):
            path.write_text(content, encoding="utf-8")
        return True

    replace_file(directory, CARD_NAME, write)


def card_text(existing: Optional[str], facts: CardFacts) -> str:
    """`existing` (a card's text, None for none) with fxlora's front matter keys added where absent
    and its section replaced (or appended); the user's text is kept as it was."""
    front, body = _split_front_matter(existing or "")
    front = _with_keys(front, facts)
    section = _section(facts)
    start = body.rfind(BEGIN)
    stop = body.find(END, start) if start >= 0 else -1
    if stop >= 0:
        body = body[:start] + section + body[stop + len(END):]
    elif body.strip():
        body = body.rstrip("\n") + "\n\n" + section + "\n"
    else:
        body = f"\n# LoRA adapter for {_base_label(facts)}\n\n{section}\n"
    return f"{_FRONT}\n{front}{_FRONT}\n{body}"


def _split_front_matter(text: str) -> tuple[str, str]:
    """(front matter lines without the ``---`` fences, each ending in a newline; the rest)."""
    lines = text.splitlines(keepends=True)
    if lines and lines[0].rstrip("\r\n") == _FRONT:
        for i in range(1, len(lines)):
            if lines[i].rstrip("\r\n") == _FRONT:
                front = "".join(lines[1:i])
                if front and not front.endswith("\n"):
                    front += "\n"
                return front, "".join(lines[i + 1:])
    return "", text


def _has_key(front: str, key: str) -> bool:
    return re.search(rf"^{re.escape(key)}\s*:", front, re.MULTILINE) is not None


def _with_keys(front: str, facts: CardFacts) -> str:
    """`front` plus the top-level keys fxlora sets, each only where `front` lacks it."""
    added = []
    if not _has_key(front, "library_name"):
        added.append("library_name: fxlora\n")
    if facts.base_name and not _has_key(front, "base_model"):
        added.append(f"base_model: {_yaml_str(facts.base_name)}\n")
    if not _has_key(front, "tags"):
        added.append("tags:\n" + "".join(f"- {_yaml_str(t)}\n" for t in facts.tags))
    return front + "".join(added)


def _yaml_str(value: str) -> str:
    """`value` as a YAML scalar (single-quoted: no escapes but doubled quotes)."""
    return "'" + value.replace("'", "''") + "'"


def _base_label(facts: CardFacts) -> str:
    short = facts.base_class.rsplit(".", 1)[-1]
    return f"`{short}` (`{facts.base_name}`)" if facts.base_name else f"`{short}`"


def _section(facts: CardFacts) -> str:
    rows = "".join(
        f"| {_code(a.name)} | {_code(a.directory)} | {a.config.get('r')} | {a.config.get('lora_alpha')} | "
        f"{a.config.get('lora_dropout')} | {_targets(a.config.get('target_modules'))} | {_adapted(a.modules)} | "
        f"{_names(a.config.get('modules_to_save'))} |\n"
        for a in facts.adapters
    )
    versions = "".join(f"- {name} {version}\n" for name, version in _versions())
    return (
        f"{BEGIN}\n"
        f"## Adapters\n\n"
        f"LoRA adapters for `{facts.base_class}`"
        + (f" (`{facts.base_name}`)" if facts.base_name else "")
        + ", made with fxlora and saved in PEFT's format (`adapter_config.json`, "
        "`adapter_model.safetensors`). Load them onto the same base model with "
        "`fxlora.LoraModel.from_pretrained(model, directory)` or "
        "`peft.PeftModel.from_pretrained(model, directory)`.\n\n"
        "| adapter | directory | r | lora_alpha | lora_dropout | target_modules | modules adapted | modules_to_save |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n"
        f"### Framework versions\n\n{versions}"
        f"{END}"
    )


def _targets(targets: Any) -> str:
    if targets is None:
        return "the model type's default"
    if isinstance(targets, str):
        return f"regex {_code(targets)}"
    return _names(targets)


def _adapted(modules: Sequence[str]) -> str:
    """How many modules, and their distinct last name components."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return f"{len(modules)}: {_names(leaves)}" if modules else "0"


def _names(names: Optional[Sequence[str]]) -> str:
    return ", ".join(map(_code, names)) if names else "none"


def _code(text: str) -> str:
    """`text` as inline code in a table cell (a ``|`` would end the cell)."""
    return "`" + text.replace("|", "\\|") + "`"


def _versions() -> list[tuple[str, str]]:
    found = []
    try:
        found.append(("fxlora", metadata.version("fxlora")))
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        pass
    found.append(("PyTorch", torch.__version__.split("+")[0]))
    return found
