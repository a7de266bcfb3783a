"""The prompted CLIP against open_clip's own forward, prompt couplings, traces and caching."""

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from robustprompt.errors import ConfigError, ModelError
from robustprompt.models import PromptConfig, PromptedClassifier, PromptedCLIP, TraceSpec, load_backbone

COUPLINGS = ["text", "vision", "independent", "coupled", "coupled-v2t", "fap"]


def _texts():
    return ["a photo of a dog.", "a cat", "an ankle boot on a table, seen from the side."]


@pytest.mark.parametrize("which", ["tiny", "vitb32"])
def test_no_prompt_forward_equals_open_clip(which, tiny_backbone, vitb32_backbone):
    """float64: the traced path writes attention out, open_clip uses its fused kernel; in float32
    they differed by up to 3.8e-6 (|features| ≈ 3) against a 1e-5 bound, in float64 by ≤ 1.2e-14."""
    bb = tiny_backbone if which == "tiny" else vitb32_backbone
    clip = copy.deepcopy(bb.model).double()
    model = PromptedCLIP(clip, bb.tokenizer, PromptConfig())
    size = bb.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tok = bb.tokenizer(_texts())
    with torch.no_grad():
        ref_img = clip.encode_image(x)
        ref_txt = clip.encode_text(tok)
        for trace in (None, TraceSpec(blocks="all", attn=True)):
            img, _ = model.encode_image(x, trace)
            txt, _ = model.encode_text(tok, trace)
            torch.testing.assert_close(img, ref_img, atol=1e-10, rtol=0)
            torch.testing.assert_close(txt, ref_txt, atol=1e-10, rtol=0)


def test_classifier_logits_match_open_clip(tiny_backbone, tiny_images):
    bb = tiny_backbone
    names = ["dog", "cat", "ankle_boot"]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    clf = PromptedClassifier(bb, names, templates=templates)
    mean = torch.tensor(bb.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.std).view(1, 3, 1, 1)
    with torch.no_grad():
        img = F.normalize(bb.model.encode_image((tiny_images - mean) / std), dim=-1)
        per_template = []
        for t in templates:
            per_template.append(F.normalize(bb.model.encode_text(bb.tokenizer([t.format(n.replace("_", " "))
                                                                              for n in names])), dim=-1))
        txt = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        ref = bb.model.logit_scale.exp() * img @ txt.t()
        torch.testing.assert_close(clf(tiny_images), ref, atol=1e-5, rtol=1e-5)


def _reference_prompted_text(bb, tokens, text_prompts):
    """Deep text prompts written out by hand over open_clip's modules."""
    m = bb.model
    n = text_prompts[0].shape[0]
    x = m.token_embedding(tokens)
    x = torch.cat([x[:, :1], text_prompts[0].expand(len(tokens), -1, -1), x[:, 1 + n:]], 1)
    x = x + m.positional_embedding
    for b, blk in enumerate(m.transformer.resblocks):
        if 0 < b < len(text_prompts):
            x = x.clone()
            x[:, 1:1 + n] = text_prompts[b]
        x = blk(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ m.text_projection


def _reference_prompted_image(bb, images, vision_prompts):
    v = bb.model.visual
    n = vision_prompts[0].shape[0]
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(torch.cat([x, vision_prompts[0].expand(len(x), -1, -1)], 1))
    for b, blk in enumerate(v.transformer.resblocks):
        if 0 < b < len(vision_prompts):
            x = x.clone()
            x[:, -n:] = vision_prompts[b]
        x = blk(x)
    return v.ln_post(x[:, 0]) @ v.proj


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_deep_prompts_match_hand_written_forward(coupling, tiny_backbone, tiny_images):
    bb = tiny_backbone
    torch.manual_seed(3)
    model = PromptedCLIP(bb.model, bb.tokenizer, PromptConfig(coupling=coupling, n_ctx=2, depth=2))
    for p in model.prompt_parameters():  # move away from init so every path matters
        p.data.normal_(0, 0.5)
    tp, vp = model.prompt.text_prompts(), model.prompt.vision_prompts()
    pl = model.prompt
    # coupling structure, checked from the parameters
    if coupling == "coupled":
        torch.testing.assert_close(vp[1], pl.t2v[1](pl.text_ctx[1]))
    if coupling == "coupled-v2t":
        torch.testing.assert_close(tp[1], pl.v2t[1](pl.vision_ctx[1]))
        torch.testing.assert_close(tp[0], pl.v2t[0](pl.vision_ctx[0]))
    if coupling == "fap":
        torch.testing.assert_close(vp[0], pl.t2v[0](pl.text_ctx[0]))
        torch.testing.assert_close(tp[1], pl.v2t[0](pl.vision_ctx[0]))
    tokens = bb.tokenizer(["X X dog.", "X X ankle boot."])
    with torch.no_grad():
        txt, _ = model.encode_text(tokens)
        img, _ = model.encode_image(tiny_images)
        if tp is not None:
            torch.testing.assert_close(txt, _reference_prompted_text(bb, tokens, tp), atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(txt, bb.model.encode_text(tokens), atol=1e-5, rtol=1e-5)
        if vp is not None:
            torch.testing.assert_close(img, _reference_prompted_image(bb, tiny_images, vp), atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(img, bb.model.encode_image(tiny_images), atol=1e-5, rtol=1e-5)


def test_only_prompts_receive_gradients(tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], PromptConfig(coupling="coupled-v2t", n_ctx=2, depth=3))
    clf(tiny_images).logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in clf.prompt_parameters())
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())


def test_text_init_from_phrase(tiny_backbone):
    bb = tiny_backbone
    clf = PromptedClassifier(bb, ["dog"], PromptConfig(coupling="text", n_ctx=4, depth=1, text_init="a photo of a"))
    ids = bb.tokenizer(["a photo of a"])[0][1:5]
    torch.testing.assert_close(clf.model.prompt.text_ctx[0].data, bb.model.token_embedding.weight[ids])
    # at init the learned prompt reproduces the hand-written one
    hand = PromptedClassifier(bb, ["dog"], templates=["a photo of a {}."])
    with torch.no_grad():
        torch.testing.assert_close(clf.text_features(), hand.text_features(), atol=1e-5, rtol=1e-5)


def test_trace_matches_multihead_attention(tiny_backbone, tiny_images):
    bb = tiny_backbone
    model = PromptedCLIP(bb.model, bb.tokenizer, PromptConfig(coupling="vision", n_ctx=2, depth=2))
    with torch.no_grad():
        _, tr = model.encode_image(tiny_images, TraceSpec(blocks=(-2, -1), attn=True))
        for b in (1, 2):
            blk = bb.model.visual.transformer.resblocks[b]
            bt = tr[b]
            h = blk.ln_1(bt.x_in)
            out, weights = blk.attn(h, h, h, need_weights=True, average_attn_weights=False)
            torch.testing.assert_close(bt.attn, weights, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(blk.attn.out_proj(bt.attn_out), out, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(bt.x_out, blk(bt.x_in), atol=1e-6, rtol=1e-5)
        assert tr.n_patches == 16 and tr.n_prompts == 2 and tr.grid == (4, 4)
        assert tr.last.x_out.shape[1] == 1 + 16 + 2


def test_text_trace_causal_and_eot(tiny_backbone):
    bb = tiny_backbone
    clf = PromptedClassifier(bb, ["dog", "ankle boot"], PromptConfig(coupling="text", n_ctx=2, depth=1))
    with torch.no_grad():
        _, tr = clf.encode_text(TraceSpec(blocks=(-1,), attn=True))
    attn = tr.last.attn
    assert torch.all(attn.triu(1) == 0)  # causal
    assert tr.eot.tolist() == [1 + 2 + 1 + 1, 1 + 2 + 2 + 1]  # SOS, ctx, name, '.', EOT index


class _Counter:
    def __init__(self, clf):
        self.clf = clf
        self.start = clf.text_encode_count

    @property
    def n(self):
        return self.clf.text_encode_count - self.start


def test_text_features_cached_until_prompts_change(tiny_backbone, tiny_images):
    zs = PromptedClassifier(tiny_backbone, ["a", "b", "c"])
    c = _Counter(zs)
    for _ in range(3):
        zs(tiny_images)
    assert c.n == 1  # fixed prompts: encoded once, with or without grad mode

    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], PromptConfig(coupling="text", n_ctx=2, depth=2))
    c = _Counter(clf)
    with torch.no_grad():
        a = clf(tiny_images)
        clf(tiny_images)
    assert c.n == 1
    opt = torch.optim.SGD(clf.prompt_parameters(), lr=1.0)
    clf(tiny_images).sum().backward()  # training forward needs the graph: encodes
    assert c.n == 2
    opt.step()
    with torch.no_grad():
        b = clf(tiny_images)
    assert c.n == 3 and not torch.allclose(a, b)  # prompts changed → recomputed
    with clf.static_text():  # prompts unchanged since the last encode: served from the cache
        for _ in range(4):
            clf(tiny_images.requires_grad_(True)).sum().backward()
    assert c.n == 3
    opt.step()
    with clf.static_text():  # changed: encoded once for the whole block
        for _ in range(4):
            clf(tiny_images.requires_grad_(True)).sum().backward()
    assert c.n == 4


def test_text_cache_filled_under_autocast_stays_full_precision(tiny_backbone, tiny_images):
    """A bf16 clean pass (eval --precision bf16) may be the first to ask for the text features; the
    cache outlives it and fp32 attacks read it, so it must hold the fp32 features, not bf16-rounded ones."""
    reference = PromptedClassifier(tiny_backbone, ["a", "b", "c"])
    with torch.no_grad():
        fp32 = reference.encode_text()[0]
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        clf(tiny_images)                                  # fills the cache under autocast
    cached = clf.text_features()
    assert cached.dtype == torch.float32
    torch.testing.assert_close(cached, fp32, rtol=0, atol=0)
    with torch.no_grad(), clf.static_text(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert clf.text_features().dtype == torch.float32


def test_bad_inputs_raise_clear_errors(tiny_backbone):
    with pytest.raises(ConfigError, match="coupling"):
        PromptConfig(coupling="maple")
    with pytest.raises(ConfigError, match="depth 9 exceeds"):
        PromptedClassifier(tiny_backbone, ["a"], PromptConfig(coupling="coupled", n_ctx=2, depth=9))
    clf = PromptedClassifier(tiny_backbone, ["a", "b"])
    with pytest.raises(ModelError, match="expected images"):
        clf(torch.rand(1, 3, 28, 28))
    with pytest.raises(ModelError, match="unknown open_clip architecture"):
        load_backbone("ViT-B-33")
    with pytest.raises(ModelError, match="exactly one"):
        PromptedClassifier(tiny_backbone, ["a"], templates=["a photo"])
    with pytest.raises(ModelError, match="needs 18 tokens but the text tower holds 16"):
        PromptedClassifier(tiny_backbone, ["ankle boot"], PromptConfig(coupling="text", n_ctx=13, depth=1))


def test_checkpoint_files_load(tmp_path, tiny_backbone):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}
    torch.save(sd, tmp_path / "w.pt")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for f in ("w.pt", "w.safetensors"):
        bb = load_backbone("rp-tiny", tmp_path / f)
        assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in sd.items())
        assert not bb.quick_gelu
    # OpenAI's original files are TorchScript archives: loaded, and switched to QuickGELU
    scripted = open_clip.create_model("rp-tiny", jit=True)
    scripted.load_state_dict(sd, strict=False)
    torch.jit.save(scripted, str(tmp_path / "openai.pt"))
    bb = load_backbone("rp-tiny", tmp_path / "openai.pt")
    assert bb.quick_gelu
    assert isinstance(bb.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(ModelError, match="does not match architecture"):
        load_backbone("rp-demo", tmp_path / "w.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        load_backbone("rp-tiny", tmp_path / "junk.pt")
    with pytest.raises(ModelError, match="neither a file nor a tag"):
        load_backbone("rp-tiny", "no-such-tag")


def test_prompt_state_roundtrip(tiny_backbone, tiny_images):
    cfg = PromptConfig(coupling="independent", n_ctx=2, depth=2)
    a = PromptedClassifier(tiny_backbone, ["a", "b"], cfg)
    for p in a.prompt_parameters():
        p.data.normal_()
    b = PromptedClassifier(tiny_backbone, ["a", "b"], cfg)
    b.load_prompt_state_dict(a.prompt_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a(tiny_images), b(tiny_images))
    other = PromptedClassifier(tiny_backbone, ["a", "b"], PromptConfig(coupling="independent", n_ctx=3, depth=2))
    with pytest.raises(ModelError, match="does not match"):
        other.load_prompt_state_dict(a.prompt_state_dict())
