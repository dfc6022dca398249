"""Where an adapter lies: a local directory, or a repository id on the Hugging Face Hub.

A local directory always wins; anything else that names a repository (``"user/name"``) is fetched
with `huggingface_hub` (its cache, its token, its ``HF_HUB_OFFLINE``: offline, only the cache is
searched).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

__all__ = ["resolve_adapter_dir"]

_ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - checked by the caller
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _looks_like_repo_id(source: str) -> bool:
    parts = source.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") and p not in ("..",) for p in parts) and "\\" not in source


def resolve_adapter_dir(
    source: Union[str, os.PathLike], allow_bin: bool = False, *, revision: Optional[str] = None, subfolder: Optional[str] = None
) -> Path:
    """The local directory holding the adapter `source` names (with `subfolder` inside it).

    `source` is a local directory (used as it is: nothing is fetched), or a Hub repository id,
    downloaded (only the adapter's files, at `revision`) into huggingface_hub's cache, or found
    there when ``HF_HUB_OFFLINE=1``. Raises `FileNotFoundError` naming `source` when it is neither
    a local directory nor a repository that could be fetched (saying when that was offline).
    """
    local = Path(source)
    if subfolder:
        local_sub = local / subfolder
        if local_sub.is_dir():
            return local_sub
    if local.exists() or isinstance(source, Path) or not _looks_like_repo_id(str(source)):
        return local / subfolder if subfolder else local  # read_adapter_dir reports what is missing
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise FileNotFoundError(
            f"{str(source)!r} is not a local directory, and huggingface_hub (needed to fetch it as a Hub repository id) "
            "is not installed"
        ) from None
    offline = _offline()
    patterns = [f"{subfolder}/{name}" if subfolder else name for name in _ADAPTER_FILES + (["adapter_model.bin"] if allow_bin else [])]
    try:
        path = Path(snapshot_download(str(source), revision=revision, allow_patterns=patterns, local_files_only=offline))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        where = (
            "HF_HUB_OFFLINE=1, so only the local Hugging Face cache was searched and it does not hold it"
            if offline
            else f"fetching it from the Hub failed: {exc}"
        )
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"adapter {str(source)!r}{at} is not a local directory nor a Hub repository fxlora could get: {where}"
        ) from None
    return path / subfolder if subfolder else path
