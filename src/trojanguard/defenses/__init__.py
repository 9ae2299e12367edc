"""Defenses by name: ``create_defense("fst")``."""
from __future__ import annotations

from functools import partial

from ..registry import Registry
from .base import Defense, DefenseConfig, InputDetector, Inspection, Inspector, Purifier, PurifyResult
from .common import before_after, retuned_asr, retuning_attack
from .badacts import BadActs, BadActsConfig
from .beniful import BeniFul, BeniFulConfig
from .beniful_removal import BeniFulRemoval, BeniFulRemovalConfig
from .rap import RAP, RAPConfig
from .strip import STRIP, STRIPConfig
from .anp import Anp, AnpConfig
from .finetune import Finetune, FinetuneConfig
from .fine_pruning import FinePruning, FinePruningConfig
from .fine_mixing import FineMixing, FineMixingConfig
from .ibau import Ibau, IbauConfig
from .nad import Nad, NadConfig
from .pam import Pam, PamConfig
from .wiper import Wiper, WiperConfig
from .ebyd import EBYD, EBYDConfig
from .ebyd_removal import EBYDRemoval, EBYDRemovalConfig
from .neural_cleanse import NeuralCleanse, NeuralCleanseConfig

DEFENSES: Registry = Registry("defense")
DEFENSES.register("fst", "Feature Shift Tuning (Min et al. 2023)")(partial(Finetune, mode="fst"))
DEFENSES.register("ft", "vanilla fine-tuning of all parameters")(partial(Finetune, mode="ft"))
DEFENSES.register("lp", "linear probing: re-train the head only")(partial(Finetune, mode="lp"))
DEFENSES.register("fe-tuning", "re-initialised frozen head, tune the backbone")(partial(Finetune, mode="fe-tuning"))
DEFENSES.register("ft-init", "re-initialised head, tune all, no penalty")(partial(Finetune, mode="ft-init"))
DEFENSES.register("pam", "Path-Aware Minimization with trigger-inverted unlearning (Min et al. 2024)")(Pam)
DEFENSES.register("wiper", "benign salience + Adaptive Regularization (WIPER, 2022)")(Wiper)
DEFENSES.register("fine-pruning", "prune units dormant on clean data, then fine-tune (Liu et al. 2018)")(FinePruning)
DEFENSES.register("fine-mixing", "text: reset E-PUR's most-moved rare-word embeddings and most fine-tuned weights "
                  "to the pre-trained encoder's, then fine-tune on clean data (Zhang et al. 2022)")(FineMixing)
DEFENSES.register("nad", "Neural Attention Distillation from a clean-tuned teacher (Li et al. 2021)")(Nad)
DEFENSES.register("anp", "Adversarial Neuron Pruning of normalisation-layer neurons (Wu and Wang 2021)")(Anp)
DEFENSES.register("i-bau", "implicit-hypergradient unlearning of a universal perturbation (Zeng et al. 2022)")(Ibau)
DEFENSES.register("badacts", "BadActs NAS input detection + activation-interval purification "
                  "(Yi et al. 2024; vision: our extension)")(BadActs)
DEFENSES.register("beniful", "BeniFul input detection: VAE on middle-layer features, reconstruction error + "
                  "prediction consistency (our reading: no public code)")(BeniFul)
DEFENSES.register("beniful-removal", "BeniFul removal: fine-tuning that pulls suspect middle features onto the "
                  "VAE's benign reconstruction (the purifier of 'beniful'; our reading: no public code)")(BeniFulRemoval)
DEFENSES.register("strip", "STRIP input detection: prediction entropy under superimposition (images) or "
                  "TF-IDF word swaps (text) (Gao et al. 2019)")(STRIP)
DEFENSES.register("rap", "RAP text input detection: robustness-aware rare-word perturbation "
                  "(Yang et al. 2021)")(RAP)
DEFENSES.register("ebyd", "Expose Before You Defend inspection: clean unlearning, target label, calibrated "
                  "backdoor probability, trigger recovery (Li et al. 2024; text trigger search: our reading)")(EBYD)
DEFENSES.register("ebyd-removal", "EBYD removal, RNP style: unlearn, learn neuron masks, prune the original "
                  "(the purifier of 'ebyd'; tau chosen on held-out clean accuracy: our reading)")(EBYDRemoval)
DEFENSES.register("nc", "Neural Cleanse inspection: per-class trigger reverse engineering, MAD anomaly "
                  "index (Wang et al. 2019; images)")(NeuralCleanse)


def create_defense(name: str, **kwargs) -> Defense:
    return DEFENSES.get(name)(**kwargs)


__all__ = ["DEFENSES", "create_defense", "Defense", "DefenseConfig", "Purifier", "InputDetector",
           "Inspector", "PurifyResult", "Inspection", "Finetune", "FinetuneConfig", "Pam", "PamConfig", "Wiper",
           "WiperConfig", "FinePruning", "FinePruningConfig", "FineMixing", "FineMixingConfig", "Nad", "NadConfig", "Anp", "AnpConfig", "Ibau",
           "IbauConfig", "retuning_attack", "retuned_asr", "before_after",
           "BadActs", "BadActsConfig", "EBYD", "EBYDConfig", "EBYDRemoval", "EBYDRemovalConfig",
           "NeuralCleanse", "NeuralCleanseConfig", "BeniFul", "BeniFulConfig", "BeniFulRemoval",
           "BeniFulRemovalConfig", "RAP", "RAPConfig", "STRIP", "STRIPConfig"]
