"""TAPT's statistics pre-pass: per-layer token statistics of the image tower on a public set,
on clean images and on adversarial images made with this toolkit's own attack.

For every block b of the image tower and every token position n and channel c, over the S images
of the set (population moments, as TAPT's released code computes them over a batch):

    mean[b, n, c] = (1/S) Σ_s x_s[b, n, c]
    var[b, n, c]  = (1/S) Σ_s (x_s[b, n, c] − mean[b, n, c])²

where x_s[b] (N×C) is the INPUT of block b for image s: for b = 0 the tokens after ln_pre, for
b > 0 the previous block's output with this block's prompt tokens inserted (TAPT's
`ResidualAttentionBlock.visual_feat`). Token layout [CLS, patches, vision prompts], so the
statistics belong to one prompt layout (n_ctx): the file records it and TAPT checks it.

The moments are accumulated in float64 over batches (sums of x and x²), so the result does not
depend on the batch size. The file is one safetensors file, written atomically, with tensors
clean_mean, clean_var, adv_mean, adv_var (each L×N×C, float32, L = all blocks of the tower) and a
metadata entry ``robustprompt_token_stats`` holding JSON: the threat model, the backbone
(describe() and its hash), the prompt config and its hash, the dataset, n, seed and the toolkit
version. The prompt tensors the statistics were computed with are stored too (``prompt.<name>``):
the statistics of the prompt tokens ARE that prompt, so TAPT starts from it (an untrained vision
prompt is a random draw, which a later process would not repeat). `load_token_stats(path, clf)`
refuses a file made for another backbone (ConfigError naming both hashes).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from ..config import AttackSpec, DataSpec, ModelSpec
from ..errors import ConfigError
from ..models import PromptedClassifier
from ..models.sources import sha256_file
from ..models.trace import TraceSpec

log = logging.getLogger(__name__)

META_KEY = "robustprompt_token_stats"
TENSOR_KEYS = ("clean_mean", "clean_var", "adv_mean", "adv_var")
PROMPT_PREFIX = "prompt."
FORMAT = 1


# ---------------------------------------------------------------------------- identity
def backbone_hash(clf: PromptedClassifier) -> str:
    """The backbone's identity: its weight file's SHA-256 (describe()['weights_sha256']), or, for
    random initialisation (no file), 'params:' + the SHA-256 of its parameters' bytes."""
    sha = clf.backbone_info.get("weights_sha256")
    if sha:
        return str(sha)
    h = hashlib.sha256()
    for name, t in sorted(clf.model.clip.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "params:" + h.hexdigest()


def prompt_hash(clf: PromptedClassifier) -> Optional[str]:
    """SHA-256 of the classifier's prompt tensors (None without prompts)."""
    state = clf.prompt_state_dict()
    if not state:
        return None
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- moments
def block_inputs(clf: PromptedClassifier, x: torch.Tensor, blocks: Sequence[int],
                 vision_prompts: Optional[list[torch.Tensor]] = None
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One traced forward: (normalised features B×D, [input tokens B×N×C of each block in blocks])."""
    feats, rec = clf.encode_image(x, trace=TraceSpec(blocks=tuple(blocks)), vision_prompts=vision_prompts)
    return feats, [rec[b].x_in for b in blocks]


class MomentAccumulator:
    """Running float64 sums of x and x² per block, token and channel; `moments()` → (mean, var),
    each L×N×C, population variance E[x²] − E[x]² (clamped at 0 against rounding)."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: Optional[torch.Tensor] = None
        self.s2: Optional[torch.Tensor] = None

    def add(self, tokens: list[torch.Tensor]) -> None:
        """tokens: per block, B×N×C."""
        # summed over the batch block by block: no B×L×N×C float64 copy (and its square) at once
        s1 = torch.stack([z.detach().sum(0, dtype=torch.float64) for z in tokens])          # L×N×C
        s2 = torch.stack([z.detach().double().square().sum(0) for z in tokens])
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += tokens[0].shape[0]

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n == 0:
            raise ConfigError("token statistics need at least one image")
        mean = self.s1 / self.n
        return mean, (self.s2 / self.n - mean * mean).clamp_min(0.0)


@dataclass
class TokenStats:
    """Per-block token moments (each L×N×C) and the metadata of the set they were computed on."""

    clean_mean: torch.Tensor
    clean_var: torch.Tensor
    adv_mean: torch.Tensor
    adv_var: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: Optional[str] = None     # of the file it was loaded from
    prompt_state: dict[str, torch.Tensor] = field(default_factory=dict)   # the prompt they were computed with

    @property
    def n_tokens(self) -> int:
        return int(self.clean_mean.shape[1])

    @property
    def n_blocks(self) -> int:
        return int(self.clean_mean.shape[0])


def compute_token_stats(clf: PromptedClassifier, batches: Iterable[tuple[torch.Tensor, torch.Tensor, Sequence[int]]],
                        attack: AttackSpec, *, seed: int = 0) -> TokenStats:
    """Moments over every block's input tokens, on the clean images of `batches` ((x B×3×S×S in
    [0,1], y B, per-image attack seeds)) and on their adversarial versions under `attack`, made
    against `clf` itself (its backbone and prompt, the prompt TAPT starts from)."""
    threat = attack.threat()
    n_blocks = len(clf.model.vision_blocks)
    blocks = list(range(n_blocks))
    clean, adv = MomentAccumulator(), MomentAccumulator()
    for x, y, seeds in batches:
        x_adv = threat.run(clf, x, y, seeds=list(seeds), seed=seed)
        with torch.no_grad():
            clean.add(block_inputs(clf, x, blocks)[1])
            adv.add(block_inputs(clf, x_adv, blocks)[1])
    (cm, cv), (am, av) = clean.moments(), adv.moments()
    f32 = lambda t: t.to(torch.float32)   # noqa: E731
    return TokenStats(f32(cm), f32(cv), f32(am), f32(av),
                      meta={"format": FORMAT, "n": clean.n, "seed": seed, "n_blocks": n_blocks,
                            "n_tokens": int(cm.shape[1]), "width": int(cm.shape[2]),
                            "threat": threat.describe(len(clf.classnames)),
                            "backbone": clf.backbone_info, "backbone_hash": backbone_hash(clf),
                            "prompt": clf.prompt_cfg.to_dict(), "prompt_sha256": prompt_hash(clf)},
                      prompt_state=clf.prompt_state_dict())


# ---------------------------------------------------------------------------- file
def save_token_stats(stats: TokenStats, path: str | Path) -> str:
    """One safetensors file, written atomically; returns its SHA-256."""
    from safetensors.torch import save

    from .. import __version__
    from ..paths import atomic_write_bytes

    meta = {**stats.meta, "toolkit_version": __version__}
    tensors = {k: getattr(stats, k).detach().to("cpu", torch.float32).contiguous() for k in TENSOR_KEYS}
    tensors.update({PROMPT_PREFIX + k: v.detach().cpu().contiguous() for k, v in stats.prompt_state.items()})
    data = save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True, default=str)})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_token_stats(path: str | Path, clf: Optional[PromptedClassifier] = None) -> TokenStats:
    """Read a statistics file; with `clf`, refuse one computed for another backbone, activation or
    number of blocks (ConfigError; the prompt and its token layout are TAPT's to check)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"tapt statistics file {str(path)[:200]} does not exist (make one with "
                          "`robustprompt tta-stats ... --out FILE`)")
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
            tensors = {k: fh.get_tensor(k) for k in TENSOR_KEYS if k in fh.keys()}
            prompt = {k[len(PROMPT_PREFIX):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(PROMPT_PREFIX)}
    except Exception as exc:   # safetensors raises its own error types for a damaged file
        raise ConfigError(f"{str(path)[:200]} is not a readable safetensors file ({str(exc)[:120]})") from exc
    if raw is None or set(tensors) != set(TENSOR_KEYS):
        raise ConfigError(f"{str(path)[:200]} is not a robustprompt token-statistics file "
                          f"(needs tensors {', '.join(TENSOR_KEYS)} and the {META_KEY} metadata)")
    stats = TokenStats(**tensors, meta=json.loads(raw), sha256=sha256_file(p), prompt_state=prompt)
    if clf is not None:
        check_stats_for(stats, clf, str(path))
    return stats


def check_stats_for(stats: TokenStats, clf: PromptedClassifier, where: str = "the statistics") -> None:
    """ConfigError unless `stats` were computed on this backbone: weights, activation, blocks (the
    prompt and the token layout it makes: see TAPT._check)."""
    recorded, actual = stats.meta.get("backbone_hash"), backbone_hash(clf)
    if recorded != actual:
        raise ConfigError(f"{where[:200]} was computed for backbone {recorded}, but this model's backbone is {actual}; "
                          "compute statistics for it with `robustprompt tta-stats`")
    # the same weights with and without QuickGELU are two networks with one weight hash
    gelu = (stats.meta.get("backbone") or {}).get("quick_gelu")
    if gelu is not None and bool(gelu) != bool(clf.backbone_info.get("quick_gelu")):
        raise ConfigError(f"{where[:200]} was computed with quick_gelu={bool(gelu)}, this model runs with "
                          f"quick_gelu={bool(clf.backbone_info.get('quick_gelu'))}: pass the same --quick-gelu to both")
    blocks, shape = len(clf.model.vision_blocks), stats.clean_mean.shape
    if shape[0] != blocks:
        raise ConfigError(f"{where[:200]} has statistics for {shape[0]} blocks, the image tower has {blocks}")


# ---------------------------------------------------------------------------- command
@dataclass
class TokenStatsConfig:
    """`robustprompt tta-stats`: the model whose prompt TAPT starts from (no prompt given:
    TAPT's), the public set (default: a seeded 256-image subset), the threat model of the
    adversarial statistics (default PGD-100, ε = α = 1/255: the AT.TEST block of TAPT's released
    configs), the attack seed and the device."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=lambda: DataSpec(batch_size=32, subset=256))
    attack: AttackSpec = field(default_factory=lambda: AttackSpec(attack="pgd", eps=1.0, alpha=1.0, steps=100))
    seed: int = 0
    device: str = "auto"
    tf32: bool = False   # as `robustprompt tta`: the statistics and the runs using them share arithmetic

    def __post_init__(self) -> None:
        from ..engine.evaluate import check_seed, check_tf32

        check_seed(self.seed, "seed")
        check_tf32(self.tf32)
        if self.attack.attack == "autoattack":   # its chunks would make the statistics depend on batch size
            raise ConfigError("tta-stats computes TAPT's statistics under PGD (its released configs' threat model); "
                              "AutoAttack is not supported here")

    def omitted_fields(self) -> tuple[str, ...]:
        return () if self.tf32 else ("tf32",)


def run_token_stats(cfg: TokenStatsConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Compute and save the statistics a config describes; returns the file's metadata (+ sha256)."""
    from ..api import classifier_from_spec, resolve_device
    from ..engine.evaluate import image_seed
    from ..engine.tasks import load_task
    from ..engine.tta import defence_model_spec
    from .procedures import procedure_class

    from ..engine.runtime import set_tf32

    if Path(out).is_dir():
        raise ConfigError(f"--out {str(out)[:200]} is a folder; give a file name, e.g. stats.safetensors")
    folder = Path(out).parent   # made, and checked writable, before the attack pass, not after it
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {str(out)[:200]}: cannot create {str(folder)[:200]} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--out {str(out)[:200]}: cannot write in {str(folder)[:200]} (read-only)")
    device = resolve_device(cfg.device)
    set_tf32(cfg.tf32)
    task = load_task(cfg.data)
    spec = defence_model_spec(cfg.model, procedure_class("tapt"))   # TAPT's prompt unless one is given
    # an untrained prompt's random vision tokens are part of what the file records: drawn from the
    # config's seed, so the same config gives the same file whatever ran before in the process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        clf = classifier_from_spec(spec, task.dataset, device)
    clf.eval()
    if not clf.model.vision_is_vit:
        raise ConfigError("token statistics need a ViT image tower")
    transform = task.transform(clf)
    indices = list(task.indices)
    bs = cfg.data.batch_size

    def batches():
        for start in range(0, len(indices), bs):
            idx = indices[start:start + bs]
            x = torch.stack([transform(task.split.load(i)) for i in idx]).to(device)
            y = torch.tensor([int(task.split.labels[i]) for i in idx], device=device)
            if progress:
                log.info("tta-stats: %d / %d images", start + len(idx), len(indices))
            yield x, y, [image_seed(cfg.seed, i) for i in idx]

    stats = compute_token_stats(clf, batches(), cfg.attack, seed=cfg.seed)
    stats.meta.update({"tf32": cfg.tf32, "dataset": cfg.data.dataset, "split": cfg.data.split, "subset": cfg.data.subset,
                       "subset_seed": cfg.data.subset_seed, "model": {"name": spec.name, "run": spec.run,
                                                                      "pretrained": spec.pretrained}})
    sha = save_token_stats(stats, out)
    return {**stats.meta, "sha256": sha, "file": str(out)}
