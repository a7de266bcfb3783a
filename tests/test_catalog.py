"""`robustprompt list ...` and `robustprompt.catalog`: every listed name is one that the code consuming
it accepts, and the CLI prints them."""
from __future__ import annotations

import open_clip
import pytest

import robustprompt as rp
from robustprompt import catalog
from robustprompt.attacks import ThreatModel
from robustprompt.cli import LIST_KINDS, main
from robustprompt.config import AttackSpec
from robustprompt.errors import ConfigError, DatasetError, ModelError


def _printed(capsys, argv) -> list[str]:
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_the_python_api_and_the_cli_have_the_same_lists():
    assert rp.catalog is catalog and "catalog" in rp.__all__
    assert LIST_KINDS == tuple(catalog.LISTS)


@pytest.mark.parametrize("kind", LIST_KINDS)
def test_the_cli_prints_every_listed_name_first_on_its_line(kind, capsys):
    lines = _printed(capsys, ["list", kind])
    entries = catalog.LISTS[kind]()
    names = [e[0] if isinstance(e, tuple) else getattr(e, "name", e) for e in entries]
    assert len(lines) == len(names) > 0
    assert [line.split()[0] for line in lines] == names


def test_methods_is_list_methods(capsys):
    assert _printed(capsys, ["methods"]) == _printed(capsys, ["list", "methods"])


def test_every_listed_method_builds_through_the_registry():
    from robustprompt.methods import build_method, method_class

    infos = catalog.methods()
    assert {"coop", "maple", "fap", "cba_fapt", "apt", "zeroshot"} <= {m.name for m in infos}
    for m in infos:
        built = build_method(m.name, None, ThreatModel())
        assert built.name == m.name and built.adversarial == m.adversarial
        assert m.prompt == method_class(m.name).default_prompt


def test_every_listed_tta_procedure_builds_through_the_registry():
    from robustprompt.tta.procedures import build_procedure

    from robustprompt.errors import ConfigError

    infos = catalog.tta()
    assert {"tpt", "ctpt", "mta", "rtpt", "atpt", "ttc", "tapt"} == {t.name for t in infos}
    for t in infos:
        if t.name == "tapt":   # needs its statistics file, and says so in one line
            with pytest.raises(ConfigError, match="tapt needs its token statistics"):
                build_procedure(t.name)
            continue
        assert build_procedure(t.name).name == t.name


def test_every_listed_attack_validates_in_the_config_and_nothing_else_does():
    infos = catalog.attacks()
    for a in infos:
        AttackSpec(attack=a.name)
        for norm in a.norms:
            AttackSpec(attack=a.name, norm=norm)
        for loss in a.losses:
            AttackSpec(attack=a.name, loss=loss)
        for version in a.versions:
            AttackSpec(attack=a.name, aa_version=version)
    for unlisted in ("apgd", "cw", "square", "PGD"):
        with pytest.raises(ConfigError, match="unknown attack"):
            AttackSpec(attack=unlisted)


def test_every_listed_dataset_name_is_accepted_and_needs_what_it_says(tmp_path):
    from robustprompt.data.fashion_mnist import build_fashion_mnist
    from robustprompt.data.registry import build_dataset, canonical_name

    infos = catalog.datasets()
    for d in infos:
        if ":" in d.name:       # imagefolder:PATH, csv:PATH: the prefix is taken, the empty folder refused
            with pytest.raises(DatasetError) as err:
                build_dataset(d.name.replace("PATH", str(tmp_path / "none")))
            assert "unknown dataset" not in str(err.value)
            continue
        assert canonical_name(d.name) == d.name
        if d.needs_root:
            with pytest.raises(DatasetError, match="needs a data root"):
                build_dataset(d.name)
            with pytest.raises(DatasetError) as err:     # an empty root: the message names the folder listed
                build_dataset(d.name, tmp_path)
            assert str(tmp_path / d.folder.rstrip("/")) in str(err.value), (d.name, str(err.value))
        else:
            assert d.download and "download" in build_fashion_mnist.__code__.co_varnames


def test_every_listed_model_is_an_architecture_load_backbone_takes():
    names = catalog.models()
    assert names[0] == "demo" and "ViT-B-32" in names and "rp-tiny" in names
    for name in names[1:]:
        assert open_clip.get_model_config(name) is not None, name


def test_every_listed_pretrained_pair_is_known_to_open_clip(monkeypatch):
    pairs = catalog.pretrained()
    assert pairs[0] == ("demo", "demo") and ("ViT-B-32", "openai") in pairs
    archs = set(catalog.models())
    for arch, tag in pairs[1:]:
        assert arch in archs and open_clip.get_pretrained_cfg(arch, tag), (arch, tag)
    # the demo pair is what get_backbone accepts for the demo (its own weights), without building it
    import robustprompt.demo.backbone as demo
    from robustprompt.api import get_backbone

    monkeypatch.setattr(demo, "load_demo_backbone", lambda device="cpu": "the demo backbone")
    assert get_backbone("demo", "demo") == "the demo backbone"


def test_pretrained_filters_by_architecture_and_refuses_unknown_ones(capsys):
    only = catalog.pretrained("ViT-B/32")
    assert only and all(m == "ViT-B-32" for m, _ in only)
    assert only == [(m, t) for m, t in catalog.pretrained() if m == "ViT-B-32"]
    assert [line.split()[1] for line in _printed(capsys, ["list", "pretrained", "--model", "ViT-B-32"])] == \
        [t for _, t in only]
    with pytest.raises(ModelError, match="did you mean ViT-B-32"):
        catalog.pretrained("ViT-B-33")
    for argv in (["list", "pretrained", "--model", "ViT-B-33"], ["list", "methods", "--model", "ViT-B-32"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("robustprompt list: error: ")
