"""``trojanguard demo``: the whole story offline in well under 3 minutes on a CPU.

Embedded digits -> BadNets backdoor in a small CNN -> CA/ASR -> repaired with FST (and
plain fine-tuning for comparison) on the defender's held-out clean set -> before/after
table with DER and the time of every stage."""
from __future__ import annotations

import time

from .attacks import create_attack
from .defenses import create_defense
from .eval.evaluate import evaluate
from .eval.metrics import defense_effectiveness_rating
from .pipeline import build_model, prepare_data
from .report import percent_rows, table
from .train import recipe_for, train
from .utils import atomic_write_json, library_versions, measure, seed_everything


def run_demo(seed: int = 0, device: str = "auto", out: str | None = None, progress: bool = True,
             holdout: float = 0.1) -> dict:
    t0 = time.perf_counter()
    prep = prepare_data("digits", holdout=holdout, seed=seed)
    attack = create_attack("badnets", target=0, ratio=0.1, seed=seed)
    poisoned = attack.poison(prep.train)
    print(f"[1/3] digits: {len(prep.train)} training images, {poisoned.count} poisoned with a "
          f"{attack.cfg.patch_size}x{attack.cfg.patch_size} BadNets patch -> label 0; "
          f"{len(prep.defense)} clean images held out for the defender")
    seed_everything(seed)
    model = build_model("small_cnn", prep.bundle)
    with measure("train-backdoored") as st:
        train(model, poisoned.data, cfg=recipe_for("digits", "small_cnn", seed=seed, device=device,
                                                     progress=progress))
    before = evaluate(model, prep.bundle.test, attack.trigger, attack.target_for)
    rows = [{"model": "backdoored", **before, "der": float("nan"), "seconds": round(st.seconds, 1)}]
    print(f"[2/3] backdoored model trained in {st.seconds:.1f} s: CA {before['ca']:.1%}, ASR {before['asr']:.1%}")
    for name in ("ft", "fst"):
        with measure(name) as sd:
            fixed = create_defense(name, seed=seed, device=device, progress=progress,
                                   epochs=10, batch_size=32).purify(model, prep.defense).model
        after = evaluate(fixed, prep.bundle.test, attack.trigger, attack.target_for)
        der = defense_effectiveness_rating(before["ca"], before["asr"], after["ca"], after["asr"])
        rows.append({"model": f"after {name.upper()}", **after, "der": der, "seconds": round(sd.seconds, 1)})
    print("[3/3] repaired with fine-tuning (FT) and Feature Shift Tuning (FST) on the held-out clean set\n")
    print(table(percent_rows(rows), ["model", "ca", "asr", "ra", "der", "seconds"]))
    total = time.perf_counter() - t0
    print(f"\ntotal time {total:.1f} s. CA = clean accuracy, ASR = attack success rate on triggered "
          "non-target test images, RA = their accuracy, DER = defense effectiveness rating (0.5 = no change).")
    result = {"rows": rows, "seconds": total, "seed": seed, "attack": attack.describe(),
              "dataset": prep.describe(), "versions": library_versions()}
    if out:
        atomic_write_json(out, result)
        print(f"saved {out}")
    return result
