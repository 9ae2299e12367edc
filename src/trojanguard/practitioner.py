"""The practitioner's workflow: scan a model someone gave you, repair it, guard it.

* ``scan(model, clean)``: EBYD (expose by clean unlearning, the class that takes over, a
  calibrated backdoor probability, the trigger recovered on the exposed model) with Neural
  Cleanse on the original model as a second opinion for image models.
* ``repair(model, clean)``: a purification recipe chosen by modality and clean-data size,
  a verification part of the clean data kept aside, CA before/after on it, ASR before/after
  with the trigger the scan recovered, ASR after the retuning attack with that trigger;
  ``ok`` is False (and the CLI exits non-zero) when the repaired model lost more than
  ``max_ca_drop`` on the verification part, or when the recovered trigger still works after
  the repair (``backdoor_remains``): a broken or still-backdoored model is never presented as
  repaired.
* ``guard``: ``trojanguard.guard`` (BadActs by default).

Every function takes a model with the trojanguard interface (our checkpoints,
``trojanguard.wrap`` for any ``nn.Module``, local Hugging Face directories) and labelled
clean data; the CLI commands are thin wrappers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .data.base import Data
from .errors import UserError

# The recovered trigger "still works" after a repair when it sends more than this share of
# the held-out clean inputs to the target (the 10 % ASR bar of the benchmark tables) and more
# than half of what it sent before (relative, because a recovered trigger can be a universal
# adversarial patch that moves a clean model too: EBYD's trigger_success reaches 41 % on a
# clean CIFAR-10 zoo model); a trigger that sent < 20 % before proves nothing either way.
REMAINS_ASR, REMAINS_MIN_BEFORE = 0.10, 0.20
VERIFY_FRACTION = 0.2  # share of the clean data `repair` keeps aside to verify itself

# What a failed repair advises trying next, by modality and by what failed, in the order the
# reference zoos support (benchmarks/results/leaderboard.md, session 13). CIFAR-10: of the
# purifiers that removed backdoors, FST and EBYD removal cost the least clean accuracy (mean
# drop 1.2 and 1.0 points against PAM rho 0.25's 2.0); by models brought to ASR <= 10 % within
# 3 CA points, PAM rho 0.25 9/13 (and the most robust to retuning), FST 10/13, EBYD removal 4/6.
# SST-2: only PAM removed anything (FT, FST, WIPER, Fine-Pruning, EBYD removal left BadNets
# 20 %, and where run AddSent 20 %, at >= 99 %), so a failed text repair has nothing to fall back on.
ALTERNATIVES = {("image", "ca"): ("fst", "ebyd-removal"),
                ("image", "remains"): ("pam", "fst", "ebyd-removal"),
                ("text", "ca"): ("pam",), ("text", "remains"): ("pam",)}
GUARD_ADVICE = "serve it behind an input detector (trojanguard guard) that flags triggered inputs"


def repair_alternatives(modality: str, failure: str, method: str) -> str:
    """The advice's next steps after ``method`` failed by ``failure`` ("ca": lost clean
    accuracy; "remains": the recovered trigger still works): other methods the zoos support,
    never the one that failed, then the guard; the guard alone when there is none."""
    others = [m for m in ALTERNATIVES.get((modality, failure), ()) if m != method]
    if others:
        return f"try --method {' or '.join(others)}, or {GUARD_ADVICE}"
    what = "kept clean accuracy better" if failure == "ca" else "removed such backdoors"
    return f"no other method {what} on our reference zoo; {GUARD_ADVICE}"


def backdoor_remains(asr_before: float | None, asr_after: float | None) -> bool | None:
    """Whether a repair left the recovered trigger working (None: nothing to judge by)."""
    if asr_before is None or asr_after is None or asr_before < REMAINS_MIN_BEFORE:
        return None
    return asr_after > max(REMAINS_ASR, 0.5 * asr_before)


@dataclass
class RecoveredTrigger:
    """A trigger recovered by the scan, usable wherever an attack artifact is
    (``trigger(x, y)``, ``target_for(y)``): a mask and pattern for images
    (x' = (1 - m) x + m p); for text the scan's best word (``tokens[0]``, the one that sent
    most of the sentences the model was surest about to the target) inserted at the front.
    One word, not all of ``tokens``: the scan scored and calibrated each word alone, and five
    sentiment words together move a clean sentiment model too, so a repair would be judged
    "backdoor remains" by a trigger no single word of which was a backdoor."""
    target: int
    mask: torch.Tensor | None = None
    pattern: torch.Tensor | None = None
    tokens: list[str] | None = None
    name: str = "recovered"
    word_rates: list[dict] | None = None  # text: each word's flip rates as the scan measured them

    def trigger(self, x, y=None):
        if self.tokens is not None:
            return [f"{self.tokens[0]} {s}" for s in x]
        m = self.mask.to(x.device, x.dtype)
        return ((1 - m) * x + m * self.pattern.to(x.device, x.dtype)).clamp(0, 1)

    def target_for(self, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, self.target)

    @classmethod
    def from_inspection(cls, trig: dict | None, target: int | None) -> "RecoveredTrigger | None":
        if not trig or target is None:
            return None
        if trig.get("tokens"):
            return cls(target, tokens=list(trig["tokens"]), word_rates=list(trig.get("candidates") or []))
        if trig.get("mask") is not None:
            return cls(target, mask=trig["mask"].detach().cpu(), pattern=trig["pattern"].detach().cpu())
        return None


@dataclass
class ScanReport:
    verdict: str
    probability: float
    target: int | None
    evidence: dict
    trigger: RecoveredTrigger | None
    second_opinion: dict | None
    seconds: float
    choices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "probability": self.probability, "target": self.target,
                "evidence": self.evidence, "second_opinion": self.second_opinion, "seconds": round(self.seconds, 1),
                "trigger": None if self.trigger is None else
                ({"tokens": self.trigger.tokens, "words": self.trigger.word_rates} if self.trigger.tokens else
                 {"mask_l1": float(self.trigger.mask.abs().sum())}),
                "choices": self.choices}


def scan(model, clean: Data, seed: int = 0, second_opinion: bool = True, progress: bool = False,
         ebyd_options: dict | None = None, nc_options: dict | None = None, device: str = "auto") -> ScanReport:
    from .defenses import create_defense
    t0 = time.perf_counter()
    ebyd = create_defense("ebyd", **{"seed": seed, "progress": progress, "device": device, **(ebyd_options or {})})
    ins = ebyd.inspect(model, clean)
    recipe, exposure = ins.evidence.get("recipe"), ins.evidence.get("exposure", "cul")
    if exposure != "cul":
        why = f"exposure by {exposure}, with the exposure script's stopping rule"
    else:
        why = {"detection-script": "clean unlearning with the official detection script's fixed budget, which "
                                   "leaves a clean image model spread out (measured better on the CIFAR-10 zoo)",
               "exposure-script": "clean unlearning with the official exposure script's stopping rule"}.get(recipe, recipe)
    choices = [f"EBYD: exposing the model reveals the backdoor ({why}); the verdict is its calibrated "
               "probability >= 0.5"]
    top = ins.evidence.get("top_class")
    trigger = RecoveredTrigger.from_inspection(ins.trigger, ins.target)
    if trigger is not None:
        tried = ", ".join(str(c["class"]) for c in ins.evidence.get("candidates", []))
        if trigger.tokens is None:
            confirm = ins.evidence.get("confirm")
            rule = (f"the class with the smallest trigger among those whose trigger also sends >= {confirm:.0%} of the "
                    "original model's clean inputs to it (when any does: a global trigger needs a large mask), else "
                    "the class with the smallest trigger") if confirm is not None and confirm <= 1 else \
                "the class with the smallest trigger"
            choices.append(f"trigger recovered by Neural Cleanse on the exposed model for the most predicted classes "
                           f"({tried}); target {ins.target}: {rule}")
        else:
            where = " and the ".join((ins.trigger or {}).get("searched_on", ["exposed"]))
            choices.append(f"trigger words searched on the {where} model for classes {tried}; target "
                           f"{ins.target}: the class whose word flips most of the sentences the original model is "
                           "surest are not that class (a sentiment word tips undecided sentences, a backdoor word "
                           "overrides confident ones)")
        refined = ins.evidence.get("refined")
        if refined:
            choices.append(
                f"that trigger sent only {refined['exposed_success_original']:.0%} of the original model's clean "
                f"inputs to the target, so Neural Cleanse also ran on the original model for target {ins.target}: "
                + (f"its trigger ({refined['success_original']:.0%}) is the one reported" if refined["kept"] else
                   f"it did no better ({refined['success_original']:.0%}), the exposed model's trigger is kept"
                   if refined["success_original"] <= refined["exposed_success_original"] else
                   f"its trigger moved {refined['success_original']:.0%} but with a mask of {refined['mask_l1']} px, "
                   "over the size limit (a large enough patch moves any model's inputs), so the exposed model's "
                   "trigger is kept"))
    opinion = None
    if second_opinion and clean.modality == "image":
        nc = create_defense("nc", **{"seed": seed, "progress": progress, "device": device, **(nc_options or {})})
        n = nc.inspect(model, clean)
        opinion = {"method": "nc", "verdict": n.verdict, "probability": n.probability, "target": n.target,
                   "anomaly_index": n.evidence.get("anomaly_index"), "norms": n.evidence.get("norms"),
                   "seconds": round(n.seconds, 1)}
        choices.append("Neural Cleanse on the original model as a second opinion (anomaly index > 2)")
    elif second_opinion:
        choices.append("no second opinion for text models (Neural Cleanse reverses image triggers)")
    evidence = {**ins.evidence, "top_class": top}
    reliability = calibration_reliability(ebyd, clean.modality)
    if reliability is not None:
        evidence["calibration_auroc_out_of_sample"] = reliability
        choices.append(f"the calibration's own out-of-sample AUROC on the reference zoo for {clean.modality} models "
                       f"is {reliability:.2f}" + ("" if reliability >= 0.75 else
                                                 ": this probability carries little evidence; weigh the recovered "
                                                 "trigger" + (" and the second opinion" if opinion else "")
                                                 + " instead"))
    return ScanReport(ins.verdict, ins.probability, ins.target, evidence, trigger,
                      opinion, time.perf_counter() - t0, choices)


def calibration_reliability(ebyd, modality: str) -> float | None:
    """Leave-one-out AUROC the shipped calibration of ``ebyd``'s recipe recorded for
    ``modality`` when it was fitted (None: a user's calibration file, or not recorded)."""
    from .defenses.ebyd_calibration import load_calibration
    if ebyd.cfg.calibration is not None:
        return None
    prov = load_calibration(recipe=ebyd.recipe(modality)).get("provenance", {})
    auroc = prov.get("leave_one_out", {}).get(modality, {}).get("auroc")
    return None if auroc is None else round(float(auroc), 3)


def choose_recipe(modality: str, n_clean: int) -> tuple[str, dict, str]:
    """The purification recipe for the data at hand, with the reason (measured on the
    reference zoos: benchmarks/results/purify-*.csv)."""
    if modality == "text":
        # measured through the harness on the SST-2 zoo (purify-sst2-harness.csv): BadNets 20 %
        # ASR 100 -> 13.7 % at -0.8 CA with PAM's inverted trigger words, AddSent 20 % 100 ->
        # 16.9 % at -0.4 (the word "3d"); FST leaves 99.5 % and 100 % (fst-text-sst2.md: no
        # FST recipe we tried goes below 69 %)
        return "pam", {}, ("text: PAM, unlearning the trigger words a token search inverts (on the SST-2 zoo it "
                           "took BadNets 20 % from 100 to 13.7 % ASR and AddSent 20 % to 16.9 %, where FST left "
                           "99.5 % and 100 %)")
    if n_clean < 1500:
        # measured on the CIFAR-10 BadNets zoo model: at 475 images FST's defaults take 40 steps and
        # leave ASR at 79.5 %; batch 32 x 20 epochs reaches ASR 0.2 % (CA -7 points at 400 images)
        return "fst", {"batch_size": 32, "epochs": 20, "alpha": 0.2}, (
            f"{n_clean} clean images: FST with small batches and more epochs, so that enough steps are taken")
    if n_clean < 2000:
        return "fst", {}, f"{n_clean} clean images: FST with the paper's defaults (10 epochs, batch 128, alpha 0.1)"
    # measured through the harness on the CIFAR-10 zoo with 2,250 training images
    # (purify-cifar10-harness.csv): PAM at rho 0.25 brings BadNets, Blended and WaNet 10 % to
    # ASR <= 2.1 % within 2.2 CA points; FST leaves Blended 10 % at 100 %. Below 2,000 images
    # PAM is unmeasured, so FST stays there.
    return "pam", {"rho": 0.25}, (
        f"{n_clean} clean images: PAM at rho 0.25 (on the CIFAR-10 zoo it removed BadNets, Blended and "
        f"WaNet within 2.2 CA points on the test set; FST left Blended 10 % at 100 %)")


@dataclass
class RepairReport:
    method: str
    options: dict
    reason: str
    record: dict
    ok: bool
    advice: str | None
    cautions: list[str] = field(default_factory=list)  # what the checks could not show (the model is kept)

    def as_dict(self) -> dict[str, Any]:
        return {**self.record, "method": self.method, "options": self.options, "reason": self.reason,
                "ok": self.ok, "advice": self.advice, "cautions": self.cautions}


def repair_plan(clean: Data, method: str | None = None, options: dict | None = None, seed: int = 0,
                verify_fraction: float = VERIFY_FRACTION, max_ca_drop: float = 0.03, progress: bool = False,
                device: str = "auto", model=None):
    """(method, options, reason, purifier) that ``repair`` will use on ``clean``: the options
    (and, given ``model``, the purifier's preflight on it) are checked here, so that a typo
    or a missing requirement fails before a scan, not after it."""
    from .defenses import create_defense
    from .purification import resolve_purifier
    if method is not None:
        method = resolve_purifier(method)
    if method is None:
        method, auto_opts, reason = choose_recipe(clean.modality, round(len(clean) * (1 - verify_fraction)))
        options = {**auto_opts, **(options or {})}
    else:
        reason, options = f"--method {method}", dict(options or {})
    # the split is the purifier's own (same fraction and seed): --set cannot move it
    options = {k: v for k, v in options.items() if k not in ("verify_fraction", "max_ca_drop")}
    if "seed" in options:  # a second seed would split the clean data apart from repair's own split
        raise UserError("give the seed once, as repair(seed=...) (--seed on the command line), not in the options")
    defense = create_defense(method, **{"seed": seed, "progress": progress, "device": device, **options,
                                        "verify_fraction": verify_fraction, "max_ca_drop": max_ca_drop})
    if model is not None:
        defense.preflight(model, clean)
    # as validated (--set gives strings: "epochs": "20" is recorded as 20)
    options = {k: getattr(defense.cfg, k, v) for k, v in options.items()}
    return method, options, reason, defense


def repair(model, clean: Data, method: str | None = None, options: dict | None = None,
           trigger: RecoveredTrigger | None = None, seed: int = 0, verify_fraction: float = VERIFY_FRACTION,
           max_ca_drop: float = 0.03, robustness: bool = True, progress: bool = False,
           device: str = "auto") -> tuple[torch.nn.Module, RepairReport]:
    """Purify ``model`` on part of ``clean``, verify on the rest; see the module docstring."""
    from .defenses.common import retuning_attack, split_clean
    from .eval.evaluate import evaluate
    method, options, reason, defense = repair_plan(clean, method, options, seed, verify_fraction, max_ca_drop,
                                                   progress, device)
    # one split for everything: the purifier's own verification uses the same fraction and seed
    fit, verify = split_clean(clean, verify_fraction, seed)
    res = defense.purify(model, clean)
    record: dict[str, Any] = {**res.summary()}
    # "options" stays what the recipe chose (RepairReport); the purifier's whole validated config beside it
    record["config"] = record.pop("options")
    remains = None
    if trigger is not None:
        b = evaluate(model, verify, trigger.trigger, trigger.target_for)
        a = evaluate(res.model, verify, trigger.trigger, trigger.target_for)
        remains = backdoor_remains(b.get("asr"), a.get("asr"))
        record.update(recovered_trigger_asr_before=b.get("asr"), recovered_trigger_asr_after=a.get("asr"),
                      backdoor_remains=remains)
        if robustness and not remains:  # a backdoor still in place needs no attack to come back
            tuned = retuning_attack(res.model, fit, trigger, n_clean=min(1000, len(fit)), seed=seed, device=device)
            record["recovered_trigger_asr_after_retuning"] = evaluate(tuned, verify, trigger.trigger,
                                                                      trigger.target_for).get("asr")
    advice = None
    if res.warning:
        advice = (f"clean accuracy on {res.verify_size} held-out clean samples fell from {res.ca_before:.1%} to "
                  f"{res.ca_after:.1%} (more than {max_ca_drop:.0%}). Advice: give more clean data (now {len(clean)})"
                  + (", lower --set alpha" if method == "fst" else "") + "; "
                  + repair_alternatives(clean.modality, "ca", method))
    elif remains:
        advice = (f"the trigger the scan recovered still sends {record['recovered_trigger_asr_after']:.1%} of the "
                  f"held-out clean inputs to class {trigger.target} after {method} (before: "
                  f"{record['recovered_trigger_asr_before']:.1%}): the backdoor remains. Advice: "
                  + repair_alternatives(clean.modality, "remains", method))
    ok = res.ok and not remains
    return res.model, RepairReport(method, options, reason, record, ok, advice,
                                   repair_cautions(record, max_ca_drop, len(clean)) if ok else [])


def repair_cautions(record: dict, max_ca_drop: float, n_clean: int) -> list[str]:
    """What a passed repair's checks could not rule out: a clean-accuracy loss above the bar
    within the paired 95 % bound of the verification part (a small part cannot show a small
    loss), a backdoor no recovered trigger could test (none recovered, or one the original
    model does not obey), and a backdoor the retuning attack brings back (hidden rather
    than removed)."""
    out = []
    bound, n = record.get("verify_drop_bound95"), record.get("verify_size") or 0
    if bound is not None and n:
        # the normal bound is 0 when no sample changed; 3/n is the 95 % bound of a rate seen 0
        # times in n (the rule of three): 40 samples cannot rule out a loss of 7.5 points
        bound = max(bound, 3 / n)
    if bound is not None and round(bound, 9) > max_ca_drop:
        out.append(f"the {record['verify_size']} held-out clean samples cannot rule out a clean-accuracy loss of up "
                   f"to {bound:.1%} (paired 95 % bound; the bar is {max_ca_drop:.0%}): give more clean data (now "
                   f"{n_clean}) to verify the repair")
    before = record.get("recovered_trigger_asr_before")
    if "recovered_trigger_asr_before" not in record:
        out.append("no recovered trigger was available (no scan, or the scan recovered none), so the repair was "
                   "checked on clean accuracy only: nothing here shows that a backdoor, if there is one, is gone")
    elif before is not None and before < REMAINS_MIN_BEFORE:
        # a trigger the original model does not obey cannot show whether the repair removed anything
        out.append(f"the trigger the scan recovered sends only {before:.1%} of the held-out clean inputs of the "
                   f"ORIGINAL model to the suspected target (under {REMAINS_MIN_BEFORE:.0%}), so it cannot show "
                   "whether the backdoor is gone; check the repaired model with the real trigger if you have "
                   "it (trojanguard eval --attack)")
    retuned = record.get("recovered_trigger_asr_after_retuning")
    if retuned is not None and retuned > REMAINS_ASR:
        out.append(f"the retuning attack (5 triggered among the clean samples, 5 epochs) brings the recovered "
                   f"trigger's ASR back to {retuned:.1%}: the backdoor may be hidden rather than removed")
    return out
