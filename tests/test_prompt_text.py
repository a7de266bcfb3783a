"""Class prompt text and context init as MaPLe's and FAP's released code build them (issue 8 §4).

MaPLe (trainers/maple.py): ctx_init "a photo of a", n_ctx 2 → context = token embeddings
1…n_ctx of the tokenised phrase, prompt string = phrase + " " + name + ".", the context replaces
positions 1…n_ctx. FAP (trainers/fap.py, advmaple.py): the same, with the dataset's template
(CUSTOM_TEMPLATES[dataset], '{}' kept) as the phrase. References below use open_clip's own
tokenizer and token_embedding, not our code.
"""
import open_clip
import pytest
import torch

from robustprompt.errors import ConfigError, ModelError
from robustprompt.models import PromptConfig, PromptedClassifier


def _ref_tokens(texts, length):
    return open_clip.tokenize(texts)[:, :length]


def _emb(bb, ids):
    return bb.model.token_embedding.weight[ids]


@pytest.mark.parametrize("coupling", ["text", "coupled", "independent", "fap"])
def test_phrase_mode_prompt_tokens_and_init(tiny_backbone, coupling):
    bb = tiny_backbone
    names = ["dog", "ankle_boot"]
    clf = PromptedClassifier(bb, names, PromptConfig(coupling=coupling, n_ctx=2, depth=1, text_init="a photo of a",
                                                     text_init_mode="phrase"))
    L = clf.tokens.shape[1]
    ref = _ref_tokens(["X X of a dog.", "X X of a ankle boot."], L)
    assert torch.equal(clf.tokens.cpu(), ref)
    a_photo = open_clip.tokenize(["a photo"])[0, 1:3]
    torch.testing.assert_close(clf.model.prompt.text_ctx[0].data, _emb(bb, a_photo))


def test_phrase_mode_at_init_is_the_hand_written_prompt(tiny_backbone):
    """Context "a photo" + fixed "of a {class}." is exactly the text "a photo of a {class}."."""
    bb = tiny_backbone
    names = ["dog", "cat"]
    clf = PromptedClassifier(bb, names, PromptConfig(coupling="text", n_ctx=2, depth=1, text_init_mode="phrase"))
    with torch.no_grad():
        ref = torch.nn.functional.normalize(bb.model.encode_text(open_clip.tokenize(
            ["a photo of a dog.", "a photo of a cat."])[:, :clf.tokens.shape[1]]), dim=-1)
        torch.testing.assert_close(clf.text_features(), ref, atol=1e-5, rtol=1e-5)


def test_template_mode_follows_fap_released_code(tiny_backbone):
    bb = tiny_backbone
    template = "a photo of a {}, a pet."
    clf = PromptedClassifier(bb, ["abyssinian"], PromptConfig(coupling="fap", n_ctx=2, depth=2,
                                                             text_init_mode="template"), templates=[template])
    L = clf.tokens.shape[1]
    # FAP: prompt_prefix = CUSTOM_TEMPLATES[dataset] (with its '{}'), prompts = prefix + " " + name + "."
    assert torch.equal(clf.tokens.cpu(), _ref_tokens(["X X of a {}, a pet. abyssinian."], L))
    first_two = open_clip.tokenize([template])[0, 1:3]
    torch.testing.assert_close(clf.model.prompt.text_ctx[0].data, _emb(bb, first_two))
    # switching label sets re-forms the text from the new template, keeping the learned context
    ctx = clf.model.prompt.text_ctx[0].data.clone()
    clf.set_classnames(["pug"], ["{} texture."])
    ref = _ref_tokens(["{} texture. pug."], L).clone()
    ref[:, 1:3] = open_clip.tokenize(["X"])[0, 1]   # its first two tokens carry the context
    assert torch.equal(clf.tokens.cpu(), ref)
    assert torch.equal(clf.model.prompt.text_ctx[0].data, ctx)


def test_placeholder_mode_is_unchanged(tiny_backbone):
    bb = tiny_backbone
    clf = PromptedClassifier(bb, ["dog"], PromptConfig(coupling="coupled", n_ctx=2, depth=1))
    assert clf.prompt_cfg.text_init_mode == "placeholder"
    assert torch.equal(clf.tokens.cpu(), _ref_tokens(["X X dog."], clf.tokens.shape[1]))
    # "a photo of a" has 4 tokens, n_ctx is 2: random init, as before
    a_photo = open_clip.tokenize(["a photo"])[0, 1:3]
    assert not torch.allclose(clf.model.prompt.text_ctx[0].data, _emb(bb, a_photo))


def test_phrase_shorter_than_n_ctx_is_refused(tiny_backbone):
    with pytest.raises(ConfigError, match="fewer than n_ctx"):
        PromptedClassifier(tiny_backbone, ["dog"], PromptConfig(coupling="text", n_ctx=4, depth=1, text_init="a photo",
                                                                text_init_mode="phrase"))
    with pytest.raises(ModelError, match="fewer tokens than n_ctx"):  # v2t: no free text context to init
        PromptedClassifier(tiny_backbone, ["dog"], PromptConfig(coupling="coupled-v2t", n_ctx=4, depth=1,
                                                                text_init="a photo", text_init_mode="phrase"))
    with pytest.raises(ConfigError, match="text_init_mode"):
        PromptConfig(coupling="text", text_init_mode="released")


def test_no_prompts_still_equal_open_clip_in_every_mode(tiny_backbone, tiny_images):
    bb = tiny_backbone
    for mode in ("placeholder", "phrase", "template"):
        clf = PromptedClassifier(bb, ["dog", "cat"], PromptConfig(coupling="none", text_init_mode=mode),
                                 templates=["a photo of a {}."])
        with torch.no_grad():
            ref = torch.nn.functional.normalize(
                bb.model.encode_text(open_clip.tokenize(["a photo of a dog.", "a photo of a cat."])[:, :clf.tokens.shape[1]]),
                dim=-1)
            torch.testing.assert_close(clf.text_features(), ref, atol=1e-5, rtol=1e-5)
