"""Prompts on the Hugging Face Hub (issue 11 §2): the upload payload and model card (pure, offline),
the push wrapper against stubbed HfApi methods, and the download path — pull, --run hf-hub:ORG/REPO,
load_classifier(prompts="hf-hub:...") — through an offline Hub cache layout in a temporary HF_HOME.
No test touches the network."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import robustprompt as rp
from robustprompt import hub
from robustprompt.cli import main
from robustprompt.config import AttackSpec, DataSpec, ModelSpec
from robustprompt.errors import ConfigError, ModelError
from robustprompt.models import PromptConfig
from test_prompt_files import colour_images, error_line, one_line, tiny_run  # noqa: F401 (tiny_run is a fixture)

REPO = "robust-org/advvlp-colours"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def evaluated_run(tiny_run):  # noqa: F811
    """The tiny training run plus one finished evaluation beside it (an experiment's layout)."""
    from robustprompt.engine.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(model=ModelSpec(run=str(tiny_run["run"])),
                     data=DataSpec(dataset=f"imagefolder:{tiny_run['root']}", batch_size=6),
                     attack=AttackSpec(eps=4, steps=2), device="cpu")
    metrics = evaluate(cfg, tiny_run["run"].parent / "eval-colours", progress=False)
    return {**tiny_run, "eval": metrics}


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize("ref,want", [("hf-hub:org/repo", ("org/repo", None)), ("org/repo", ("org/repo", None)),
                                      ("hf-hub:org/repo@v1.0", ("org/repo", "v1.0")),
                                      (f"org/repo@{COMMIT}", ("org/repo", COMMIT))])
def test_repo_references(ref, want):
    assert hub.parse_ref(ref) == want


@pytest.mark.parametrize("ref,words", [("hf-hub:noslash", "expected ORG/REPO"), ("hf-hub:org/repo@", "nothing after '@'"),
                                       ("hf-hub:a//b", "not a Hub repo id"), ("hf-hub:org/re po", "not a Hub repo id"),
                                       ("hf-hub:" + "o/" + "x" * 5000, "not a Hub repo id")])
def test_bad_repo_references_are_one_line(ref, words):
    with pytest.raises(ConfigError) as exc:
        hub.parse_ref(ref, "--run")
    msg = one_line(exc)
    assert words in msg and msg.startswith("--run") and len(msg) < 600


# ----------------------------------------------------------------------------- payload and card
def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def markdown_table(card: str, first_header: str) -> list[list[str]]:
    """The rows of the markdown table whose header starts with `first_header`, cells stripped."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header}"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append(cells)
    assert set(rows[1][0]) <= {"-"}   # the separator line
    return [rows[0]] + rows[2:]


def test_payload_holds_the_run_and_a_card_with_its_numbers(evaluated_run, tmp_path):
    run, ev = evaluated_run["run"], evaluated_run["eval"]
    files = hub.build_payload(run, tmp_path, REPO, license="mit")
    assert sorted(map(str, files)) == sorted(["prompts.safetensors", "config.yaml", "metrics.json",
                                              "evals/eval-colours/metrics.json", "README.md"])
    for name in ("prompts.safetensors", "config.yaml", "metrics.json"):
        assert (tmp_path / name).read_bytes() == (run / name).read_bytes()
    card = (tmp_path / "README.md").read_text()
    front = front_matter(card)
    assert front["library_name"] == "robustprompt" and front["license"] == "mit"
    assert {"robustprompt", "advvlp", "adversarial-robustness"} <= set(front["tags"])
    assert "base_model" not in front   # the backbone is a local file, not a Hub repo
    # the accuracy table: the evaluation's numbers and the last training epoch's, as in the json files
    table = markdown_table(card, "evaluated on")
    assert table[0] == hub.ACCURACY_HEADER
    rows = {r[0]: r for r in table[1:]}
    assert len(rows) == 2
    e = rows[f"imagefolder:{evaluated_run['root']} (test split, all classes)"]
    assert e[1] == "PGD-2 ℓ∞ ε=4/255 α=1/255"
    assert abs(float(e[2]) - ev["clean_acc"]) <= 0.005 and abs(float(e[3]) - ev["robust_acc"]) <= 0.005
    assert int(e[4]) == ev["n"] == 6
    last = evaluated_run["metrics"]["epochs"][-1]
    t = rows["training images (colours, last epoch)"]
    assert t[1] == "PGD-1 ℓ∞ ε=4/255 α=2/255"
    assert "train_clean_acc" not in last and t[2] == "–"   # AdvVLP trains on adversarial images only
    assert abs(float(t[3]) - last["train_adv_acc"]) <= 0.005
    assert int(t[4]) == 6
    # what the card says about the run
    sha = rp.read_prompt_meta(run / "prompts.safetensors").weights_sha256
    assert sha in card and "advvlp" in card and "rp-tiny" in card
    # how to load: the exact lines
    assert f'rp.load_classifier(prompts="hf-hub:{REPO}")' in card
    assert f"robustprompt eval --run hf-hub:{REPO} --dataset imagefolder:{evaluated_run['root']} --attack pgd --eps 4" in card
    assert f"robustprompt pull {REPO}" in card


def test_card_cells_stay_cells_and_hub_backbones_are_base_models(tmp_path):
    """Class names and dataset names are user content: a '|' or a newline must not break the table."""
    run = tmp_path / "imported"
    rp.write_prompts(run, {"text_ctx.0": torch.zeros(2, 32)}, prompt=PromptConfig(coupling="text", n_ctx=2, depth=1),
                     model=ModelSpec(name="hf-hub:timm/some-clip"), classnames=["a|b", "line\nbreak", "c"],
                     templates=["a photo of a {}."], method="coop", dataset={"name": "my|data\nset", "shots": 4},
                     weights_sha256="cd" * 32,
                     backbone_info={"hub_repo": "timm/some-clip", "hub_revision": COMMIT})
    hub.build_payload(run, tmp_path, REPO)
    card = (tmp_path / "README.md").read_text()
    assert front_matter(card)["base_model"] == "timm/some-clip" and "license" not in front_matter(card)
    assert f"Hub revision {COMMIT}" in card and "cd" * 32 in card
    table_lines = [line for line in card.splitlines() if line.startswith("|")]
    assert table_lines and all(len(re.split(r"(?<!\\)\|", line)) == 4 for line in table_lines)   # 2 columns each
    assert "No evaluation was recorded" in card


def test_payload_refuses_what_cannot_be_shared(tmp_path, tiny_run):  # noqa: F811
    with pytest.raises(ConfigError, match="is not a finished training run"):
        hub.build_payload(tmp_path / "nothing", tmp_path, REPO)
    old = tmp_path / "old"
    shutil.copytree(tiny_run["run"], old)
    save_file(load_file(str(old / "prompts.safetensors")), str(old / "prompts.safetensors"))   # no metadata
    (tmp_path / "dest").mkdir()
    with pytest.raises(ModelError) as exc:
        hub.build_payload(old, tmp_path / "dest", REPO)
    assert "does not describe itself" in one_line(exc)


# ----------------------------------------------------------------------------- push (HfApi stubbed)
class StubHub:
    """Stands in for HfApi's network methods: records every call, and the files of the uploaded folder."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}
        self.folder: Path | None = None
        self.fail = fail

    def install(self, monkeypatch):
        import huggingface_hub

        stub = self

        def create_repo(self, **kw):
            stub.calls.append(("create_repo", kw))
            if stub.fail is not None:
                raise stub.fail
            return f"https://huggingface.co/{kw['repo_id']}"

        def create_branch(self, **kw):
            stub.calls.append(("create_branch", kw))

        def upload_folder(self, **kw):
            stub.calls.append(("upload_folder", kw))
            stub.folder = Path(kw["folder_path"])
            stub.files = {str(p.relative_to(stub.folder)): p.read_bytes() for p in stub.folder.rglob("*") if p.is_file()}
            return SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/{COMMIT}", oid=COMMIT)

        for name, fn in (("create_repo", create_repo), ("create_branch", create_branch),
                         ("upload_folder", upload_folder)):
            monkeypatch.setattr(huggingface_hub.HfApi, name, fn)
        return self


def test_push_creates_the_repo_and_uploads_one_folder(evaluated_run, monkeypatch, tmp_path, capsys):
    stub = StubHub().install(monkeypatch)
    url = rp.push(evaluated_run["run"], REPO, private=True, revision="robust-v1", token="hf_test", license="mit")
    assert url == f"https://huggingface.co/{REPO}/commit/{COMMIT}"
    assert [c[0] for c in stub.calls] == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (c[1] for c in stub.calls)
    assert create == {"repo_id": REPO, "repo_type": "model", "private": True, "exist_ok": True, "token": "hf_test"}
    assert branch == {"repo_id": REPO, "repo_type": "model", "branch": "robust-v1", "exist_ok": True, "token": "hf_test"}
    assert upload["repo_id"] == REPO and upload["revision"] == "robust-v1" and upload["token"] == "hf_test"
    assert upload["repo_type"] == "model" and upload["commit_message"] == "robustprompt push run"
    # the uploaded folder is the payload, byte for byte, and it is gone afterwards
    want = tmp_path / "payload"
    want.mkdir()
    hub.build_payload(evaluated_run["run"], want, REPO, license="mit")
    assert stub.files == {str(p.relative_to(want)): p.read_bytes() for p in want.rglob("*") if p.is_file()}
    assert not stub.folder.exists()
    # the CLI: no branch asked, none created; an existing repo is fine (exist_ok)
    stub.calls.clear()
    assert main(["push", str(evaluated_run["run"]), REPO, "--token", "hf_cli"]) == 0
    assert [c[0] for c in stub.calls] == ["create_repo", "upload_folder"]
    assert stub.calls[0][1]["private"] is False and stub.calls[1][1]["revision"] is None
    out = capsys.readouterr().out
    assert COMMIT in out and f'rp.load_classifier(prompts="hf-hub:{REPO}")' in out


def _http_error(cls, status: int):
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
    return cls(f"{status} Client Error", response=response)


def _push_failures():
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError

    return [("no-network", httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"), "cannot reach the Hub"),
            ("unauthorised", _http_error(HfHubHTTPError, 401), "not allowed (HTTP 401)"),
            ("forbidden", _http_error(HfHubHTTPError, 403), "lacks write access"),
            ("missing", _http_error(RepositoryNotFoundError, 404), "repo not found"),
            ("server", _http_error(HfHubHTTPError, 503), "HTTP 503"),
            ("token", LocalTokenNotFoundError("Token is required"), "no Hugging Face token")]


@pytest.mark.parametrize("case", range(6))
def test_push_failures_are_one_line(case, evaluated_run, monkeypatch, capsys):
    name, error, words = _push_failures()[case]
    StubHub(fail=error).install(monkeypatch)
    assert main(["push", str(evaluated_run["run"]), REPO, "--token", "hf_x"]) == 2
    err = error_line(capsys.readouterr().err)
    assert words in err and f"hf-hub:{REPO}" in err, (name, err)


def test_push_checks_before_any_network_call(evaluated_run, monkeypatch, tmp_path, capsys):
    import huggingface_hub

    stub = StubHub().install(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(evaluated_run["run"]), REPO]) == 2
    err = error_line(capsys.readouterr().err)
    assert "no Hugging Face token" in err and "--token" in err
    assert main(["push", str(tmp_path), REPO, "--token", "t"]) == 2
    assert "is not a finished training run" in capsys.readouterr().err
    assert main(["push", str(evaluated_run["run"]), "not a repo", "--token", "t"]) == 2
    assert "expected ORG/REPO" in capsys.readouterr().err
    assert stub.calls == []
    # a bug is not dressed up as a Hub error
    StubHub(fail=ValueError("a bug")).install(monkeypatch)
    with pytest.raises(ValueError, match="a bug"):
        rp.push(evaluated_run["run"], REPO, token="t")


# ----------------------------------------------------------------------------- download (offline cache)
@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A temporary HF_HOME in offline mode; `place(repo, folder)` puts a snapshot of `folder` into
    its cache as the Hub's own layout: hub/models--ORG--REPO/{refs/main, snapshots/<commit>/...}."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))   # read at import time
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def place(repo: str, folder: Path, commit: str = COMMIT) -> Path:
        base = home / "hub" / ("models--" + repo.replace("/", "--"))
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text(commit)
        snap = base / "snapshots" / commit
        shutil.copytree(folder, snap)
        return snap

    return place


@pytest.fixture
def published(evaluated_run, offline_hub, tmp_path):
    payload = tmp_path / "payload"
    payload.mkdir()
    hub.build_payload(evaluated_run["run"], payload, REPO)
    return offline_hub(REPO, payload)


def test_prompts_from_the_hub_rebuild_the_trained_classifier(evaluated_run, published):
    x = colour_images(evaluated_run["root"])
    with torch.no_grad():
        ref = evaluated_run["clf"](x)
        for kw in ({"prompts": f"hf-hub:{REPO}"}, {"run": f"hf-hub:{REPO}"}, {"prompts": f"hf-hub:{REPO}@{COMMIT}"}):
            torch.testing.assert_close(rp.load_classifier(**kw)(x), ref, rtol=0, atol=0)
    assert hub.resolve_run(f"hf-hub:{REPO}") == str(published)
    assert ModelSpec(run=f"hf-hub:{REPO}").run == str(published)   # resolved once, where a run is named


def test_pull_and_eval_run_from_the_hub(evaluated_run, published, tmp_path, capsys):
    out = tmp_path / "pulled"
    assert main(["pull", REPO, "--out", str(out)]) == 0
    assert (out / "prompts.safetensors").read_bytes() == (evaluated_run["run"] / "prompts.safetensors").read_bytes()
    assert {p.name for p in out.iterdir()} == {"prompts.safetensors", "config.yaml", "metrics.json", "README.md", "evals"}
    assert str(out) in capsys.readouterr().out
    # the pulled folder is a run --run accepts; so is the repo itself
    x = colour_images(evaluated_run["root"])
    with torch.no_grad():
        torch.testing.assert_close(rp.load_classifier(run=str(out))(x), evaluated_run["clf"](x), rtol=0, atol=0)
    ev = ["eval", "--dataset", f"imagefolder:{evaluated_run['root']}", "--attack", "pgd", "--eps", "4", "--steps", "2",
          "--device", "cpu", "--no-progress"]
    assert main(ev + ["--run", f"hf-hub:{REPO}", "--out", str(tmp_path / "e-hub")]) == 0
    recorded = yaml.safe_load((tmp_path / "e-hub" / "config.yaml").read_text())["model"]["run"]
    assert recorded == str(published) and COMMIT in recorded   # the commit the prompts came from
    import json

    got = json.loads((tmp_path / "e-hub" / "metrics.json").read_text())
    assert (got["clean_acc"], got["robust_acc"]) == (evaluated_run["eval"]["clean_acc"], evaluated_run["eval"]["robust_acc"])


def test_hub_download_failures_are_one_line(offline_hub, tmp_path, capsys):
    with pytest.raises(ModelError) as exc:
        rp.load_classifier(prompts="hf-hub:robust-org/not-there")
    msg = one_line(exc)
    assert "hf-hub:robust-org/not-there" in msg and "not in the local Hugging Face cache" in msg
    assert main(["pull", "robust-org/not-there"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "not in the local Hugging Face cache" in err
    assert main(["eval", "--run", "hf-hub:robust-org/not-there", "--attack", "none"]) == 2
    assert "hf-hub:robust-org/not-there" in capsys.readouterr().err
    # a backbone repo is not a prompt repo
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    (backbone / "open_clip_config.json").write_text("{}")
    offline_hub("timm/a-backbone", backbone)
    with pytest.raises(ModelError) as exc:
        rp.load_classifier(run="hf-hub:timm/a-backbone")
    assert "holds no prompts.safetensors" in one_line(exc)
    with pytest.raises(ConfigError, match="names revision"):
        hub.pull(f"hf-hub:{REPO}@v1", revision="v2")
