"""Saving and loading adapters of a `LoraModel`: `save_pretrained`, `from_pretrained`,
`load_adapter` (the files themselves: `fxlora.io.adapter_files`).

Loading is all-or-nothing: the config and every tensor (names, shapes, kinds) are checked against
the model before it is touched, and if anything fails later the model is rolled back (the adapter
state's transaction), so a bad adapter never leaves a half-loaded one behind. A loaded adapter
joins the model by the one path every adapter takes (`fxlora.model.adapters.add_planned`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn as nn

from fxlora.core.fold import FoldRecord, unfolded_tensor
from fxlora.errors import MergeError
from fxlora.core.layers import check_adapter_name, target_meta
from fxlora.io.distributed import user_class, writes_files
from fxlora.io.hub import resolve_adapter_dir
from fxlora.io.atomic import check_writable_dir
from fxlora.io.adapter_files import (
    DEFAULT_ADAPTER,
    PathLike,
    adapter_directory,
    base_model_name,
    config_text,
    copy_in,
    emit_notes,
    file_tensors,
    fit_tensors,
    plan_layout,
    read_adapter_dir,
    restore_base,
    snapshot_base,
    write_adapter_dir,
)
from fxlora.io.model_card import CardAdapter, CardFacts, write_card
from fxlora.io.weight_conversion import to_plain_lora
from fxlora.kinds.weight_inits import changes_base_weights
from fxlora.io.peft_format import BASE, EXTRA_BASE, PEFT_PREFIX, config_to_json, file_config, layout_of_adapter
from fxlora.planning.plan import TracePolicy
from fxlora.runtime.install import fxlora_present, restore_requires_grad, strip

if TYPE_CHECKING:  # pragma: no cover
    from fxlora.model.lora_model import LoraModel

__all__ = ["save_pretrained", "from_pretrained", "load_adapter", "adapter_peft_tensors", "check_merged_base"]



def _merged_into(lm: "LoraModel", key: str) -> tuple[list[str], list[FoldRecord]]:
    """(the merged adapters, their fold records, in merge order) that changed the base tensor at
    state_dict `key` (a layer's weight, or its bias where a ``lora_bias`` was folded in)."""
    owner, _, which = key.rpartition(".")
    adapters, records = [], []
    for step in lm.adapter_state.merge_steps:
        record = step.records.get(owner)
        if record is not None and which in record.restores:
            adapters.extend(step.scales)
            records.append(record)
    return adapters, records


def _unmerged(lm: "LoraModel", key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The base tensor at state_dict `key` as it is with no adapter merged: a bias the merges
    folded a ``lora_bias`` into is computed back (exactly, `fxlora.core.fold.unfolded_tensor`), so
    an adapter file saved while merged holds the trained bias, not bias + B bias."""
    _, records = _merged_into(lm, key)
    if not records:
        return tensor
    owner, _, which = key.rpartition(".")
    return unfolded_tensor(lm.model.get_submodule(owner), which, records)


def check_merged_base(lm: "LoraModel", fitted: dict[str, tuple[torch.Tensor, str]], directory: PathLike) -> None:
    """`MergeError` if the file would overwrite a base tensor a merged adapter is folded into
    (a trained bias over a merged ``lora_bias``, an embedding weight over a merged update): the
    merged adapter would be lost from it, and unmerging would then subtract it from the file's value."""
    for key, (_, role) in fitted.items():
        if role not in (BASE, EXTRA_BASE):
            continue
        adapters, _ = _merged_into(lm, key)
        if adapters:
            raise MergeError(
                f"cannot load the adapter in {str(directory)!r} now: its file sets the base tensor {key!r}, into which "
                f"the merged adapter(s) {sorted(set(adapters))} are folded; call unmerge_adapter() first, then load "
                "(and merge again); nothing was loaded"
            )


def adapter_peft_tensors(lm: "LoraModel", adapter: str) -> dict[str, torch.Tensor]:
    """The tensors of `adapter` under their file keys (with PEFT's prefix), as they are unmerged
    (the model's own tensors, except base tensors a merge changed: those computed back)."""
    layout = layout_of_adapter(lm.model, adapter, lm.peft_config[adapter].bias)
    state = lm.model.state_dict(keep_vars=True)
    tensors = {}
    for file_key, slot in layout.slots.items():
        if not slot.written:
            continue
        tensor = state[slot.key] if slot.role != BASE else _unmerged(lm, slot.key, state[slot.key])
        if tuple(tensor.shape) != slot.shape:  # layout and layers disagree: a bug, not bad input
            raise RuntimeError(f"fxlora internal error: {slot.key} has shape {tuple(tensor.shape)}, layout says {slot.shape}")
        tensors[PEFT_PREFIX + file_key] = tensor
    return tensors


def save_pretrained(
    lm: "LoraModel",
    save_directory: PathLike,
    selected_adapters: Optional[Sequence[str]] = None,
    is_main_process: Optional[bool] = None,
    path_initial_model_for_weight_conversion: Optional[PathLike] = None,
) -> None:
    """Save adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    The adapter ``default`` is written into `save_directory`, every other one into
    ``save_directory/<adapter name>/``. Only the adapters' tensors are written (LoRA weights,
    `modules_to_save` copies, and the base biases the adapter trains with ``bias != "none"``).
    Each adapter's pair of files is replaced as a whole (`fxlora.io.adapter_dir`): after a
    failure that adapter's previous files are in place, after a kill (at any instant) its previous
    or its new pair loads, never a mix, and a reader loading meanwhile gets one of the two. No
    ``.fxlora-*`` temporary entry outlives a failed save; a killed save's are removed by the next
    save to that directory. Errors are `OSError`s naming the path.

    As PEFT does, `save_directory` also gets a model card (``README.md``, `fxlora.io.model_card`):
    the base model and the adapters saved; a card already there is updated, the text outside
    fxlora's section kept as it was. It is replaced in the same save as the pair of
    ``default`` (on its own, atomically, after the others when ``default`` is not saved).

    A sharded model (FSDP2) is saved by calling this on every process: the tensors are gathered
    whole and the main process writes the same files an unsharded model gives
    (`fxlora.io.distributed`).

    Args:
        save_directory: created if missing.
        selected_adapters: names of the adapters to save (default: all).
        is_main_process: whether this process writes (default: rank 0 of the initialised
            process group, or True without one).
        path_initial_model_for_weight_conversion: the directory a PiSSA / OLoRA adapter was
            saved to right after its init: the adapter is then saved as the plain rank-2r LoRA
            adapter that gives the same model on the *original* base weights
            (`fxlora.io.weight_conversion`; PEFT's keyword). One adapter at a time; that
            directory is only read.
    """
    names = list(lm.peft_config) if selected_adapters is None else lm.adapter_state.check_known(selected_adapters)
    initial = None
    if path_initial_model_for_weight_conversion is not None:
        if len(names) != 1:
            raise ValueError(
                f"path_initial_model_for_weight_conversion converts one adapter, but {names} would be saved; "
                "pick it with selected_adapters=[name]"
            )
        initial = read_adapter_dir(path_initial_model_for_weight_conversion)
    root = Path(save_directory)
    base_name = base_model_name(lm.model)
    prepared = []
    for name in names:  # everything is computed before the first byte is written
        directory = adapter_directory(root, name)
        config, tensors = file_config(lm.model, name, lm.peft_config[name]), file_tensors(adapter_peft_tensors(lm, name))
        if initial is not None:
            tensors, config = to_plain_lora(name, tensors, config, initial, PEFT_PREFIX)
        prepared.append((name, directory, tensors, config_to_json(config, base_name, type(lm.model))))
    if not writes_files(is_main_process):
        return
    card = _card_facts(  # the configs as given (the files hold resolved targets)
        lm, base_name, [(name, directory.relative_to(root), config_to_json(lm.peft_config[name], base_name)) for name, directory, _, _ in prepared]
    )
    check_writable_dir(root)
    for name, directory, tensors, config in prepared:
        write_adapter_dir(directory, tensors, config_text(config), card if directory == root else None)
    if all(directory != root for _, directory, _, _ in prepared):
        write_card(root, card)


def _card_facts(lm: "LoraModel", base_name: Optional[str], saved: list[tuple[str, Path, dict]]) -> CardFacts:
    """What the model card says about `lm`'s base model and the adapters `saved` (name, directory
    relative to the card, config JSON)."""
    model = lm.model
    cls = user_class(type(model))
    tags = set(getattr(model, "model_tags", None) or [])
    if any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in cls.__mro__):
        tags.add("transformers")
    adapters = tuple(
        CardAdapter(name, str(directory), config, tuple(n for n, m in model.named_modules() if _carries(m, name)))
        for name, directory, config in saved
    )
    return CardFacts(f"{cls.__module__}.{cls.__qualname__}", base_name, tuple(sorted(tags)), adapters)


def _carries(module: nn.Module, adapter: str) -> bool:
    meta = target_meta(module)
    return meta is not None and adapter in meta.adapters


def from_pretrained(
    cls: type,
    model: nn.Module,
    directory: PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    is_trainable: bool = False,
    *,
    trace: TracePolicy = "auto",
    allow_bin: bool = False,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
) -> "LoraModel":
    """Adapt `model` (in place, as `fxlora.transform` does) with the adapter saved in
    `directory` by fxlora or PEFT, and return the `LoraModel`.

    Args:
        model: the base model the adapter was trained on (not a LoraModel: use `load_adapter`).
        directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``; or a Hugging
            Face Hub repository id (``"user/name"``) fetched with huggingface_hub, from its cache
            alone when ``HF_HUB_OFFLINE=1``. A local directory of that name always wins.
        adapter_name: the name the adapter gets in the returned model.
        is_trainable: False (default) puts the model in eval mode with nothing requiring
            grad; True leaves the mode alone and lets the adapter's weights train.
        trace: as in `fxlora.transform`.
        allow_bin: also read a legacy ``adapter_model.bin`` when there is no safetensors file
            (with ``torch.load(weights_only=True)``).
        revision, subfolder: the Hub revision to fetch; the adapter's folder inside the
            directory or repository (both as in PEFT).

    Raises:
        FileNotFoundError: missing directory or file, or a repository id that cannot be fetched
            (the message names it, and says when it was offline).
        CheckpointError: unreadable file, unsupported config, or tensors that do not fit the
            model (the message names the file, the keys and expected vs found shapes).
        On any error `model` is left exactly as it was.
    """
    if isinstance(model, cls) or (isinstance(model, nn.Module) and fxlora_present(model)):
        raise TypeError("this model already carries fxlora adapters; add another one with lora_model.load_adapter(directory, name)")
    check_adapter_name(adapter_name)
    files = read_adapter_dir(resolve_adapter_dir(directory, allow_bin, revision=revision, subfolder=subfolder), allow_bin)
    fitted = fit_tensors(files, plan_layout(model, files, adapter_name))
    emit_notes(files.notes)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    snapshot = snapshot_base(model, fitted) | _init_changed_weights(model, fitted, files.config)
    lora_model = cls.adapt(model, files.config.replace(inference_mode=not is_trainable), adapter_name, trace)
    try:
        copy_in(model, fitted)
    except BaseException:
        strip(model)
        restore_requires_grad(model, flags)
        restore_base(model, snapshot)
        raise
    _finish_load(lora_model, adapter_name, is_trainable)
    return lora_model


def load_adapter(
    lm: "LoraModel",
    directory: PathLike,
    adapter_name: str,
    is_trainable: bool = False,
    *,
    allow_bin: bool = False,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
) -> None:
    """Add the adapter saved in `directory` (by fxlora or PEFT) as a new, inactive adapter
    `adapter_name` (activate it with `set_adapter`).

    `directory` (or Hub repository id), `revision` and `subfolder` are as in `from_pretrained`.
    `is_trainable=False` marks the adapter not trainable and puts the model in eval mode
    (as PEFT does); errors are those of `from_pretrained`, and on any error the model is left
    exactly as it was.
    """
    check_adapter_name(adapter_name)
    if adapter_name in lm.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {list(lm.peft_config)}")
    files = read_adapter_dir(resolve_adapter_dir(directory, allow_bin, revision=revision, subfolder=subfolder), allow_bin)
    fitted = fit_tensors(files, plan_layout(lm.model, files, adapter_name))
    check_merged_base(lm, fitted, directory)
    emit_notes(files.notes)
    snapshot = snapshot_base(lm.model, fitted) | _init_changed_weights(lm.model, fitted, files.config)
    with lm.adapter_state.transaction(lm.model) as tx:
        tx.on_undo(lambda: restore_base(lm.model, snapshot))
        lm.add_adapter(adapter_name, files.config.replace(inference_mode=not is_trainable))
        tx.on_undo(lambda: lm.delete_adapter(adapter_name))
        copy_in(lm.model, fitted)
    _finish_load(lm, adapter_name, is_trainable)


def _init_changed_weights(model: nn.Module, fitted: dict, config) -> dict[str, torch.Tensor]:
    """Copies of the base weights the adapter's init will change (PiSSA / OLoRA recompute the
    residual from the base as PEFT does on load), to put back if loading fails."""
    if not changes_base_weights(config.init_lora_weights):
        return {}
    state = model.state_dict(keep_vars=True)
    owners = {key.split(".lora_A.")[0] for key in fitted if ".lora_A." in key}
    return {f"{o}.weight": state[f"{o}.weight"].detach().clone() for o in owners if f"{o}.weight" in state}


def _finish_load(lm: "LoraModel", adapter_name: str, is_trainable: bool) -> None:
    lm.set_trainable_adapter(adapter_name, is_trainable)
    lm.adapter_state.sync_trainable(lm.training, force=True)
    if not is_trainable:
        lm.eval()


