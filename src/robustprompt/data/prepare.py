"""`robustprompt data prepare`: fetch the public archives of a CoOp-layout dataset and say, step
by step, what has to be done by hand (registration-only images, CoOp's split files).

The archives are the ones torchvision's own dataset downloaders fetch; each is extracted where
the CoOp layout wants it. CoOp's ``split_zhou_*.json`` files are shared from Google Drive links
listed in CoOp's DATASETS.md; those are not fetched (a Drive link is not a stable public URL), so
they are always a manual step, as are Stanford Cars, UCF101, Caltech-101 and the ImageNet family.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from robustprompt.data.coop import SPLIT_JSON_LAYOUTS
from robustprompt.data.registry import FASHION_MNIST, canonical_name
from robustprompt.errors import DatasetError

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@dataclass(frozen=True)
class Step:
    """``download``: fetch ``url`` and extract it into ``<root>/<into>``; ``move``: rename
    ``<root>/<src>`` to ``<root>/<into>``; ``manual``: ``text`` for the user to do."""

    kind: str
    text: str
    url: Optional[str] = None
    into: str = ""
    src: str = ""


def _fetch(url: str, into: str, what: str) -> Step:
    return Step("download", f"download {what} ({url}) and extract it into <root>/{into}", url=url, into=into)


def _split_file(name: str) -> Step:
    layout = SPLIT_JSON_LAYOUTS[name]
    return Step("manual", f"download {layout.split_file} (CoOp's split; linked from {COOP_DATASETS_MD}) "
                          f"into <root>/{layout.folder}/")


_VGG = "https://www.robots.ox.ac.uk/~vgg/data"
PLANS: dict[str, list[Step]] = {
    "oxford_pets": [_fetch(f"{_VGG}/pets/data/images.tar.gz", "oxford_pets", "the Oxford-IIIT Pet images"),
                    _split_file("oxford_pets")],
    "oxford_flowers": [_fetch(f"{_VGG}/flowers/102/102flowers.tgz", "oxford_flowers", "the Flowers-102 images"),
                       _split_file("oxford_flowers")],
    "food101": [_fetch("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "", "Food-101"),
                _split_file("food101")],
    "dtd": [_fetch(f"{_VGG}/dtd/download/dtd-r1.0.1.tar.gz", "", "DTD"), _split_file("dtd")],
    "eurosat": [_fetch("https://madm.dfki.de/files/sentinel/EuroSAT.zip", "eurosat", "EuroSAT (RGB)"),
                _split_file("eurosat")],
    "sun397": [_fetch("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", "sun397", "SUN397"),
               _split_file("sun397")],
    "fgvc_aircraft": [
        _fetch(f"{_VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz", "", "FGVC-Aircraft 2013b"),
        Step("move", "rename <root>/fgvc-aircraft-2013b/data to <root>/fgvc_aircraft",
             src="fgvc-aircraft-2013b/data", into="fgvc_aircraft"),
    ],
    "caltech101": [Step("manual", "download 101_ObjectCategories.tar.gz from https://data.caltech.edu/records/"
                                  "mzrjq-6wc02 and extract it into <root>/caltech-101/ (giving "
                                  "caltech-101/101_ObjectCategories/)"),
                   _split_file("caltech101")],
    "stanford_cars": [Step("manual", "get the Stanford Cars train and test images (cars_train/, cars_test/) and "
                                     "devkit (its original host is gone; CoOp's DATASETS.md names mirrors) into "
                                     "<root>/stanford_cars/"),
                      _split_file("stanford_cars")],
    "ucf101": [Step("manual", f"download UCF-101-midframes.zip (CoOp's middle frames; linked from "
                              f"{COOP_DATASETS_MD}) and extract it into <root>/ucf101/"),
               _split_file("ucf101")],
    "imagenet": [Step("manual", "register at https://image-net.org, download the ILSVRC-2012 train and val "
                                "images, and arrange them as <root>/imagenet/images/train/<wnid>/ and "
                                "<root>/imagenet/images/val/<wnid>/ (val sorted into wnid folders)"),
                 Step("manual", "write <root>/imagenet/classnames.txt: '<wnid> <class name>' per line in label "
                                f"order (CoOp's DATASETS.md links one)")],
    "imagenetv2": [Step("manual", "download ImageNetV2 matched-frequency (https://huggingface.co/datasets/"
                                  "vaishaal/ImageNetV2) and extract it into <root>/imagenetv2/ (giving "
                                  "imagenetv2-matched-frequency-format-val/)"),
                   Step("manual", "copy imagenet/classnames.txt into <root>/imagenetv2/ (or keep it in imagenet/)")],
    "imagenet_sketch": [Step("manual", "download ImageNet-Sketch (https://github.com/HaohanWang/ImageNet-Sketch) "
                                       "and extract it as <root>/imagenet-sketch/images/<wnid>/")],
    "imagenet_a": [_fetch("https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar", "imagenet-adversarial",
                          "ImageNet-A")],
    "imagenet_r": [_fetch("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", "imagenet-rendition",
                          "ImageNet-R")],
}


def prepare_plan(name: str) -> list[Step]:
    """The steps that put dataset ``name`` into the CoOp layout (DatasetError for fashion_mnist)."""
    canonical = canonical_name(name)
    if canonical == FASHION_MNIST:
        raise DatasetError("fashion_mnist needs no prepare: pass --download to eval/train (or install "
                           "dataset-fashion-mnist) and it is found automatically")
    return PLANS[canonical]


Downloader = Callable[[str, str], None]   # (url, folder) -> the archive downloaded and extracted there


def _torchvision_download(url: str, folder: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(url, download_root=folder, remove_finished=True)


def prepare(name: str, root: str | Path, *, dry_run: bool = False,
            download: Optional[Downloader] = None) -> list[str]:
    """Run the automatic steps of ``prepare_plan(name)`` under ``root`` (none if ``dry_run``) and
    return the report: what was (or would be) fetched, then the manual steps, numbered."""
    root = Path(root).expanduser()
    download = download or _torchvision_download
    lines, manual = [], []
    for step in prepare_plan(name):
        target = root / step.into
        if step.kind == "download":
            if dry_run:
                lines.append(f"would {step.text.replace('<root>', str(root))}")
                continue
            target.mkdir(parents=True, exist_ok=True)
            download(step.url or "", str(target))
            lines.append(f"fetched {step.url} into {target}")
        elif step.kind == "move":
            src = root / step.src
            if dry_run:
                lines.append(f"would {step.text.replace('<root>', str(root))}")
            elif target.exists():
                lines.append(f"kept {target} (already there)")
            elif src.exists():
                src.rename(target)
                lines.append(f"moved {src} to {target}")
            else:
                manual.append(step.text.replace("<root>", str(root)))
        else:
            manual.append(step.text.replace("<root>", str(root)))
    if manual:
        lines.append("by hand:")
        lines += [f"  {i}. {text}" for i, text in enumerate(manual, 1)]
    lines.append(f"then: robustprompt data check --dataset {canonical_name(name)} --root {root}")
    return lines
