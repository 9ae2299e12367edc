"""i-BAU, implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022).

A minimax problem: the inner player finds a universal adversarial perturbation (UAP)
delta that the model is most sensitive to (a proxy for the unknown trigger); the outer
player updates the model so that clean data carrying delta keeps its labels. The outer
gradient accounts for how delta moves with the weights through the implicit function
theorem: with the inner fixed-point map Phi(delta, theta) = delta - eta grad_delta L_in,
  dL_out/dtheta = dL_out/dtheta|_delta + (dPhi/dtheta)^T v,   v = (I - dPhi/ddelta)^-T dL_out/ddelta,
where v is approximated by K fixed-point iterations v <- (dPhi/ddelta)^T v + dL_out/ddelta
(or K conjugate-gradient steps, ``hypergrad="cg"``).

Each round (BackdoorBench ``defense/i-bau.py``, after the authors' ``YiZeng623/I-BAU``):
  1. delta = 0; one pass over the clean data with SGD lr 10 on
     -CE(f(x + delta), argmax f(x)) + 0.001 ||delta||^2 (labels = the model's own predictions);
  2. for every batch b of the clean data: one Adam step on theta with the hypergradient of
     L_out = CE(f(x_b + delta on 1 % of the batch), y_b), where the inner loss
     L_in = -CE(f(x_0 + delta), y_0) + 0.001 ||delta||^2 is taken on the first batch and
     the inner map is one gradient step of size 0.1.
The model stays in eval mode throughout (BatchNorm statistics are not updated).

Defaults (BackdoorBench ``config/defense/i-bau/cifar10.yaml``): 5 rounds, K = 5
fixed-point iterations, Adam lr 1e-4 (betas 0.9/0.999, no weight decay; the authors' code
uses 1e-3 and batch 100), batch 256, crop+flip augmentation of the clean batches (drawn
once, as the code lists them once), 5 % clean data. BackdoorBench builds a cosine schedule
but never steps it: the rate is constant.

Changes and readings (ours):
* Space of delta: our models normalise inside, so delta lives in [0, 1] pixel space, as in
  the authors' code (their models take [0, 1] images); BackdoorBench adds it to normalised
  tensors. Neither clamps x + delta to [0, 1]; we do not either.
* The outer loss perturbs ``max(1, int(0.01 B))`` samples of a batch: the code's
  ``int(0.01 B)`` is 0 below 100 samples, which would silently turn i-BAU into plain
  fine-tuning on small batches.
* Width-16 PreAct-ResNet18 and 2,500 clean images need no change (5 rounds of ~9 outer
  steps; each step costs about a dozen forward/backward passes of one batch).
* Text (our reading; i-BAU is vision only): delta is a universal perturbation of the
  input word embeddings, one d-vector per token position (shape [max_length, d]), added to
  the embeddings of every token of a perturbed sentence; the outer optimiser is Adam at
  2e-5 with batch 32 (the transformer fine-tuning rate), and the hypergradient runs with
  PyTorch's math attention kernel (the fused CPU kernel has no double backward).
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.base import Data
from ..errors import UserError
from ..training import TrainConfig, epoch_batches, prepare_batch
from ..utils import resolve_device, seed_everything
from ..progress import stage_bar
from .common import crop_padding
from .base import Purifier, PurifierConfig


class IbauConfig(PurifierConfig):
    rounds: int = Field(5, ge=1, description="outer rounds (n_rounds)")
    K: int = Field(5, ge=1, description="fixed-point (or CG) iterations of the hypergradient")
    hypergrad: Literal["fixed-point", "cg"] = "fixed-point"
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of the outer (model) updates")
    batch_size: int = Field(256, ge=1)
    uap_lr: float = Field(10.0, gt=0, description="SGD learning rate of the universal perturbation")
    uap_reg: float = Field(0.001, ge=0, description="weight of ||delta||^2 in the inner loss")
    inner_lr: float = Field(0.1, gt=0, description="step of the inner fixed-point map")
    portion: float = Field(0.01, gt=0, le=1, description="share of each outer batch that carries delta")
    augment: bool = True
    text_lr: float = Field(2e-5, gt=0, description="text: Adam learning rate")
    text_batch_size: int = Field(32, ge=1)


class _Embeddings:
    """Adds a per-position perturbation to a text model's input word embeddings while set."""

    def __init__(self, model):
        get = getattr(getattr(model, "encoder", None), "get_input_embeddings", None)
        if get is None:
            raise UserError("i-bau on text needs a Hugging Face encoder with input embeddings")
        self.module = get()
        self.delta: torch.Tensor | None = None  # [B or 1, max_len, d]
        self.handle = self.module.register_forward_hook(self._hook)

    def _hook(self, _m, _inp, out):
        if self.delta is None:
            return out
        return out + self.delta[:, :out.shape[1]]

    def remove(self):
        self.handle.remove()


def _grad(outputs, inputs, grad_outputs=None, retain_graph=True, create_graph=False):
    gs = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph,
                             create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs)]


class Ibau(Purifier):
    """Implicit-hypergradient unlearning of a universal adversarial perturbation."""
    name = "i-bau"
    Config = IbauConfig

    def _purify(self, model, clean: Data, original):
        cfg = self.cfg
        text = clean.modality == "text"
        dev = resolve_device(cfg.device)
        model.to(dev).eval()
        if not text:
            model.to(memory_format=torch.channels_last)
        gen = seed_everything(cfg.seed)
        bs = cfg.text_batch_size if text else cfg.batch_size
        bcfg = TrainConfig(batch_size=bs, augment=cfg.augment and not text, crop_padding=crop_padding(clean),
                           seed=cfg.seed, device=cfg.device,
                           bucket_by_length=False)
        params = [q for q in model.parameters() if q.requires_grad]
        outer_opt = torch.optim.Adam(params, lr=cfg.text_lr if text else cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
        emb = _Embeddings(model) if text else None
        if text:
            d = emb.module.embedding_dim
            shape = (1, model.max_length, d)
        else:
            shape = (1, *clean.shape)

        def batch(idx):
            x, y = prepare_batch(model, clean, idx, bcfg, dev, gen, bcfg.augment)
            return (model.tokenize(x) if text else x), y

        def logits_with(x, delta, rows=None):
            """f(x + delta) with delta on all samples or only on ``rows``."""
            n = len(x["input_ids"]) if text else len(x)
            if rows is not None:
                full = torch.zeros((n, *shape[1:]), device=dev, dtype=delta.dtype)
                full = full.index_put((rows,), delta.expand(len(rows), *shape[1:]))
            else:
                full = delta
            if text:
                emb.delta = full
                try:
                    return model(x)
                finally:
                    emb.delta = None
            return model(x + full)

        # the code lists the (augmented) clean batches once and reuses them every round
        fixed = [batch(idx) for idx in epoch_batches(clean, bcfg, gen)]
        x0, y0 = fixed[0]

        def inner_map(delta):
            loss = -F.cross_entropy(logits_with(x0, delta), y0) + cfg.uap_reg * delta.pow(2).sum()
            g = torch.autograd.grad(loss, delta, create_graph=True)[0]
            return delta - cfg.inner_lr * g

        kernel = contextlib.nullcontext()
        if text:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            kernel = sdpa_kernel(SDPBackend.MATH)
        history = []
        bar = stage_bar(total=cfg.rounds * (len(fixed) * 2), desc="i-bau unlearning", enabled=cfg.progress)
        try:
            with kernel:
                for r in range(cfg.rounds):
                    # 1. the universal perturbation, from zero, one pass with SGD lr 10
                    delta = torch.zeros(shape, device=dev, requires_grad=True)
                    uap_opt = torch.optim.SGD([delta], lr=cfg.uap_lr)
                    for idx in epoch_batches(clean, bcfg, gen):
                        x, _ = batch(idx)
                        with torch.no_grad():
                            own = model(x).argmax(1)
                        loss = -F.cross_entropy(logits_with(x, delta), own) + cfg.uap_reg * delta.pow(2).sum()
                        uap_opt.zero_grad(set_to_none=True)
                        loss.backward(inputs=[delta])
                        uap_opt.step()
                        bar.update(1)
                    delta = delta.detach()
                    # 2. one hypergradient step of the model per clean batch
                    outer_losses = []
                    for x, y in fixed:
                        k = max(1, int(len(y) * cfg.portion))
                        rows = torch.randperm(len(y), generator=gen)[:k].to(dev)
                        outer_opt.zero_grad(set_to_none=True)
                        outer_losses.append(self._hyper_step(delta, params, x, y, rows, logits_with, inner_map))
                        outer_opt.step()
                        bar.update(1)
                    history.append({"round": r + 1, "uap_l2": float(delta.norm()),
                                    "outer_loss": sum(outer_losses) / len(outer_losses)})
                    bar.set_postfix(outer=f"{history[-1]['outer_loss']:.3f}")
        finally:
            bar.close()
            if emb is not None:
                emb.remove()
        return model.eval(), {"rounds": history, "hypergrad": cfg.hypergrad, "K": cfg.K,
                              "perturbation_space": "input embeddings" if text else "pixels"}

    def _hyper_step(self, delta, params, x, y, rows, logits_with, inner_map) -> float:
        """Set ``p.grad`` of every parameter to the implicit hypergradient of the outer loss."""
        cfg = self.cfg
        w = delta.detach().requires_grad_(True)
        outer = F.cross_entropy(logits_with(x, w, rows), y)
        g_w, *g_theta = _grad(outer, [w, *params], retain_graph=False)
        mapped = inner_map(w)
        if cfg.hypergrad == "fixed-point":
            v = torch.zeros_like(w)
            for _ in range(cfg.K):
                prev = v
                v = _grad(mapped, [w], grad_outputs=v)[0] + g_w
                if float((v - prev).norm()) < 1e-10:
                    break
        else:  # conjugate gradient on (I - dPhi/ddelta^T) v = g_w (symmetric: Phi is a gradient step)
            def apply(u):
                return u - _grad(mapped, [w], grad_outputs=u)[0]
            v = torch.zeros_like(w)
            r = g_w.clone()
            p = r.clone()
            rs = (r * r).sum()
            for _ in range(cfg.K):
                if float(rs.sqrt()) < 1e-10:
                    break
                ap = apply(p)
                step = rs / (p * ap).sum()
                v = v + step * p
                r = r - step * ap
                rs_new = (r * r).sum()
                p = r + (rs_new / rs) * p
                rs = rs_new
        g_map = _grad(mapped, params, grad_outputs=v, retain_graph=False)
        with torch.no_grad():
            for q, a, b in zip(params, g_map, g_theta):
                q.grad = (a + b).detach()
        return float(outer.detach())
