"""The interface every training-time method implements, and the registry that finds it by name.

A method turns a batch (x, y) into a loss over prompt parameters. It may attack the classifier
(through `robustprompt.attacks`), ask for traced forwards, or keep extra trainable modules (APD's
teacher). The training engine knows nothing else about it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..attacks.threat import ThreatModel
from ..registry import Registry
from ..models import PromptConfig, PromptedClassifier


@dataclass
class StepResult:
    """What one training step reports: the loss to minimise, its named terms (for logging and
    non-finite checks), the weight of each term in the loss (loss = Σ weights[k]·terms[k], for the
    gradient-share diagnostics), and logits for running accuracies."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    clean_logits: Optional[torch.Tensor] = None
    adv_logits: Optional[torch.Tensor] = None
    weights: dict[str, float] = field(default_factory=dict)
    aux_logits: dict[str, torch.Tensor] = field(default_factory=dict)   # other models' logits, e.g. a teacher's

    @classmethod
    def weighted(cls, terms: dict[str, torch.Tensor], weights: dict[str, float], **kw) -> "StepResult":
        """loss = Σ weights[k]·terms[k]; every weighted term must be a named term."""
        missing = set(weights) - set(terms)
        if missing:
            raise ValueError(f"weights name terms that do not exist: {sorted(missing)}")
        loss = sum(float(w) * terms[k] for k, w in weights.items())
        return cls(loss, terms, weights=dict(weights), **kw)


@dataclass
class NoParams:
    """Methods without hyperparameters of their own."""


class Method:
    """Base class. Subclasses set the class attributes and implement `step`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""               # display name in tables ("CBA-FAPT")
    summary: ClassVar[str] = ""
    default_prompt: ClassVar[PromptConfig] = PromptConfig()
    adversarial: ClassVar[bool] = False
    attack_loss: ClassVar[str] = "ce"      # the loss the training attack maximises
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any, train_threat: ThreatModel) -> None:
        self.params = params
        self.train_threat = train_threat.with_(loss=self.attack_loss) if self.adversarial else train_threat

    # ---------------------------------------------------------------- life cycle
    def setup(self, clf: PromptedClassifier, make_classifier) -> None:
        """Called once before training. `make_classifier(prompt_cfg)` builds another classifier
        on the same frozen backbone and class names (for teachers or fixed attack models)."""

    def trainable_groups(self, clf: PromptedClassifier) -> list[list[nn.Parameter]]:
        """Parameter groups, each with its own optimiser (the student's prompts by default)."""
        return [clf.prompt_parameters()]

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the classifier's prompts that a checkpoint must keep."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    @property
    def trains(self) -> bool:
        return True

    # ---------------------------------------------------------------- the step
    def step(self, clf: PromptedClassifier, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers
    def attack(self, clf: PromptedClassifier, x: torch.Tensor, y: torch.Tensor,
               text_features: Optional[torch.Tensor] = None,
               clean_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The training attack against `clf`, with the class text features pinned (passing the
        step's own features saves a text-tower pass)."""
        with clf.static_text(text_features):
            return self.train_threat.run(clf, x, y, clean_logits=clean_logits)


METHODS: Registry[type[Method]] = Registry("method")
register = METHODS.register
list_methods = METHODS.names
method_class = METHODS.get


def build_method(name: str, params: Optional[dict], train_threat: ThreatModel) -> Method:
    from ..config import from_dict

    cls = method_class(name)
    return cls(from_dict(cls.Params, params or {}, f"method.params ({cls.name})"), train_threat)


def params_dict(method: Method) -> dict:
    return dataclasses.asdict(method.params)
