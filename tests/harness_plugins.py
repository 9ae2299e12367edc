"""Small defenses for the harness tests only, loaded by a grid's ``plugins:`` (no input
detector or model inspector was registered when the harness was written). They are real
computations, tiny on purpose, and registered under ``test-*`` names.

* ``test-zscore`` (input detector): mean |z| of the penultimate features against the clean
  fit set; triggered inputs move the features, so the score separates them.
* ``test-share`` (inspector): the predicted-class shares on clean images overlaid with
  seeded noise; probability = the largest share.
* ``test-textonly`` (input detector for text only): to check modality validation.
* ``test-crash`` (purifier): ends its process at once, as a dying worker does."""
from __future__ import annotations

import os

import torch

from trojanguard.defenses import DEFENSES
from trojanguard.defenses.base import DefenseConfig, InputDetector, Inspection, Inspector, Purifier


class ZScoreConfig(DefenseConfig):
    frr: float = 0.05


class ZScore(InputDetector):
    name = "test-zscore"
    Config = ZScoreConfig

    @torch.inference_mode()
    def _feats(self, x):
        self.model.eval()
        return self.model.features(x.contiguous(memory_format=torch.channels_last)).float()

    def _fit(self, model, clean):
        x, _ = clean.batch(torch.arange(len(clean)))
        f = self._feats(x)
        self.mu, self.sd = f.mean(0), f.std(0) + 1e-6

    def score(self, inputs):
        return ((self._feats(inputs) - self.mu) / self.sd).abs().mean(1)


class Share(Inspector):
    name = "test-share"

    @torch.inference_mode()
    def inspect(self, model, clean):
        self.check_inputs(model, clean)
        x, _ = clean.batch(torch.arange(len(clean)))
        g = torch.Generator().manual_seed(self.cfg.seed)
        noisy = (0.7 * x + 0.3 * torch.rand(x.shape, generator=g)).contiguous(memory_format=torch.channels_last)
        model.eval()
        share = torch.bincount(model(noisy).argmax(1), minlength=model.head.out_features).float() / len(x)
        p = float(share.max())
        return Inspection(backdoored=p > 0.5, target=int(share.argmax()) if p > 0.5 else None, probability=p,
                          evidence={"shares": share.tolist()})


class TextOnly(ZScore):
    name = "test-textonly"
    modalities = ("text",)


class Crash(Purifier):
    name = "test-crash"

    def _purify(self, model, clean, original):
        os._exit(3)  # a worker that dies mid-cell (OOM kill, segfault)


for _cls, _help in ((ZScore, "test detector"), (Share, "test inspector"), (TextOnly, "text-only test detector"),
                    (Crash, "purifier that kills its process")):
    if _cls.name not in DEFENSES:
        DEFENSES.register(_cls.name, _help)(_cls)
