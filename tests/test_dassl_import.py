"""Importing CoOp / MaPLe / FAP checkpoints (Dassl model.pth.tar-N).

Each test writes a checkpoint in the released trainer's key layout itself (random tensors of rp-tiny's
shapes, the Dassl bookkeeping entries around them), imports it, and checks against a separate
float64 re-statement of the released forward pass (written from the trainers' code, not from
robustprompt's PromptedCLIP): the prompt tensors land where the mapping says and the imported
classifier's logits are the released model's.
"""
from __future__ import annotations

import copy
import os
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from robustprompt.api import classifier_from_spec
from robustprompt.cli import main
from robustprompt.config import ModelSpec
from robustprompt.data.base import Dataset
from robustprompt.errors import ConfigError, ModelError
from robustprompt.models import PromptConfig, PromptedClassifier, load_backbone
from robustprompt.models.dassl_import import import_dassl, import_prompts, read_classnames_file

CLASSES = ["cat", "dog", "sea_otter"]
TEMPLATE = "a photo of a {}."
D = 32      # rp-tiny: both towers are 32 wide, 3 blocks


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """rp-tiny weights in a file, so that the backbone an import records can be loaded again."""
    torch.manual_seed(0)
    model = load_backbone("rp-tiny").model
    path = tmp_path_factory.mktemp("weights") / "rp-tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def backbone(weights):
    return load_backbone("rp-tiny", str(weights))


@pytest.fixture(scope="module")
def classes_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("classes") / "classes.txt"
    path.write_text("\n".join(CLASSES) + "\n")
    return path


def _rand(g: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return (0.5 * torch.randn(*shape, generator=g)).to(dtype)


def _buffers(backbone, prompts: list[str], n_ctx: int, dtype) -> dict[str, torch.Tensor]:
    """token_prefix / token_suffix as the trainers register them: embeddings of the tokenised
    class prompts around the n_ctx context positions."""
    with torch.no_grad():
        emb = backbone.model.token_embedding(backbone.tokenizer(prompts))
    return {"token_prefix": emb[:, :1].to(dtype), "token_suffix": emb[:, 1 + n_ctx:].to(dtype)}


def _frozen_clip(backbone, dtype) -> dict[str, torch.Tensor]:
    """The CustomCLIP entries next to the prompt learner in MaPLe/FAP checkpoints."""
    m = backbone.model
    out = {f"image_encoder.{k}": v for k, v in m.visual.state_dict().items()}
    out.update({f"text_encoder.transformer.{k}": v for k, v in m.transformer.state_dict().items()})
    out.update({"text_encoder.positional_embedding": m.positional_embedding,
                "text_encoder.text_projection": m.text_projection, "logit_scale": m.logit_scale})
    out.update({f"text_encoder.ln_final.{k}": v for k, v in m.ln_final.state_dict().items()})
    return {k: v.detach().to(dtype).clone() for k, v in out.items()}


def maple_checkpoint(backbone, g, depth=3, n_ctx=2, dtype=torch.float16, width=D):
    """MaPLe (trainers/maple.py): free text ctx + deep text prompts, Linear t→v per block;
    CTX_INIT 'a photo of a' → class prompts 'a photo of a {class}.'; fp16 as PREC fp16 leaves them."""
    pl = {"ctx": _rand(g, n_ctx, width, dtype=dtype), "proj.weight": _rand(g, D, width, dtype=dtype),
          "proj.bias": _rand(g, D, dtype=dtype)}
    for i in range(depth - 1):
        pl[f"compound_prompts_text.{i}"] = _rand(g, n_ctx, width, dtype=dtype)
        pl[f"compound_prompt_projections.{i}.weight"] = _rand(g, D, width, dtype=dtype)
        pl[f"compound_prompt_projections.{i}.bias"] = _rand(g, D, dtype=dtype)
    prompts = [f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]
    if width == D:
        pl.update(_buffers(backbone, prompts, n_ctx, dtype))
    state = {f"prompt_learner.{k}": v for k, v in pl.items()}
    state.update(_frozen_clip(backbone, dtype))
    return pl, state, prompts


def fap_checkpoint(backbone, g, depth=3, n_ctx=2, dtype=torch.float32):
    """FAP (trainers/fap.py): free text ctx at block 0 with vision = proj(ctx); deeper blocks have free
    vision prompts and Linear v→t; CTX_INIT = the dataset template, '{}' kept in the prompt."""
    pl = {"ctx": _rand(g, n_ctx, D, dtype=dtype), "proj.weight": _rand(g, D, D, dtype=dtype),
          "proj.bias": _rand(g, D, dtype=dtype)}
    for i in range(depth - 1):
        pl[f"compound_prompts_image.{i}"] = _rand(g, n_ctx, D, dtype=dtype)
        pl[f"compound_prompt_projections.{i}.weight"] = _rand(g, D, D, dtype=dtype)
        pl[f"compound_prompt_projections.{i}.bias"] = _rand(g, D, dtype=dtype)
    prompts = [f"{TEMPLATE} {c.replace('_', ' ')}." for c in CLASSES]
    pl.update(_buffers(backbone, prompts, n_ctx, dtype))
    # saved from nn.DataParallel: every key under "module."; FAP forks also keep an input normaliser
    state = {f"module.prompt_learner.{k}": v for k, v in pl.items()}
    state.update({f"module.{k}": v for k, v in _frozen_clip(backbone, dtype).items()})
    state["module.normalize.mean"] = torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1)
    return pl, state, prompts


def coop_checkpoint(backbone, g, n_ctx=4, dtype=torch.float16):
    """CoOp (trainers/coop.py): only the prompt learner is registered, keys are bare;
    CTX_INIT '' → 'X X X X {class}.'."""
    pl = {"ctx": _rand(g, n_ctx, D, dtype=dtype)}
    prompts = [" ".join(["X"] * n_ctx) + f" {c.replace('_', ' ')}." for c in CLASSES]
    pl.update(_buffers(backbone, prompts, n_ctx, dtype))
    return pl, dict(pl), prompts


def save_dassl(path: Path, state: dict, epoch: int = 5) -> Path:
    """torch.save of what Dassl's save_model writes, with its warm-up scheduler's state_dict():
    the successor scheduler (and through it the optimizer) pickled as objects."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0035, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    scheduler = {"successor": successor, "warmup_epoch": 1, "cons_lr": 1e-5, "base_lrs": [0.0035],
                 "last_epoch": epoch, "_step_count": epoch + 1, "_last_lr": [0.003]}
    torch.save({"state_dict": OrderedDict(state), "epoch": epoch, "optimizer": opt.state_dict(),
                "scheduler": scheduler, "val_result": None}, path)
    return path


# ------------------------------------------------------------------------------ the released forward
def released_logits(backbone, images: torch.Tensor, prompts: list[str], ctx, deep_text, shared_vision,
                    deep_vision) -> torch.Tensor:
    """Logits of the released MaPLe/FAP/CoOp CustomCLIP, in float64: ctx after SOS (+ positional
    embedding), deep text prompts replace tokens 1..n_ctx before blocks 1..; proj(ctx) appended after
    the patches before ln_pre, deep vision prompts replace the last n_ctx tokens before blocks 1..."""
    m = copy.deepcopy(backbone.model).double()
    ids = backbone.tokenizer(prompts)
    K, n = ids.shape[0], ctx.shape[0]
    x = m.token_embedding(ids)
    x = torch.cat([x[:, :1], ctx.double().expand(K, -1, -1), x[:, 1 + n:]], 1) + m.positional_embedding
    for b, blk in enumerate(m.transformer.resblocks):
        if 1 <= b <= len(deep_text):
            x = torch.cat([x[:, :1], deep_text[b - 1].double().expand(K, -1, -1), x[:, 1 + n:]], 1)
        x = blk(x, attn_mask=m.attn_mask)
    text = m.ln_final(x)[torch.arange(K), ids.argmax(-1)] @ m.text_projection

    v = m.visual
    mean = torch.tensor(backbone.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, dtype=torch.float64).view(1, 3, 1, 1)
    y = v.conv1((images.double() - mean) / std).flatten(2).transpose(1, 2)
    B = y.shape[0]
    y = torch.cat([v.class_embedding.view(1, 1, -1).expand(B, -1, -1), y], 1) + v.positional_embedding
    if shared_vision is not None:
        y = torch.cat([y, shared_vision.double().expand(B, -1, -1)], 1)
    y = v.ln_pre(y)
    for b, blk in enumerate(v.transformer.resblocks):
        if 1 <= b <= len(deep_vision):
            y = torch.cat([y[:, :-n], deep_vision[b - 1].double().expand(B, -1, -1)], 1)
        y = blk(y)
    image = v.ln_post(y[:, 0]) @ v.proj
    return m.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


def linear(pl: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ pl[f"{name}.weight"].double().t() + pl[f"{name}.bias"].double()


def released_prompts(layout: str, pl: dict, depth: int):
    """(ctx, deep text prompts, shared vision prompt, deep vision prompts) of the released forward."""
    if layout == "coop":
        return pl["ctx"], [], None, []
    shared = linear(pl, "proj", pl["ctx"])
    if layout == "maple":
        deep_t = [pl[f"compound_prompts_text.{i}"] for i in range(depth - 1)]
        deep_v = [linear(pl, f"compound_prompt_projections.{i}", deep_t[i]) for i in range(depth - 1)]
    else:
        deep_v = [pl[f"compound_prompts_image.{i}"] for i in range(depth - 1)]
        deep_t = [linear(pl, f"compound_prompt_projections.{i}", deep_v[i]) for i in range(depth - 1)]
    return pl["ctx"], deep_t, shared, deep_v


# The mapping the module docstring documents, restated by hand: our key -> their key (depth 3).
EXPECTED_KEYS = {
    "coop": {"text_ctx.0": "ctx"},
    "maple": {"text_ctx.0": "ctx", "t2v.0.weight": "proj.weight", "t2v.0.bias": "proj.bias",
              "text_ctx.1": "compound_prompts_text.0", "text_ctx.2": "compound_prompts_text.1",
              "t2v.1.weight": "compound_prompt_projections.0.weight", "t2v.1.bias": "compound_prompt_projections.0.bias",
              "t2v.2.weight": "compound_prompt_projections.1.weight", "t2v.2.bias": "compound_prompt_projections.1.bias"},
    "fap": {"text_ctx.0": "ctx", "t2v.0.weight": "proj.weight", "t2v.0.bias": "proj.bias",
            "vision_ctx.0": "compound_prompts_image.0", "vision_ctx.1": "compound_prompts_image.1",
            "v2t.0.weight": "compound_prompt_projections.0.weight", "v2t.0.bias": "compound_prompt_projections.0.bias",
            "v2t.1.weight": "compound_prompt_projections.1.weight", "v2t.1.bias": "compound_prompt_projections.1.bias"},
}
EXPECTED_PROMPT = {"coop": ("text", 4, 1, "placeholder"), "maple": ("coupled", 2, 3, "phrase"),
                   "fap": ("fap", 2, 3, "template")}
BUILDERS = {"coop": coop_checkpoint, "maple": maple_checkpoint, "fap": fap_checkpoint}


def _load_run(out: Path):
    """The classifier `--run OUT` builds (the eval path), over CLASSES with TEMPLATE."""
    return classifier_from_spec(ModelSpec(run=str(out)), Dataset("toy", list(CLASSES), {}, [TEMPLATE]))


# ------------------------------------------------------------------------------ the three layouts
@pytest.mark.parametrize("layout", ["coop", "maple", "fap"])
def test_import_puts_tensors_where_the_mapping_says_and_computes_the_released_model(
        layout, backbone, weights, classes_file, tiny_images, tmp_path, capsys):
    g = torch.Generator().manual_seed(11)
    pl, state, prompts = BUILDERS[layout](backbone, g)
    ckpt = save_dassl(tmp_path / "model.pth.tar-5", state)
    out = tmp_path / "imported"
    argv = ["import-prompts", str(ckpt), "--model", "rp-tiny", "--pretrained", str(weights),
            "--classnames-file", str(classes_file), "--template", TEMPLATE, "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"imported {layout} prompts, epoch 5" in printed and "class prompts: matched 3 class prompts" in printed

    clf = _load_run(out)
    coupling, n_ctx, depth, mode = EXPECTED_PROMPT[layout]
    cfg = clf.prompt_cfg
    assert (cfg.coupling, cfg.n_ctx, cfg.depth, cfg.text_init_mode) == (coupling, n_ctx, depth, mode)
    own = clf.prompt_state_dict()
    assert set(own) == set(EXPECTED_KEYS[layout])
    for ours, theirs in EXPECTED_KEYS[layout].items():
        assert own[ours].dtype == torch.float32
        assert torch.equal(own[ours], pl[theirs].float()), ours

    with torch.no_grad():
        got = clf(tiny_images).double()
        ref = released_logits(backbone, tiny_images, prompts, *released_prompts(layout, pl, depth))
        direct = PromptedClassifier(backbone, CLASSES, cfg, [TEMPLATE])
        direct.load_prompt_state_dict({k: pl[t].float() for k, t in EXPECTED_KEYS[layout].items()})
        given = direct(tiny_images).double()
    assert ref.std() > 0.1   # the prompts move the logits apart: not a degenerate comparison
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got, given, atol=1e-6, rtol=0)

    import robustprompt as rp   # the public call takes the directory too, class names from the file

    api = rp.load_classifier(run=out, templates=[TEMPLATE])
    assert api.classnames == CLASSES and api.prompt_cfg == cfg
    with torch.no_grad():
        torch.testing.assert_close(api(tiny_images).double(), got, atol=1e-6, rtol=0)


def test_layout_is_detected_and_a_wrong_one_is_refused(backbone, tmp_path):
    for layout, build in BUILDERS.items():
        _, state, _ = build(backbone, torch.Generator().manual_seed(3))
        ckpt = save_dassl(tmp_path / f"{layout}.pth.tar-1", state, epoch=1)
        imp = import_dassl(ckpt, backbone, CLASSES, template=TEMPLATE)
        assert imp.layout == layout and imp.epoch == 1
        wrong = "coop" if layout != "coop" else "maple"
        with pytest.raises(ModelError, match=f"holds a {layout} prompt learner, not {wrong}"):
            import_dassl(ckpt, backbone, CLASSES, layout=wrong, template=TEMPLATE)


def test_a_shallow_maple_or_fap_checkpoint_reads_either_way_and_computes_the_same(backbone, tiny_images, tmp_path):
    pl, state, _ = maple_checkpoint(backbone, torch.Generator().manual_seed(12), depth=1)
    ckpt = save_dassl(tmp_path / "shallow.pth", state)
    logits = []
    for layout, coupling in ((None, "coupled"), ("fap", "fap")):
        imp = import_dassl(ckpt, backbone, CLASSES, layout=layout, ctx_init="a photo of a" if layout else None)
        assert (imp.prompt.coupling, imp.prompt.depth) == (coupling, 1)
        clf = PromptedClassifier(backbone, CLASSES, imp.prompt, [TEMPLATE])
        clf.load_prompt_state_dict(imp.state)
        with torch.no_grad():
            logits.append(clf(tiny_images))
    assert imp.checks["class_prompts"] == "matched 3 class prompts"   # FAP read with MaPLe's words, as written
    torch.testing.assert_close(logits[0], logits[1], atol=1e-6, rtol=0)


def test_a_bare_prompt_learner_state_dict_and_a_safetensors_file_import(backbone, tmp_path):
    from safetensors.torch import save_file

    pl, _, _ = maple_checkpoint(backbone, torch.Generator().manual_seed(4))
    bare = tmp_path / "bare.pth"
    torch.save(pl, bare)
    st = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in pl.items()}, st)
    for path in (bare, st):
        imp = import_dassl(path, backbone, CLASSES)
        assert imp.layout == "maple" and imp.epoch is None
        assert torch.equal(imp.state["text_ctx.2"], pl["compound_prompts_text.1"].float())
        assert imp.checks["backbone_weights"].startswith("absent")


def test_python_api_writes_a_prompt_file_with_metadata(backbone, weights, tmp_path):
    from robustprompt.models.prompt_file import read_meta

    pl, state, _ = fap_checkpoint(backbone, torch.Generator().manual_seed(5))
    ckpt = save_dassl(tmp_path / "model-best.pth.tar", state, epoch=7)
    written, imp = import_prompts(ckpt, tmp_path / "fap.safetensors", model="rp-tiny", pretrained=str(weights),
                                  classnames=CLASSES, templates=[TEMPLATE])
    meta = read_meta(written)
    assert meta.prompt == imp.prompt and meta.method["name"] == "fap"
    assert meta.source["kind"] == "dassl" and meta.source["epoch"] == 7 and len(meta.source["sha256"]) == 64
    assert meta.classnames == CLASSES and meta.backbone["name"] == "rp-tiny"
    import robustprompt as rp

    clf = rp.load_classifier(prompts=written)          # the file alone rebuilds the classifier
    assert clf.prompt_cfg == imp.prompt and clf.classnames == CLASSES
    assert torch.equal(clf.prompt_state_dict()["vision_ctx.1"], pl["compound_prompts_image.1"])


# ------------------------------------------------------------------------------ text settings
def test_ctx_init_rules_of_each_trainer(backbone, tmp_path):
    from robustprompt.models.dassl_import import text_settings

    assert text_settings("coop", 16, None, "f") == (None, "placeholder")
    assert text_settings("coop", 4, "a_photo of a", "f") == ("a photo of a", "phrase")
    with pytest.raises(ConfigError, match="has 3 words"):
        text_settings("coop", 4, "a photo of", "f")
    assert text_settings("maple", 2, None, "f") == ("a photo of a", "phrase")
    assert text_settings("maple", 2, "", "f") == (None, "placeholder")
    assert text_settings("maple", 5, None, "f") == (None, "placeholder")     # n_ctx > 4: random init, X…X
    assert text_settings("fap", 2, None, "f") == (None, "template")
    assert text_settings("fap", 8, None, "f") == (None, "placeholder")


# ------------------------------------------------------------------------------ bad input: one line, exit 2
def _cli_error(capsys, argv) -> str:
    """The one error line (loading the backbone may log an info line before it)."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("robustprompt import-prompts: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def _argv(ckpt, weights, classes_file, out, *extra):
    return ["import-prompts", str(ckpt), "--model", "rp-tiny", "--pretrained", str(weights),
            "--classnames-file", str(classes_file), "--out", str(out), *extra]


def test_a_malicious_pickle_is_refused_and_runs_nothing(weights, classes_file, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": {"ctx": torch.zeros(2, D)}, "epoch": 1, "extra": Payload()}, ckpt)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")   # weights_only is passed explicitly
    err = _cli_error(capsys, _argv(ckpt, weights, classes_file, tmp_path / "out"))
    assert "system" in err and "not loaded" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_shapes_that_do_not_fit_the_backbone_are_one_line(backbone, weights, classes_file, tmp_path, capsys):
    g = torch.Generator().manual_seed(6)
    _, wide, _ = maple_checkpoint(backbone, g, width=64)           # a 64-wide text tower's prompts
    err = _cli_error(capsys, _argv(save_dassl(tmp_path / "wide.pth", wide), weights, classes_file, tmp_path / "o1",
                                   "--no-verify"))
    assert "prompt_learner.ctx" not in err and "ctx has shape (2, 64)" in err and "another backbone" in err
    _, deep, _ = maple_checkpoint(backbone, g, depth=5)            # 5 blocks of prompts, rp-tiny has 3
    err = _cli_error(capsys, _argv(save_dassl(tmp_path / "deep.pth", deep), weights, classes_file, tmp_path / "o2"))
    assert "does not fit rp-tiny" in err and "depth 5" in err


@pytest.mark.parametrize("case", ["csc", "incomplete", "foreign", "no_ctx", "gap", "nan"])
def test_checkpoints_that_are_not_these_layouts_are_one_line(case, backbone, weights, classes_file, tmp_path, capsys):
    g = torch.Generator().manual_seed(7)
    pl, state, _ = maple_checkpoint(backbone, g)
    if case == "csc":
        state = {"ctx": _rand(g, 3, 4, D)}
        match = "class-specific contexts"
    elif case == "incomplete":
        del state["prompt_learner.compound_prompt_projections.1.bias"]
        match = "1 missing entries"
    elif case == "foreign":
        state["prompt_learner.ctx_space.0"] = _rand(g, 2, D)       # a prompt learner of another method
        match = "does not have"
    elif case == "no_ctx":
        state = {"image_encoder.conv1.weight": torch.zeros(1)}
        match = "no prompt context"
    elif case == "gap":                                              # deep prompts 0 and 5, nothing between
        state["prompt_learner.compound_prompts_text.5"] = state.pop("prompt_learner.compound_prompts_text.1")
        match = "missing entries .*compound_prompts_text.1.*does not have .*compound_prompts_text.5"
    else:
        state["prompt_learner.compound_prompts_text.1"][0, 3] = float("nan")
        match = "compound_prompts_text.1 holds non-finite values"
    err = _cli_error(capsys, _argv(save_dassl(tmp_path / "c.pth", state), weights, classes_file, tmp_path / "o"))
    assert re.search(match, err), err


def test_class_prompts_and_frozen_weights_are_checked(backbone, weights, classes_file, tmp_path, capsys):
    g = torch.Generator().manual_seed(8)
    _, state, _ = maple_checkpoint(backbone, g)
    ckpt = save_dassl(tmp_path / "m.pth", state)
    names = tmp_path / "other.txt"
    names.write_text("cat\nsea_otter\ndog\n")        # another label order
    err = _cli_error(capsys, ["import-prompts", str(ckpt), "--model", "rp-tiny", "--pretrained", str(weights),
                              "--classnames-file", str(names), "--out", str(tmp_path / "o1")])
    assert "token_suffix for class 1 ('sea_otter')" in err
    err = _cli_error(capsys, _argv(ckpt, weights, classes_file, tmp_path / "o2", "--ctx-init", ""))
    assert "token_suffix for class 0" in err and "--ctx-init" in err
    other = {k: v.clone() for k, v in state.items()}
    other["image_encoder.conv1.weight"] += 0.05                        # a robust fine-tune of the encoder
    err = _cli_error(capsys, _argv(save_dassl(tmp_path / "r.pth", other), weights, classes_file, tmp_path / "o3"))
    assert "frozen CLIP weights differ" in err and "image_encoder.conv1.weight" in err
    assert main(_argv(save_dassl(tmp_path / "r.pth", other), weights, classes_file, tmp_path / "o4",
                      "--no-verify")) == 0


def test_classnames_file_mistakes_are_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    twice = tmp_path / "twice.txt"
    twice.write_text("cat\ndog\ncat\n")
    for path, match in ((tmp_path / "missing.txt", "does not exist"), (empty, "holds no class names"),
                        (twice, "line 3: 'cat' repeats line 1")):
        with pytest.raises(ConfigError, match=match):
            read_classnames_file(path)
    ok = tmp_path / "ok.txt"
    ok.write_text(" cat \n\nsea_otter\n")
    assert read_classnames_file(ok) == ["cat", "sea_otter"]


def test_out_is_protected(backbone, weights, classes_file, tmp_path, capsys):
    _, state, _ = coop_checkpoint(backbone, torch.Generator().manual_seed(9))
    ckpt = save_dassl(tmp_path / "c.pth", state)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    err = _cli_error(capsys, _argv(ckpt, weights, classes_file, busy))
    assert "holds files an import does not write" in err and (busy / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    assert main(_argv(ckpt, weights, classes_file, out)) == 0
    err = _cli_error(capsys, _argv(ckpt, weights, classes_file, out))
    assert "--overwrite" in err
    (out / ".prompts.safetensors.tmp4242").write_bytes(b"torn")     # a killed atomic write's temporary
    assert main(_argv(ckpt, weights, classes_file, out, "--overwrite")) == 0
