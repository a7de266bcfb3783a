"""APD (adversarial prompt distillation): a student with visual and textual prompts learns on
adversarial examples while distilling from a clean teacher CLIP with its own prompts.

  L_student = CE(f_s(x̃), y) + λ·T²·KL(softmax(f_t(x)/T) ‖ softmax(f_s(x̃)/T))
  L_teacher = CE(f_t(x), y)          (teacher="online": trained in the same loop, on clean images)

Only the abstract is public, so these are choices, documented as such: the teacher has the same
prompt layout as the student (independent, 2 tokens, depth 9) and starts from the same
initialisation; it is updated by the same optimiser settings in the same step; the KD target is
detached, so the teacher learns only from its own clean CE (a non-robust teacher, as the paper
stresses). teacher="frozen" uses zero-shot CLIP with the hand-written prompt instead.
Defaults λ = 1, T = 1 (CLIP's logit scale already sharpens the distributions).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import PromptConfig, PromptedClassifier
from .base import Method, StepResult, register


@dataclass
class APDParams:
    lam: float = 1.0
    temperature: float = 1.0
    teacher: str = "online"   # online | frozen

    def __post_init__(self) -> None:
        if self.teacher not in ("online", "frozen"):
            raise ConfigError(f"apd teacher must be online or frozen, got {self.teacher!r}")
        if self.temperature <= 0:
            raise ConfigError(f"apd temperature must be > 0, got {self.temperature}")


@register
class APD(Method):
    name = "apd"
    title = "APD"
    summary = "APD: adversarial student distilled from a clean teacher CLIP (online or frozen)"
    default_prompt = PromptConfig(coupling="independent", n_ctx=2, depth=9, text_init_mode="phrase")  # as AdvVLP's code
    adversarial = True
    Params = APDParams

    def setup(self, clf: PromptedClassifier, make_classifier) -> None:
        online = self.params.teacher == "online"
        self.teacher = make_classifier(clf.prompt_cfg if online else PromptConfig())
        if online:
            self.teacher.load_prompt_state_dict(clf.prompt_state_dict())

    def trainable_groups(self, clf: PromptedClassifier):
        groups = [clf.prompt_parameters()]
        if self.params.teacher == "online":
            groups.append(self.teacher.prompt_parameters())
        return groups

    def extra_state(self) -> dict[str, torch.Tensor]:
        if self.params.teacher != "online":
            return {}
        return {f"teacher.{k}": v for k, v in self.teacher.prompt_state_dict().items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.params.teacher == "online":
            self.teacher.load_prompt_state_dict({k[len("teacher."):]: v for k, v in state.items()
                                                 if k.startswith("teacher.")})

    def step(self, clf: PromptedClassifier, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        T, lam = self.params.temperature, self.params.lam
        txt, _ = clf.encode_text()
        x_adv = self.attack(clf, x, y, txt)
        student = clf.features(x_adv, text=(txt, None)).logits
        terms = {}
        if self.params.teacher == "online":
            teacher = self.teacher(x)
            terms["teacher_ce"] = F.cross_entropy(teacher, y)
        else:
            with torch.no_grad():
                teacher = self.teacher(x)
        target = (teacher.detach() / T).softmax(-1)
        kd = (target * (target.clamp_min(1e-12).log() - (student / T).log_softmax(-1))).sum(-1).mean() * T * T
        ce = F.cross_entropy(student, y)
        terms.update({"adv_ce": ce, "kd": kd})
        weights = {"adv_ce": 1.0, "kd": lam, **({"teacher_ce": 1.0} if "teacher_ce" in terms else {})}
        # the clean logits here are the teacher's: logged as the teacher's accuracy, not the student's
        return StepResult.weighted(terms, weights, adv_logits=student, aux_logits={"teacher_clean": teacher})
