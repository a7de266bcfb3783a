"""Plain-text output for the terminal."""
from __future__ import annotations

from typing import Any, Sequence

from ..attacks.threat import eps_text


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-style markdown table, readable as plain text too."""
    cells = [[str(c) for c in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def print_metrics(m: dict[str, Any]) -> None:
    threat = m.get("threat", {})
    label = m.get("threat_label") or threat.get("attack", "")
    what = m.get("method", "")
    if m.get("kind") == "tta":
        what = f"{m['tta_method']} test-time defence (prompts: {what})"
    print(f"{m['dataset']} ({m['split']}, {m['n']} images, {m['n_classes']} classes) — "
          f"{what} on {m['backbone']['name']} [{m['backbone']['weights']}]")
    print(f"  clean accuracy : {m['clean_acc']:.2f}%")
    if threat.get("attack") != "none" and m.get("attacks"):
        # several attacks: each one's accuracy, then the worst case per image (robust_acc)
        quant = ", adversarial images rounded to 8 bits" if m.get("quantize_adv") else ""
        for a in m["attacks"]:
            print(f"  under {a.get('title', a['key'])}: {a['acc']:.2f}%")
        print(f"  robust accuracy: {m['robust_acc']:.2f}%  worst case per image over {len(m['attacks'])} attacks, "
              f"{threat.get('norm', '')} eps={eps_text(threat)}{quant}")
    elif threat.get("attack") != "none":
        extra = ""
        if m.get("kind") == "tta":
            extra = " (adaptive: the whole defence is attacked)" if m.get("adaptive") else " (non-adaptive)"
            if m.get("quantize_adv"):
                extra += ", adversarial images rounded to 8 bits"
        print(f"  robust accuracy: {m['robust_acc']:.2f}%  under {label} {_threat_text(threat)}{extra}")
    if m.get("kind") == "tta":
        print(f"  without defence: clean {m['base_clean_acc']:.2f}%, robust {m['base_robust_acc']:.2f}%")
    print(f"  wall time      : {m['wall_time_s']:.1f} s")


def _threat_text(t: dict[str, Any]) -> str:
    parts = [f"{t.get('norm', '')} eps={eps_text(t)}"]
    if "steps" in t:
        parts.append(f"steps={t['steps']} alpha={eps_text(t, 'alpha')}")
        if t.get("restarts", 1) != 1:
            parts.append(f"restarts={t['restarts']}")
        if t.get("loss", "ce") != "ce":
            parts.append(f"loss={t['loss']}")
    return " ".join(parts)


def print_train_summary(m: dict[str, Any]) -> None:
    shots = "all" if m.get("shots") is None else f"{m['shots']}-shot"
    print(f"trained {m['method']} on {m['dataset']} ({shots}, {m['n_train']} images, seed {m['seed']}) "
          f"— {m['n_prompt_parameters']} prompt parameters")
    for h in m.get("epochs", [])[-3:]:
        accs = " ".join(f"{k}={h[k]:.1f}" for k in sorted(h) if k.startswith("train_") and k.endswith("_acc"))
        print(f"  epoch {h['epoch']}: loss {h['loss']:.4f} lr {h['lr']:.2e} {accs}")
    shares = format_grad_shares(m.get("epochs", [])[-1:] and m["epochs"][-1])
    if shares:
        print(f"  weighted gradient share per loss term (first step of the last epoch): {shares}")
    print(f"  wall time: {m['wall_time_s']:.1f} s")


def format_grad_shares(summary: dict[str, Any]) -> str:
    """'nat 12.3% (|g| 2.1), adv 80.1% (|g| 11.9), …' from an epoch summary's grad_share/grad_norm keys."""
    if not summary:
        return ""
    names = [k[len("grad_share."):] for k in summary if k.startswith("grad_share.")]
    return ", ".join(f"{n} {100 * summary[f'grad_share.{n}']:.3g}% (|g| {summary.get(f'grad_norm.{n}', 0.0):.3g})"
                     for n in names)
