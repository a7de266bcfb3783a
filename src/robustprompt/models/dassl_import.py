"""Importing prompt checkpoints of the Dassl-based research code (CoOp, MaPLe, FAP).

Their trainers save ``<output>/<model name>/model.pth.tar-<epoch>`` (and ``model-best.pth.tar``):
a dict ``{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}``. CoOp registers only
its prompt learner, so its keys are bare (``ctx``); MaPLe and FAP register the whole CustomCLIP,
so their keys carry ``prompt_learner.`` and the state dict also holds the frozen CLIP
(``image_encoder.*``, ``text_encoder.*``, ``logit_scale``; FAP forks also ``normalize.*``). A
``module.`` prefix (DataParallel) is removed first. Key mapping (theirs → ours, the names of
`PromptLearner.state_dict()`; D is the prompt depth, i = 0 … D−2):

    layout  coupling  their key (shape)                                    our key
    coop    text      ctx (n_ctx×d_t)                                      text_ctx.0
    maple   coupled   prompt_learner.ctx (n_ctx×d_t)                       text_ctx.0
                      prompt_learner.proj.{weight (d_v×d_t), bias}         t2v.0.{weight, bias}
                      prompt_learner.compound_prompts_text.i (n_ctx×d_t)   text_ctx.(i+1)
                      prompt_learner.compound_prompt_projections.i.*       t2v.(i+1).*
    fap     fap       prompt_learner.ctx (n_ctx×d_t)                       text_ctx.0
                      prompt_learner.proj.{weight (d_v×d_t), bias}         t2v.0.{weight, bias}
                      prompt_learner.compound_prompts_image.i (n_ctx×d_v)  vision_ctx.i
                      prompt_learner.compound_prompt_projections.i.*       v2t.i.*  (weight d_t×d_v)
    all               token_prefix, token_suffix (class-prompt embeddings) dropped, after checking them
    maple, fap        image_encoder.*, text_encoder.*, logit_scale         dropped, after comparing them
                                                                           with the chosen backbone

What the released forwards compute, and why these couplings reproduce it: block 0 of the text
tower gets ``ctx`` after SOS (positional embeddings added), block 0 of the vision tower gets
``proj(ctx)`` appended after the patches (after the positional embedding, before ln_pre); at
block b = 1 … D−1 the prompt tokens are replaced by the (b−1)-th deep prompt of each tower —
MaPLe: text ``compound_prompts_text[b−1]``, vision ``compound_prompt_projections[b−1]`` of it;
FAP: vision ``compound_prompts_image[b−1]``, text ``compound_prompt_projections[b−1]`` of it
(FAP's code keeps block 0 t→v: our ``fap`` coupling, not the paper's all-v→t ``coupled-v2t``).

The class-prompt text (what stays fixed around the context) is not in the weights; the layouts'
rules fix it from the trainer's configuration, which `text_settings` restates:
  * CoOp: CTX_INIT "" → "X … X {class}." (``placeholder``); CTX_INIT "a photo of a" → n_ctx is its
    word count and the prompt is "a photo of a {class}." with the first n_ctx tokens learned
    (``phrase``).
  * MaPLe: ``phrase`` with CTX_INIT (its configs: "a photo of a", so n_ctx 2 reads
    "<c1> <c2> of a {class}."), ``placeholder`` when CTX_INIT is empty or n_ctx > 4.
  * FAP: CTX_INIT is the dataset's template (CUSTOM_TEMPLATES, '{}' kept verbatim: ``template``),
    ``placeholder`` when n_ctx > 4.
The checkpoint keeps the embeddings of those prompts (``token_prefix``: SOS, ``token_suffix``: the
tokens after the context, per class): the importer compares them with what the chosen backbone,
class names and text settings give, and refuses a mismatch (``verify=False`` skips the checks).

Reading is data only: ``torch.load(weights_only=True)``, passed explicitly. Dassl's warm-up LR
scheduler stores its successor scheduler — with the optimizer inside it — as a pickled object in
the ``scheduler`` entry, which weights-only loading refuses; the few optimizer and scheduler class
names such bookkeeping entries hold are bound to an inert placeholder (`_Discarded`) that runs no
code and keeps nothing. Any other Python object in the file is refused in one line.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch.torch_version import TorchVersion

from ..errors import ConfigError, ModelError, RobustPromptError
from ..messages import one_line, quote
from .backbone import Backbone
from .prompts import PromptConfig
from .safe_archive import checkpoint_kind, first_non_finite, read_safetensors

LAYOUTS = ("coop", "maple", "fap")
COUPLING_OF = {"coop": "text", "maple": "coupled", "fap": "fap"}
METHOD_OF = {"coop": "coop", "maple": "maple", "fap": "fap"}
MAPLE_CTX_INIT = "a photo of a"      # CTX_INIT of MaPLe's released configs
PHRASE_MAX_CTX = 4                   # MaPLe/FAP: the init phrase is used only when n_ctx <= 4
DEFAULT_TEMPLATE = "a photo of a {}."

_BUFFERS = ("token_prefix", "token_suffix")
_PROMPT_ROOTS = ("ctx", "proj", "compound_prompts_text", "compound_prompts_image",
                 "compound_prompt_projections", *_BUFFERS)
_DEEP_KEY = {"maple": "compound_prompts_text", "fap": "compound_prompts_image"}

# Class names an optimizer / LR scheduler object is pickled under in Dassl checkpoints
# (dassl.optim.build_optimizer and build_lr_scheduler's choices, as torch and Dassl name them).
_BOOKKEEPING_GLOBALS = (
    "torch.optim.sgd.SGD", "torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "torch.optim.rmsprop.RMSprop",
    "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR", "dassl.optim.radam.RAdam", "dassl.optim.radam.PlainRAdam",
    "dassl.optim.radam.AdamW", "dassl.optim.lr_scheduler.ConstantWarmupScheduler",
    "dassl.optim.lr_scheduler.LinearWarmupScheduler",
    "builtins.dict",   # an optimizer state's defaultdict factory (only ever given to `_plain_dict`)
)


class _Discarded:
    """Stands in for an optimizer or LR-scheduler object pickled in a checkpoint's bookkeeping
    entries. Creating, calling or filling one runs no code — neither the file's nor torch's
    optimizer code — and nothing it is given is kept."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Discarded":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _plain_dict(*args: Any) -> dict:
    """Stands in for ``collections.defaultdict`` (an optimizer's per-parameter state): an empty
    dict, which the unpickler may fill, and which only ever lands in a discarded object."""
    return {}


# ---------------------------------------------------------------------------- reading the file
def _load_pickle(path: Path) -> Any:
    """torch.load(weights_only=True) — passed explicitly, so no environment variable can turn it
    off — with the bookkeeping class names bound to `_Discarded` (torch >= 2.6 takes such
    (object, name) pairs; an older torch refuses those entries like any other object)."""
    if hasattr(torch.serialization, "safe_globals") and TorchVersion(torch.__version__) >= "2.6":
        stand_ins = [(_Discarded, name) for name in _BOOKKEEPING_GLOBALS]
        with torch.serialization.safe_globals([*stand_ins, (_plain_dict, "collections.defaultdict")]):
            return _torch_load(path)
    return _torch_load(path)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = (re.search(r"Unsupported global: GLOBAL (\S+)", text)
                 or re.search(r"unsupported GLOBAL (\S+) whose module", text)
                 or re.search(r"(?:for|build) (?:unrecognized function )?(<[^>]*>)", text))
        if found:
            raise ModelError(f"{path} holds a Python object that only running its code could rebuild "
                             f"({one_line(found.group(1), 120)}), so it was not loaded: a Dassl checkpoint holds "
                             "tensors, numbers and optimizer/scheduler state only") from None
        reason = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        raise ModelError(f"cannot read checkpoint {path}: truncated or corrupt pickle "
                         f"({one_line(reason.group(1) if reason else text, 160)})") from None
    except Exception as exc:   # EOFError, the zip reader's RuntimeError, …: a damaged file
        raise ModelError(f"cannot read checkpoint {path}: truncated or corrupt file "
                         f"({type(exc).__name__}: {one_line(str(exc).split('. ')[0], 160)})") from None


def read_dassl_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Optional[int]]:
    """(state dict with any ``module.`` prefix removed, epoch or None) of a Dassl checkpoint, or of
    a bare state dict (``.pth``/``.pt`` or ``.safetensors``). Every problem is a one-line ModelError."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory (give the model.pth.tar-N file inside it)" if path.is_dir() else "does not exist"
        raise ModelError(f"checkpoint {path} {what}")
    try:
        kind = checkpoint_kind(path)
    except OSError as exc:
        raise ModelError(f"cannot read checkpoint {path}: {one_line(exc.strerror or exc)}") from None
    if kind == "safetensors":
        return _strip_module(read_safetensors(path)), None
    if kind == "torchscript":
        raise ModelError(f"checkpoint {path} is a TorchScript archive, not a Dassl prompt checkpoint "
                         "(model.pth.tar-N)")
    if kind not in ("zip", "pickle"):
        from .safe_archive import read_checkpoint

        read_checkpoint(path)   # raises its one-line message for an empty, truncated or foreign file
        raise ModelError(f"cannot read checkpoint {path}: not a PyTorch checkpoint")
    obj = _load_pickle(path)
    epoch = None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        epoch = obj.get("epoch") if type(obj.get("epoch")) is int else None
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelError(f"checkpoint {path} holds a {type(obj).__name__}, not a Dassl checkpoint "
                         "(a dict with 'state_dict') or a state dict")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ModelError(f"checkpoint {path}: state_dict entry {quote(k, 80)} is a {type(v).__name__}, "
                             "not a tensor")
    return _strip_module(dict(obj)), epoch


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(prompt-learner entries, with ``prompt_learner.`` removed; everything else: the frozen CLIP)."""
    prompt, other = {}, {}
    for key, value in state.items():
        if key.startswith("prompt_learner."):
            prompt[key[len("prompt_learner."):]] = value
        elif key.split(".")[0] in _PROMPT_ROOTS:
            prompt[key] = value
        else:
            other[key] = value
    return prompt, other


def detect_layout(prompt_keys: Sequence[str], where: str) -> str:
    """coop (only ``ctx``), maple (``compound_prompts_text``), fap (``compound_prompts_image``).
    A shallow MaPLe and a shallow FAP (``ctx`` + ``proj``, no deep prompts) compute the same
    thing; they are read as maple."""
    roots = {k.split(".")[0] for k in prompt_keys} - set(_BUFFERS)
    if "ctx" not in roots:
        raise ModelError(f"{where} holds no prompt context ('ctx' or 'prompt_learner.ctx'): it is not a "
                         "CoOp, MaPLe or FAP checkpoint")
    if "compound_prompts_image" in roots:
        return "fap"
    if "compound_prompts_text" in roots or "proj" in roots:
        return "maple"
    return "coop"


# ---------------------------------------------------------------------------- the key mapping
def key_mapping(layout: str, depth: int) -> list[tuple[str, str]]:
    """(their key without ``prompt_learner.``, our key) for every tensor of a layout of `depth` blocks."""
    if layout == "coop":
        return [("ctx", "text_ctx.0")]
    pairs = [("ctx", "text_ctx.0"), ("proj.weight", "t2v.0.weight"), ("proj.bias", "t2v.0.bias")]
    for i in range(depth - 1):
        if layout == "maple":
            pairs += [(f"compound_prompts_text.{i}", f"text_ctx.{i + 1}"),
                      (f"compound_prompt_projections.{i}.weight", f"t2v.{i + 1}.weight"),
                      (f"compound_prompt_projections.{i}.bias", f"t2v.{i + 1}.bias")]
        else:
            pairs += [(f"compound_prompts_image.{i}", f"vision_ctx.{i}"),
                      (f"compound_prompt_projections.{i}.weight", f"v2t.{i}.weight"),
                      (f"compound_prompt_projections.{i}.bias", f"v2t.{i}.bias")]
    return pairs


def _depth(layout: str, keys: Sequence[str]) -> int:
    if layout == "coop":
        return 1
    # counted, not read off the largest index: a gap or a stray index then shows as missing/extra
    pattern = re.compile(rf"{_DEEP_KEY[layout]}\.\d+$")
    return 1 + sum(1 for k in keys if pattern.match(k))


def convert(prompt_state: Mapping[str, torch.Tensor], layout: str, where: str
            ) -> tuple[int, int, dict[str, torch.Tensor]]:
    """(n_ctx, depth, our state dict in float32) from a layout's prompt-learner entries; the
    buffers are ignored here. Missing, extra or class-specific entries are one-line ModelErrors."""
    tensors = {k: v for k, v in prompt_state.items() if k not in _BUFFERS}
    ctx = tensors.get("ctx")
    if ctx is None:
        raise ModelError(f"{where} has no 'ctx' entry: it is not a {layout} checkpoint")
    if ctx.dim() == 3:
        raise ModelError(f"{where}: ctx has shape {tuple(ctx.shape)}: class-specific contexts (CoOp's CSC) "
                         "have no counterpart here; only a context shared by all classes (n_ctx×d) imports")
    if ctx.dim() != 2 or ctx.shape[0] < 1:
        raise ModelError(f"{where}: ctx has shape {tuple(ctx.shape)}, expected n_ctx×d")
    depth = _depth(layout, list(tensors))
    pairs = key_mapping(layout, depth)
    theirs = {t for t, _ in pairs}
    missing = [t for t, _ in pairs if t not in tensors]
    extra = sorted(set(tensors) - theirs)
    if missing or extra:
        names = lambda ks: ", ".join(one_line(k, 60) for k in ks[:3])   # noqa: E731 (keys come from the file)
        raise ModelError(f"{where} is not a complete {layout} prompt learner of depth {depth}: "
                         + (f"{len(missing)} missing entries (e.g. {names(missing)})" if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"{len(extra)} entries a {layout} prompt learner does not have (e.g. {names(extra)})"
                            if extra else ""))
    for t, _ in pairs:
        if not tensors[t].is_floating_point():
            raise ModelError(f"{where}: {one_line(t, 80)} holds {tensors[t].dtype} values, not floating-point prompts")
    state = {ours: tensors[t].detach().to(torch.float32).clone() for t, ours in pairs}
    bad = first_non_finite(state)
    if bad is not None:
        their = next(t for t, ours in pairs if ours == bad)
        raise ModelError(f"{where}: {their} holds non-finite values (NaN or inf, or beyond float32's range); "
                         "refusing to import it (did that training diverge?)")
    return int(ctx.shape[0]), depth, state


def text_settings(layout: str, n_ctx: int, ctx_init: Optional[str], where: str) -> tuple[Optional[str], str]:
    """(text_init, text_init_mode) the layout's trainer used for this n_ctx and CTX_INIT.
    ctx_init None: the layout's released default (CoOp "", MaPLe "a photo of a", FAP the
    dataset's template)."""
    phrase = ctx_init.replace("_", " ") if ctx_init else ctx_init   # the trainers' own replace
    if layout == "coop":
        if not phrase:
            return None, "placeholder"
        words = len(phrase.split(" "))
        if words != n_ctx:
            raise ConfigError(f"--ctx-init {quote(phrase, 80)} has {words} words, but CoOp sets n_ctx to the "
                              f"word count and the context in {where} has {n_ctx} tokens")
        return phrase, "phrase"
    if n_ctx > PHRASE_MAX_CTX:
        return None, "placeholder"
    if layout == "maple":
        phrase = MAPLE_CTX_INIT if ctx_init is None else phrase
        return (phrase, "phrase") if phrase else (None, "placeholder")
    if ctx_init is None:
        return None, "template"
    return (phrase, "phrase") if phrase else (None, "placeholder")


# ---------------------------------------------------------------------------- checks
@dataclass
class ImportedPrompts:
    """Prompts read from a Dassl checkpoint: the layout, the prompt configuration they need, the
    tensors under our names (float32), the checkpoint's epoch, and what was checked."""

    layout: str
    prompt: PromptConfig
    state: dict[str, torch.Tensor]
    epoch: Optional[int]
    checks: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def _check_fits_backbone(backbone: Backbone, layout: str, n_ctx: int, depth: int,
                         state: Mapping[str, torch.Tensor], where: str) -> PromptConfig:
    """The prompt configuration for `backbone`, refusing (one line) a depth or any tensor shape
    the backbone cannot take. Shapes come from our own PromptLearner on that backbone."""
    from .prompted_clip import PromptedCLIP

    cfg = PromptConfig(coupling=COUPLING_OF[layout], n_ctx=n_ctx, depth=depth, text_init=None)
    try:
        learner = PromptedCLIP(backbone.model, None, cfg).prompt
    except RobustPromptError as exc:
        raise ModelError(f"{where} does not fit {backbone.name}: {one_line(exc, 300)}") from None
    own = learner.state_dict()
    theirs = {ours: t for t, ours in key_mapping(layout, depth)}
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ModelError(f"{where}: {theirs[key]} has shape {tuple(tensor.shape)}, but {backbone.name} needs "
                             f"{tuple(own[key].shape)} there: the checkpoint was trained on another backbone "
                             "(choose it with --model)")
    return cfg


def _class_prompt_ids(backbone: Backbone, classnames: Sequence[str], cfg: PromptConfig,
                      template: str) -> torch.Tensor:
    """Token ids K×L of the class prompts a classifier with `cfg` feeds the text tower."""
    from .classifier import context_token_ids, prompt_texts

    phrase = None if cfg.text_init_mode == "placeholder" else cfg.init_phrase(template)
    return context_token_ids(backbone.tokenizer, prompt_texts(classnames, [template], cfg.n_ctx, phrase), cfg.n_ctx)


def check_class_prompts(buffers: Mapping[str, torch.Tensor], backbone: Backbone, classnames: Sequence[str],
                        cfg: PromptConfig, template: str, where: str) -> str:
    """Compare the checkpoint's token_prefix (SOS) and token_suffix (the tokens after the context)
    with the embeddings of our class prompts on `backbone`: a mismatch means another tokenizer or
    token embedding (backbone), other class names, or other fixed prompt words (--ctx-init)."""
    if not buffers:
        return "absent (not checked)"
    text = backbone.model.text if hasattr(backbone.model, "text") else backbone.model
    embed = getattr(text, "token_embedding", None)
    if embed is None:
        return "not comparable with this backbone's text tower (not checked)"
    ids = _class_prompt_ids(backbone, classnames, cfg, template)
    with torch.no_grad():
        ours = embed(ids.to(embed.weight.device)).cpu()
    expected = {"token_prefix": ours[:, :1], "token_suffix": ours[:, 1 + cfg.n_ctx:]}
    for name in _BUFFERS:
        got = buffers.get(name)
        if got is None:
            continue
        want = expected[name]
        if got.shape != want.shape:
            raise ModelError(f"{where}: its {name} has shape {tuple(got.shape)} but {len(classnames)} class "
                             f"prompts on {backbone.name} give {tuple(want.shape)}: other class names "
                             "(--dataset/--classnames-file), another text context length or another backbone")
        close = torch.isclose(got.float(), want.to(got.dtype).float(), rtol=1e-3, atol=1e-5).flatten(1).all(1)
        if not bool(close.all()):
            i = int((~close).nonzero()[0])
            if name == "token_prefix":
                raise ModelError(f"{where}: its token_prefix (the start token's embedding) differs from "
                                 f"{backbone.name}'s: the prompts were trained on another backbone "
                                 "(--model/--pretrained), or pass --no-verify")
            raise ModelError(f"{where}: its token_suffix for class {i} ({quote(classnames[i], 60)}) differs from "
                             f"the prompt {quote(_show_prompt(cfg, template, classnames[i]), 100)}: other class "
                             "names or order (--dataset/--classnames-file), other fixed words (--ctx-init), or "
                             "another backbone; or pass --no-verify")
    return f"matched {len(classnames)} class prompts"


def _show_prompt(cfg: PromptConfig, template: str, classname: str) -> str:
    from .classifier import prompt_texts

    phrase = None if cfg.text_init_mode == "placeholder" else cfg.init_phrase(template)
    return prompt_texts([classname], [template], cfg.n_ctx, phrase)[0]


# their CustomCLIP attribute → open_clip CLIP attribute (the OpenAI-style layouts share the rest)
_BACKBONE_PREFIXES = (("image_encoder.", "visual."), ("text_encoder.transformer.", "transformer."),
                      ("text_encoder.positional_embedding", "positional_embedding"),
                      ("text_encoder.ln_final.", "ln_final."),
                      ("text_encoder.text_projection", "text_projection"), ("logit_scale", "logit_scale"))


def check_backbone_weights(other: Mapping[str, torch.Tensor], backbone: Backbone, where: str) -> str:
    """Compare the frozen CLIP weights a MaPLe/FAP checkpoint carries with `backbone`'s (in the
    checkpoint's precision): prompts only mean something on the weights they were trained on."""
    own = backbone.model.state_dict()
    compared = 0
    for key, theirs in other.items():
        ours_key = next((o + key[len(t):] for t, o in _BACKBONE_PREFIXES if key.startswith(t)), None)
        if ours_key is None or ours_key not in own:
            continue
        ours = own[ours_key].detach().cpu()
        if ours.shape != theirs.shape and ours.numel() == theirs.numel() == 1:
            ours = ours.reshape(theirs.shape)
        same = ours.shape == theirs.shape and bool(torch.allclose(
            theirs.float(), ours.to(theirs.dtype).float(), rtol=1e-3, atol=1e-5))
        if not same:
            raise ModelError(f"{where}: its frozen CLIP weights differ from {backbone.name} "
                             f"(weights {quote(backbone.weights, 80)}) at {one_line(key, 80)}: the prompts were "
                             "trained on another backbone (e.g. a robust TeCoA/FARE encoder); load that one with "
                             "--model/--pretrained, or pass --no-verify")
        compared += 1
    return f"matched {compared} tensors" if compared else "absent (not checked)"


# ---------------------------------------------------------------------------- the import
def import_dassl(
    ckpt: str | Path,
    backbone: Backbone,
    classnames: Sequence[str],
    *,
    layout: Optional[str] = None,
    ctx_init: Optional[str] = None,
    template: Optional[str] = None,
    verify: bool = True,
) -> ImportedPrompts:
    """Read a CoOp / MaPLe / FAP checkpoint as this toolkit's prompts for `backbone`.

    layout: "coop", "maple" or "fap"; None detects it from the keys. ctx_init: the trainer's
    CTX_INIT (None: the layout's released default; "" : none). template: the dataset template
    (FAP's init phrase, '{}' kept; default "a photo of a {}."). verify: compare the checkpoint's
    class-prompt embeddings and frozen CLIP weights with `backbone` and `classnames`.
    Returns the prompts under `PromptLearner.state_dict()` names, float32.
    """
    _check_options(layout, template)
    return _import_state(*read_dassl_checkpoint(ckpt), str(ckpt), backbone, classnames, layout=layout,
                         ctx_init=ctx_init, template=template, verify=verify)


def _check_options(layout: Optional[str], template: Optional[str]) -> None:
    if template is not None and template.count("{}") != 1:
        raise ConfigError(f"--template {quote(template, 80)} must contain exactly one '{{}}' for the class name")
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"--layout {quote(layout, 40)} is unknown; choose one of {', '.join(LAYOUTS)}")


def _import_state(state: dict[str, torch.Tensor], epoch: Optional[int], where: str, backbone: Backbone,
                  classnames: Sequence[str], *, layout: Optional[str], ctx_init: Optional[str],
                  template: Optional[str], verify: bool) -> ImportedPrompts:
    """import_dassl on a checkpoint already read."""
    template = template or DEFAULT_TEMPLATE
    prompt_state, other = split_state(state)
    found = detect_layout(list(prompt_state), where)
    if layout is None:
        layout = found
    elif found != layout and not (layout == "fap" and found == "maple" and "compound_prompts_text.0" not in prompt_state):
        raise ModelError(f"{where} holds a {found} prompt learner, not {layout} (drop --layout to detect it)")
    n_ctx, depth, ours = convert(prompt_state, layout, where)
    cfg = _check_fits_backbone(backbone, layout, n_ctx, depth, ours, where)
    text_init, mode = text_settings(layout, n_ctx, ctx_init, where)
    cfg = PromptConfig(coupling=cfg.coupling, n_ctx=n_ctx, depth=depth, text_init=text_init, text_init_mode=mode)
    checks = {"class_prompts": "skipped (--no-verify)", "backbone_weights": "skipped (--no-verify)"}
    if verify:
        buffers = {k: v for k, v in prompt_state.items() if k in _BUFFERS}
        checks = {"class_prompts": check_class_prompts(buffers, backbone, classnames, cfg, template, where),
                  "backbone_weights": check_backbone_weights(other, backbone, where)}
    dropped = sorted(k for k in prompt_state if k in _BUFFERS)
    if other:
        dropped.append(f"{len(other)} frozen CLIP tensors")
    return ImportedPrompts(layout, cfg, ours, epoch, checks, dropped)


def import_prompts(
    ckpt: str | Path,
    out: str | Path,
    *,
    model: str,
    pretrained: Optional[str] = None,
    quick_gelu: Optional[bool] = None,
    classnames: Sequence[str],
    templates: Optional[Sequence[str]] = None,
    dataset: Optional[str] = None,
    layout: Optional[str] = None,
    ctx_init: Optional[str] = None,
    verify: bool = True,
    overwrite: bool = False,
) -> tuple[Path, ImportedPrompts]:
    """Import `ckpt` and write it to `out` (a directory that `--run` and `load_classifier(run=...)`
    accept, or a ``.safetensors`` prompt file). Returns (the prompt file written, the import)."""
    from ..api import get_backbone
    from ..config import ModelSpec
    from ..engine.identity import sha256_file
    from .prompt_file import write_prompts

    template = templates[0] if templates else DEFAULT_TEMPLATE
    _check_options(layout, template)
    _check_out(Path(out), overwrite)
    state, epoch = read_dassl_checkpoint(ckpt)   # before the backbone: a refused file costs nothing
    backbone = get_backbone(model, pretrained, quick_gelu, "cpu")
    imported = _import_state(state, epoch, str(ckpt), backbone, classnames, layout=layout, ctx_init=ctx_init,
                             template=template, verify=verify)
    source = {"kind": "dassl", "layout": imported.layout, "file": str(ckpt), "sha256": sha256_file(ckpt),
              "epoch": imported.epoch, "checks": imported.checks, "dropped": imported.dropped}
    written = write_prompts(out, imported.state, prompt=imported.prompt,
                            model=ModelSpec(name=model, pretrained=pretrained, quick_gelu=quick_gelu),
                            classnames=classnames, templates=[template], method=METHOD_OF[imported.layout],
                            dataset={"name": dataset} if dataset else None, backbone_info=backbone.describe(),
                            source=source)
    return written, imported


MAX_CLASSNAMES_BYTES = 10 << 20


def read_classnames_file(path: str | Path) -> list[str]:
    """Class names, one a line in label order (blank lines skipped, surrounding spaces removed);
    a missing, unreadable, oversized or empty file, or a repeated name, is a one-line ConfigError."""
    path = Path(path)
    shown = str(path)[:200]
    try:
        if not path.is_file():
            raise ConfigError(f"--classnames-file {shown} does not exist (or is not a file)")
        if path.stat().st_size > MAX_CLASSNAMES_BYTES:
            raise ConfigError(f"--classnames-file {shown} is larger than {MAX_CLASSNAMES_BYTES >> 20} MiB; "
                              "expected one class name a line")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read --classnames-file {shown}: {one_line(exc.strerror or exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--classnames-file {shown} is not UTF-8 text") from None
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            raise ConfigError(f"--classnames-file {shown} line {lineno}: {quote(name, 80)} repeats line {seen[name]}")
        seen[name] = lineno
        names.append(name)
    if not names:
        raise ConfigError(f"--classnames-file {shown} holds no class names (one a line)")
    return names


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out that is a file or a folder holding anything but an
    earlier import (which --overwrite replaces)."""
    if out.suffix == ".safetensors":
        if out.exists() and not overwrite:
            raise ConfigError(f"--out {str(out)[:200]} exists; pass --overwrite to replace it")
        return
    from ..engine.rundir import check_out_dir

    check_out_dir(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    own = {"config.yaml", "prompts.safetensors"}
    # what an import writes, and the temporaries of an atomic write that was killed (paths.atomic_write_bytes)
    ours = all(p.name in own or re.fullmatch(r"\.(config\.yaml|prompts\.safetensors)\.tmp\d+", p.name)
               for p in out.iterdir())
    if not ours:
        raise ConfigError(f"--out {str(out)[:200]} is not empty and holds files an import does not write; "
                          "choose a new or empty folder")
    if not overwrite:
        raise ConfigError(f"--out {str(out)[:200]} already holds imported prompts; pass --overwrite to replace them")


__all__ = ["LAYOUTS", "ImportedPrompts", "read_dassl_checkpoint", "split_state", "detect_layout", "key_mapping",
           "convert", "text_settings", "check_class_prompts", "check_backbone_weights", "import_dassl",
           "import_prompts", "read_classnames_file"]
