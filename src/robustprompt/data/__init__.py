"""Datasets for robust prompt learning: CoOp benchmarks, ImageNet shifts, Fashion-MNIST and
your own images.

Build any of them with ``build_dataset(name, root=None, download=False)``. Names are
case-insensitive and hyphens, underscores or no separators all work ("oxford-pets",
"imagenet-a", "fgvc_aircraft", "food101"). Each dataset has splits among 'train', 'val' and
'test' (the ImageNet variants and plain image folders are test only; ImageNet has 'train' and
'test', its official validation set serving as 'test').

CoOp datasets: all live under one data root (``root=``), in the layout of the CoOp
repository's DATASETS.md. Split files are ``{"train"|"val"|"test": [[path, label, classname]]}``
with paths relative to the image directory::

    caltech101      caltech-101/101_ObjectCategories/   caltech-101/split_zhou_Caltech101.json
    oxford_pets     oxford_pets/images/                 oxford_pets/split_zhou_OxfordPets.json
    stanford_cars   stanford_cars/                      stanford_cars/split_zhou_StanfordCars.json
    oxford_flowers  oxford_flowers/jpg/                 oxford_flowers/split_zhou_OxfordFlowers.json
    food101         food-101/images/                    food-101/split_zhou_Food101.json
    sun397          sun397/SUN397/                      sun397/split_zhou_SUN397.json
    dtd             dtd/images/                         dtd/split_zhou_DescribableTextures.json
    eurosat         eurosat/2750/                       eurosat/split_zhou_EuroSAT.json
    ucf101          ucf101/UCF-101-midframes/           ucf101/split_zhou_UCF101.json
    fgvc_aircraft   fgvc_aircraft/images/<id>.jpg, fgvc_aircraft/variants.txt (one class a line),
                    fgvc_aircraft/images_variant_{train,val,test}.txt ("<id> <class name>")
    imagenet        imagenet/images/train/<wnid>/*, imagenet/images/val/<wnid>/*,
                    imagenet/classnames.txt ("<wnid> <class name>", in label order)
    imagenetv2      imagenetv2/imagenetv2-matched-frequency-format-val/<label 0..999>/*
    imagenet_sketch imagenet-sketch/images/<wnid>/*
    imagenet_a      imagenet-adversarial/imagenet-a/<wnid>/*   (its 200 classes, relabelled 0..199)
    imagenet_r      imagenet-rendition/imagenet-r/<wnid>/*     (likewise)

The ImageNet variants read ``classnames.txt`` from their own folder, else from ``imagenet/``.

fashion_mnist: the four IDX files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``, gzipped or not) are looked for in
``<root>/fashion-mnist/``, ``<root>/fashion_mnist/``, ``<root>/``, then
``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``), then a
previous download in the cache; ``download=True`` fetches them with torchvision into
``robustprompt.paths.cache_dir()``.

``imagefolder:<path>``: ``<path>/<split>/<class>/<image>`` when ``<path>/train``, ``val`` or
``test`` exists, else ``<path>/<class>/<image>`` (all 'test'). Classes are the sorted folder
names. Extensions: .jpg .jpeg .png .bmp .webp .tif .tiff.

``csv:<file>``: a CSV with header ``path,label`` and optionally ``split`` (default 'test');
paths relative to the CSV's folder unless absolute; labels are class names, sorted, or ordered
by a ``classnames.txt`` (one name a line) next to the CSV.

Class names are shown with "_" replaced by " ". Images are served as RGB PIL images; wrap a
split with ``ImageDataset(split, clip_transform(224))`` for tensors in [0, 1] (no
normalisation: the model normalises).
"""
from robustprompt.data.base import Dataset, ImageDataset, Split
from robustprompt.data.fewshot import base_new_split, few_shot_indices, split_fingerprint, subsample
from robustprompt.data.registry import build_dataset, canonical_name, list_datasets
from robustprompt.data.transforms import clip_transform

__all__ = [
    "Dataset",
    "ImageDataset",
    "Split",
    "base_new_split",
    "build_dataset",
    "canonical_name",
    "clip_transform",
    "few_shot_indices",
    "list_datasets",
    "split_fingerprint",
    "subsample",
]
