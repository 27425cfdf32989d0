"""Read and write backbone checkpoints in every format Cell-DINO / DINOv2 users have.

Formats read (never unpickling arbitrary objects: `torch.load(weights_only=True)` or safetensors):
- hub format: a plain backbone state dict, chunked keys `blocks.<chunk>.<index>.*` (the released weights);
- training `teacher_checkpoint.pth`: {"teacher": {"backbone.*", "dino_head.*"}};
- `module.` (DDP), `_orig_mod.` (torch.compile), `_fsdp_wrapped_module.` / `_checkpoint_wrapped_module.` prefixes,
  {"model": ...} / {"state_dict": ...} wrappers, whole student/teacher dicts (`teacher.backbone.*` preferred);
- unchunked keys `blocks.<index>.*`;
- celldino safetensors exports (with the model settings in the file's metadata);
- `celldino train` checkpoint directories `checkpoints/iter_<n>/` (torch.distributed.checkpoint, any number of
  saving ranks): only the teacher backbone's tensors are read, the settings come from meta.json's
  "teacher_backbone".

Everything the weights determine is inferred from keys and shapes (arch, patch size, in_chans, img_size from
pos_embed, registers, chunking, FFN type and width, LayerScale, biases); block keys are remapped to whatever
block_chunks the target model uses. Loading is strict: a mismatch raises CheckpointMismatchError listing the
missing, unexpected and wrongly shaped keys. (The reference evaluation loader uses strict=False, which silently
leaves blocks at random init when chunking differs; celldino deliberately does not.)
"""
import contextlib
import json
import logging
import os
import pickle
import re
import warnings

import torch

from celldino.files import atomic_torch_save, atomic_write

from .layers.mlp import swiglu_hidden_features
from .vision_transformer import ARCHS, arch_of, block_prefix, chunk_layout

logger = logging.getLogger("celldino")

_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_UNCHUNKED = re.compile(r"^blocks\.(\d+)\.([^\d].*)$")
_WRAPPERS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
METADATA_FORMAT = "celldino-backbone"


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not hold what was expected."""


class CheckpointMismatchError(CheckpointError, KeyError):
    """The state dict's keys or shapes do not match the model (strict loading)."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# ---- reading ---------------------------------------------------------------------------------------------------------

def _is_safetensors(path):
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_checkpoint(path):
    """(object, metadata dict) from a .pth/.pt/.bin (weights_only), a .safetensors file or a `celldino train`
    checkpoint directory (its teacher backbone only)."""
    path = os.fspath(path)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(path)):
        raise CheckpointError(f"{path}: is a URL; celldino does not download weights: download the file yourself "
                              "and pass its local path")
    if os.path.isdir(path):
        if not _looks_like_dcp(path):
            raise CheckpointError(_directory_message(path))
        return read_dcp_teacher(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors") or _is_safetensors(path):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        return tensors, metadata
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if match is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exception_summary(exc)})") from exc
        if "sharded_tensor" in match.group(1).lower():  # what FSDP1's LOCAL_STATE_DICT saves its flat shards as
            raise CheckpointError(_fsdp_sharded_message(path)) from exc
        raise CheckpointError(
            f"{path}: refusing to load: the file contains a pickled Python object ({match.group(1)}) besides "
            "tensors and plain containers, and celldino only loads checkpoints with torch.load(weights_only=True). "
            "Re-save the weights as a plain state dict (or safetensors) in a trusted environment.") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    return obj, {}


def _fsdp_sharded_message(source):
    return (f"{source}: this is a sharded FSDP training checkpoint (the reference's model_<iter>.rank_<r>.pth: "
            "LOCAL_STATE_DICT flat parameters, tied to the world size), not a model; load the teacher from "
            "eval/training_<iter>/teacher_checkpoint.pth instead")


def _looks_like_dcp(path):
    entries = os.listdir(path)
    return ".metadata" in entries or any(e.endswith(".distcp") for e in entries)


def _directory_message(path):
    """What to say for a directory that is not a DCP checkpoint: what was expected, and the checkpoint files it
    holds (e.g. eval/training_<n>/ given instead of its teacher_checkpoint.pth)."""
    entries = os.listdir(path)
    inside = sorted(e for e in entries if e.endswith((".pth", ".pt", ".safetensors")))
    # the checkpoints/ folder itself (or the output directory) given: name its newest iter_<n>/
    runs = sorted(e for e in entries if ITER_DIR.match(e))
    if not runs and os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        runs = sorted(os.path.join(CHECKPOINT_DIR, e) for e in os.listdir(os.path.join(path, CHECKPOINT_DIR))
                      if ITER_DIR.match(e))
    text = (f"{path} is a directory but not a training checkpoint directory (no DCP .metadata / *.distcp files); "
            "expected a checkpoint file (a hub .pth, a training teacher_checkpoint.pth, a state dict or a celldino "
            ".safetensors export) or a `celldino train` checkpoints/iter_<n>/ directory")
    if runs:
        text += f"; the newest training checkpoint in it is {os.path.join(path, runs[-1])}"
    if inside:
        text += f"; it holds {', '.join(os.path.join(path, e) for e in inside[:4])}"
    return text


# ---- training checkpoint directories (torch.distributed.checkpoint) -------------------------------------------------
# The layout `celldino train` writes (celldino/train/checkpointing.py) and this module reads, defined once here
# because models must not import train.

CHECKPOINT_DIR = "checkpoints"              # <output dir>/checkpoints/iter_<iteration:08d>/
ITER_DIR = re.compile(r"^iter_(\d+)$")
DCP_STATE_KEY = "train"                     # dcp.save({DCP_STATE_KEY: TrainState}): keys train.model.*, train.optim.*
DCP_TRAIN_PREFIX = f"{DCP_STATE_KEY}.model."
DCP_TEACHER_MARKER = "teacher.backbone."


def is_complete_checkpoint_dir(path):
    """A checkpoint directory whose save finished: DCP's .metadata and celldino's meta.json are both written."""
    return os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(os.path.join(path, ".metadata"))


@contextlib.contextmanager
def dcp_single_process_quiet():
    """DCP warns on every single-process save/load that it assumes a single process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def exception_summary(exc, limit=300):
    """'Type: message' in one line for a log or an error. DCP's CheckpointException (a header line and each rank's
    traceback, sometimes of an exception without a message) is summarised by its first failing rank's exception;
    of a multi-line message, the last line that names an error (torch.load's weights-only explanation ends with a
    link to the docs) or else the first line."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (cause, _) = min(failures.items(), key=lambda item: item[0])
        return f"{type(exc).__name__} on rank {rank}: {exception_summary(cause, limit)}"[:limit]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if _NAMES_AN_ERROR.search(line)]
    text = named[-1] if named else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}"[:limit] if text else type(exc).__name__


_NAMES_AN_ERROR = re.compile(r"\b\w*(Error|error|Exception)\b[^:]*:")


def _dcp_teacher_keys(state_dict_metadata, path):
    """{checkpoint key: backbone key} of the teacher backbone tensors. `celldino train` saves
    dcp.save({"train": TrainState}) with TrainState = {"model": SSLMetaArch state dict, "optim": ...}, so the
    flattened keys are train.model.teacher.backbone.<name>; another single prefix before teacher.backbone. is
    accepted too."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    by_prefix = {}
    for fqn, meta in state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        head, marker, name = _strip_wrappers(fqn).partition(DCP_TEACHER_MARKER)
        if marker and (head == "" or head.endswith(".")):
            by_prefix.setdefault(head, {})[fqn] = name
    if DCP_TRAIN_PREFIX in by_prefix:  # (optimizer-state keys can contain a model key too: never the teacher's)
        return by_prefix[DCP_TRAIN_PREFIX]
    if len(by_prefix) != 1:
        found = sorted({".".join(k.split(".")[:3]) for k in state_dict_metadata})
        what = "no" if not by_prefix else f"several ({sorted(by_prefix)})"
        raise CheckpointError(f"{path}: DCP checkpoint with {what} teacher backbone ({DCP_TEACHER_MARKER}*) "
                              f"tensors; expected a `celldino train` checkpoints/iter_<n>/ directory (keys "
                              f"{DCP_TRAIN_PREFIX}{DCP_TEACHER_MARKER}*), found keys starting with {found[:10]}")
    return next(iter(by_prefix.values()))


def _dcp_backbone_settings(path):
    """The "teacher_backbone" settings of the checkpoint's meta.json as (encoded) export metadata; {} for older
    checkpoints, whose settings are then inferred from the shapes."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        logger.warning("%s: no meta.json; inferring the backbone settings from the weights", path)
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("%s: unreadable (%s); inferring the backbone settings from the weights", meta_path, exc)
        return {}
    settings = meta.get("teacher_backbone") if isinstance(meta, dict) else None
    return encode_metadata(settings) if isinstance(settings, dict) else {}


def read_dcp_teacher(path):
    """({"teacher.backbone.<name>": tensor}, metadata) from a `celldino train` checkpoint directory.

    Reads only the teacher backbone: its tensors are allocated full-size from the DCP metadata and filled by one
    single-process dcp.load (no_dist), which reassembles the shards of however many ranks saved it. The optimizer
    state and the student are never read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path}: incomplete training checkpoint directory: shard files (*.distcp) but no DCP "
                              ".metadata (an interrupted save?); use an older checkpoints/iter_<n>/ directory")
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a damaged .metadata can fail in pickle, EOF, ...
        raise CheckpointError(f"{path}: damaged training checkpoint: cannot read its DCP .metadata "
                              f"({exception_summary(exc)})") from exc
    keys = _dcp_teacher_keys(metadata.state_dict_metadata, path)
    tensors = {fqn: torch.empty(metadata.state_dict_metadata[fqn].size,
                                dtype=metadata.state_dict_metadata[fqn].properties.dtype) for fqn in keys}
    try:
        with dcp_single_process_quiet():
            dcp.load(tensors, checkpoint_id=path, no_dist=True)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's error is a BaseException
        raise CheckpointError(f"{path}: damaged training checkpoint: cannot read the teacher backbone "
                              f"({exception_summary(exc)})") from exc
    backbone = {DCP_TEACHER_MARKER + name: tensors[fqn] for fqn, name in keys.items()}
    return backbone, _dcp_backbone_settings(path)


def _strip_wrappers(key):
    while key.startswith("module."):
        key = key[len("module."):]
    for wrapper in _WRAPPERS:
        key = key.replace(wrapper, "")
    return key


def _flat_state_dict(obj, source):
    """Descend through {"teacher"|"model"|"state_dict": ...} wrappers to a {name: tensor} mapping."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            return obj
        for wrapper in ("teacher", "model", "state_dict", "module"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
        else:
            tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
            if tensors:
                skipped = sorted(k for k in obj if k not in tensors)
                logger.warning("%s: ignoring non-tensor entries %s", source, skipped[:10])
                return tensors
            break
    kind = type(obj).__name__
    keys = sorted(map(str, obj))[:10] if isinstance(obj, dict) else []
    raise CheckpointError(f"{source}: no state dict found (top level is a {kind} with keys {keys}); expected a "
                          "backbone state dict, a {'teacher': {...}} training checkpoint or a safetensors export")


def split_state_dict(obj, source="checkpoint"):
    """(backbone state dict, head state dict or None) from any supported checkpoint object."""
    flat = {_strip_wrappers(k): v for k, v in _flat_state_dict(obj, source).items()}
    if any("_flat_param" in k or k.startswith("_fsdp") for k in flat):
        raise CheckpointError(_fsdp_sharded_message(source))
    for prefix in ("teacher.backbone.", "backbone.", "student.backbone."):
        if any(k.startswith(prefix) for k in flat):
            if prefix == "student.backbone.":
                logger.warning("%s: no teacher weights, using the student backbone", source)
            backbone = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            head_prefix = prefix.replace("backbone.", "dino_head.")
            head = {k[len(head_prefix):]: v for k, v in flat.items() if k.startswith(head_prefix)} or None
            return backbone, head
    return flat, None


def read_checkpoint_metadata(path):
    """The model settings a checkpoint records, without reading its tensors: a celldino .safetensors file's
    metadata, a training checkpoint directory's meta.json "teacher_backbone"; {} for formats that record none
    (.pth state dicts) and for unreadable files (reading the checkpoint itself reports those)."""
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            return decode_metadata(_dcp_backbone_settings(path)) if _looks_like_dcp(path) else {}
        if os.path.isfile(path) and (path.endswith(".safetensors") or _is_safetensors(path)):
            return safetensors_metadata(path)
    except Exception:  # noqa: BLE001 - a damaged file: the full read names the problem
        return {}
    return {}


def safetensors_metadata(path):
    """The decoded model settings in a .safetensors file's header (its tensors are not read)."""
    from safetensors import safe_open
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        return decode_metadata(dict(f.metadata() or {}))


def load_backbone_state_dict(path):
    """(backbone state dict, metadata) of a checkpoint file in any supported format."""
    obj, metadata = read_checkpoint(path)
    backbone, _ = split_state_dict(obj, source=os.fspath(path))
    return backbone, decode_metadata(metadata)


# ---- block key remapping ---------------------------------------------------------------------------------------------

def block_index(key):
    """(global block index, rest of the key) for a block key in either layout, else None."""
    match = _CHUNKED.match(key)
    if match:
        return int(match.group(2)), match.group(3)
    match = _UNCHUNKED.match(key)
    if match:
        return int(match.group(1)), match.group(2)
    return None


def remap_block_keys(state_dict, block_chunks, depth=None):
    """The state dict with block keys rewritten for `block_chunks` (0 = unchunked `blocks.<i>.*`)."""
    if depth is None:
        indices = [parsed[0] for parsed in map(block_index, state_dict) if parsed]
        depth = max(indices) + 1 if indices else 0
    chunk_of = chunk_layout(depth, block_chunks)
    out = {}
    for key, value in state_dict.items():
        parsed = block_index(key)
        if parsed is not None and parsed[0] < depth:
            key = f"{block_prefix(parsed[0], chunk_of)}.{parsed[1]}"
        out[key] = value
    return out


# ---- inference -------------------------------------------------------------------------------------------------------

def _infer_mlp_ratio(embed_dim, hidden, swiglu):
    candidates = [4.0, hidden / embed_dim, hidden * 3 / (2 * embed_dim)]
    for ratio in candidates:
        width = int(embed_dim * ratio)
        if (swiglu_hidden_features(width) if swiglu else width) == hidden:
            return ratio
    raise CheckpointError(f"cannot find an mlp_ratio giving a hidden width of {hidden} for embed dim {embed_dim}")


def infer_model_kwargs(state_dict, source="checkpoint"):
    """DinoVisionTransformer kwargs (plus "arch", None for a non-standard size) implied by a backbone state dict.

    num_heads cannot be read from the weights: it is the arch's for the standard sizes and absent otherwise.
    """
    def need(key):
        if key not in state_dict:
            raise CheckpointError(f"{source}: not a DINOv2 ViT backbone state dict: key {key!r} is missing "
                                  f"(found e.g. {sorted(state_dict)[:8]})")
        return state_dict[key]

    proj = need("patch_embed.proj.weight")
    if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has shape {tuple(proj.shape)}, expected "
                              "[embed_dim, in_chans, patch, patch]")
    embed_dim, in_chans, patch_size = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    n_pos = int(need("pos_embed").shape[1]) - 1
    grid = int(round(n_pos ** 0.5))
    if grid * grid != n_pos:
        raise CheckpointError(f"{source}: pos_embed has {n_pos} patch positions, not a square grid")
    registers = state_dict.get("register_tokens")

    blocks = {}
    chunk_of_block = {}
    for key in state_dict:
        parsed = block_index(key)
        if parsed is None:
            continue
        blocks.setdefault(parsed[0], set()).add(parsed[1])
        match = _CHUNKED.match(key)
        if match:
            chunk_of_block[parsed[0]] = int(match.group(1))
    if not blocks:
        raise CheckpointError(f"{source}: no transformer block keys (blocks.*) found")
    depth = max(blocks) + 1
    missing_blocks = sorted(set(range(depth)) - set(blocks))
    if missing_blocks:
        raise CheckpointError(f"{source}: blocks {missing_blocks} are missing (depth {depth} from the largest index)")

    block_chunks = 0
    if chunk_of_block:
        observed = [chunk_of_block.get(i) for i in range(depth)]
        n_chunks = len(set(chunk_of_block.values()))
        block_chunks = n_chunks  # loading remaps anyway; prefer a value that reproduces the file's layout
        for candidate in [n_chunks] + list(range(1, depth + 1)):
            if chunk_layout(depth, candidate) == observed:
                block_chunks = candidate
                break

    names = blocks[0]
    if "mlp.fc1.weight" in names:
        ffn_layer = "mlp"
        mlp_ratio = _infer_mlp_ratio(embed_dim, int(state_dict[f"{_first_block(state_dict)}.mlp.fc1.weight"].shape[0]),
                                     swiglu=False)
        ffn_bias = "mlp.fc1.bias" in names
    elif "mlp.w12.weight" in names:
        ffn_layer = "swiglufused"
        hidden = int(state_dict[f"{_first_block(state_dict)}.mlp.w12.weight"].shape[0]) // 2
        mlp_ratio = _infer_mlp_ratio(embed_dim, hidden, swiglu=True)
        ffn_bias = "mlp.w12.bias" in names
    else:
        ffn_layer, mlp_ratio, ffn_bias = "identity", 4.0, True

    kwargs = dict(
        img_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
        mlp_ratio=mlp_ratio, qkv_bias="attn.qkv.bias" in names, proj_bias="attn.proj.bias" in names,
        ffn_bias=ffn_bias, ffn_layer=ffn_layer, block_chunks=block_chunks,
        init_values=1.0 if "ls1.gamma" in names else None,  # the value is overwritten by the loaded gamma
        num_register_tokens=int(registers.shape[1]) if registers is not None else 0,
    )
    kwargs["arch"] = arch_of(embed_dim, depth)
    if kwargs["arch"] is not None:
        kwargs["num_heads"] = ARCHS[kwargs["arch"]]["num_heads"]
    return kwargs


def _first_block(state_dict):
    for key in state_dict:
        parsed = block_index(key)
        if parsed is not None and parsed[0] == 0:
            return key[: len(key) - len(parsed[1]) - 1]
    raise CheckpointError("no block 0 keys")


# ---- strict loading --------------------------------------------------------------------------------------------------

def _listing(title, items, limit=20):
    items = list(items)
    if not items:
        return []
    shown = ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
    return [f"  {title} ({len(items)}): {shown}"]


def load_state_dict_strict(model, state_dict, source="checkpoint", assign=False):
    """Remap block keys to the model's chunking, then load strictly; a mismatch lists every problem.

    assign=True (for a model built on the meta device, which skips the random init) makes the loaded tensors,
    cast to the model's dtypes, the parameters."""
    if hasattr(model, "n_blocks") and hasattr(model, "config"):
        state_dict = remap_block_keys(state_dict, model.config["block_chunks"], model.n_blocks)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} checkpoint {list(state_dict[k].shape)} vs model {list(v.shape)}"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        lines = [f"{source}: the state dict does not match the {type(model).__name__} "
                 f"(strict loading; celldino never silently skips weights):"]
        lines += _listing("missing keys", missing) + _listing("unexpected keys", unexpected)
        lines += _listing("shape mismatches", shapes)
        raise CheckpointMismatchError("\n".join(lines))
    if assign:
        state_dict = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model


# ---- writing ---------------------------------------------------------------------------------------------------------

def encode_metadata(values):
    """safetensors metadata must be str -> str: JSON-encode every value."""
    return {"format": METADATA_FORMAT, **{k: json.dumps(v) for k, v in values.items()}}


def decode_metadata(metadata):
    out = {}
    for key, value in (metadata or {}).items():
        if key == "format":
            continue
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def _plain_tensors(state_dict):
    # contiguous, unshared CPU copies: safetensors refuses shared storage and views
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def backbone_export_metadata(backbone, **extra):
    """What every celldino safetensors export (and a training checkpoint's meta.json) records about a backbone:
    its ARCHS name (None for custom sizes), every constructor setting, the celldino version, and `extra`."""
    config = dict(backbone.config)
    meta = {"arch": arch_of(config["embed_dim"], config["depth"], config["num_heads"]), **config}
    try:
        from importlib.metadata import version
        meta["celldino_version"] = version("celldino")
    except Exception:  # noqa: BLE001 - running from a source tree that was never installed
        pass
    meta.update(extra)
    return meta


def save_safetensors(state_dict, path, metadata=None):
    from safetensors.torch import save_file
    tensors = _plain_tensors(state_dict)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=encode_metadata(metadata or {})))
    return path


def save_pth(state_dict, path):
    return atomic_torch_save(_plain_tensors(state_dict), path)
