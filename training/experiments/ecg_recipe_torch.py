"""The PyTorch half of ``ecg_recipe_sweep`` (see its docstring): the grouped re-implementation
of training/models/ecg_dualtask.py, the batched augmentation of training/train_ecg.augment, and
one grouped training + evaluation. Imported only by ``ecg_recipe_sweep run`` on a machine with
PyTorch; nothing in the pipeline or the daemon imports it.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.experiments.ecg_recipe_sweep import DevScorer, Group, Var, folds_of, fused_embedding

DEV = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


# ------------------------------------------------------------------ model
class Grouped(nn.Module):
    def __init__(self, M, g: Group, T=300):
        super().__init__()
        self.M, self.g = M, g
        self.stem = nn.Conv1d(M * 3, M * g.widths[0], 7, 2, 3, groups=M, bias=False)
        self.stem_bn = nn.BatchNorm1d(M * g.widths[0], momentum=0.01, eps=1e-3)
        t = (T + 1) // 2
        self.blocks = nn.ModuleList()
        cin = g.widths[0]
        for i, (w, k) in enumerate(zip(g.widths, g.kernels)):
            s = 1 if i == 0 else 2
            tout = (t + s - 1) // s
            b = nn.Module()
            b.c1 = nn.Conv1d(M * cin, M * w, k, s, k // 2, groups=M, bias=False)
            b.b1 = nn.BatchNorm1d(M * w, momentum=0.01, eps=1e-3)
            b.c2 = nn.Conv1d(M * w, M * w, k, 1, k // 2, groups=M, bias=False)
            b.b2 = nn.BatchNorm1d(M * w, momentum=0.01, eps=1e-3)
            b.ca = nn.Conv1d(M, M, 3, 1, 1, groups=M, bias=False)
            b.fc_w = nn.Parameter(torch.empty(M, tout, tout))
            b.fc_b = nn.Parameter(torch.zeros(M, tout))
            b.proj = None
            if s != 1 or cin != w:
                b.proj = nn.Conv1d(M * cin, M * w, 1, s, 0, groups=M, bias=False)
                b.bp = nn.BatchNorm1d(M * w, momentum=0.01, eps=1e-3)
            b.C, b.T = w, tout
            self.blocks.append(b)
            cin, t = w, tout
        C = cin
        self.e_w = nn.Parameter(torch.empty(M, C, g.emb))
        self.e_b = nn.Parameter(torch.zeros(M, g.emb))
        self.a1_w = nn.Parameter(torch.empty(M, C, 32))
        self.a1_b = nn.Parameter(torch.zeros(M, 32))
        self.a2_w = nn.Parameter(torch.empty(M, 32, 3))
        self.a2_b = nn.Parameter(torch.zeros(M, 3))
        self._init()

    def _init(self):
        def glorot(t, fi, fo):
            lim = math.sqrt(6.0 / (fi + fo))
            nn.init.uniform_(t, -lim, lim)
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                co = m.out_channels // self.M
                ci = m.in_channels // self.M
                k = m.kernel_size[0]
                glorot(m.weight, ci * k, co * k)
        for b in self.blocks:
            glorot(b.fc_w, b.T, b.T)
        glorot(self.e_w, self.e_w.shape[1], self.e_w.shape[2])
        glorot(self.a1_w, self.a1_w.shape[1], 32)
        glorot(self.a2_w, 32, 3)

    def forward(self, x, drop=None):
        # x: (B, M, 3, T)
        B, M = x.shape[:2]
        x = x.reshape(B, M * 3, -1)
        x = F.relu(self.stem_bn(self.stem(x)))
        for b in self.blocks:
            y = F.relu(b.b1(b.c1(x)))
            y = b.b2(b.c2(y))
            # SCA: channel attention then sequence attention
            p = y.mean(2).view(B, M, b.C)
            ca = torch.sigmoid(b.ca(p))
            y = y.view(B, M, b.C, -1) * ca[..., None]
            sa = torch.sigmoid(torch.einsum("bmt,mts->bms", y.mean(2), b.fc_w) + b.fc_b)
            y = (y * sa[:, :, None, :]).reshape(B, M * b.C, -1)
            sc = x if b.proj is None else b.bp(b.proj(x))
            x = F.relu(y + sc)
        h = x.view(B, M, self.blocks[-1].C, -1).mean(3)        # (B, M, C)
        he = h if drop is None else h * drop
        e = torch.einsum("bmc,mce->bme", he, self.e_w) + self.e_b
        a = F.relu(torch.einsum("bmc,mcd->bmd", h, self.a1_w) + self.a1_b)
        a = torch.einsum("bmd,mdk->bmk", a, self.a2_w) + self.a2_b
        return F.normalize(e, dim=-1), a


# ------------------------------------------------------------------ augmentation (torch, batched)
def augment(x, mask, aug, ldrop, gen):
    """x (B, M, T, 3) normalised windows, mask (B, M, 3), aug (M,) strength, ldrop (M,)."""
    B, M, T, C = x.shape
    dev = x.device
    u = lambda *s: torch.rand(*s, device=dev, generator=gen)  # noqa: E731
    a = aug[None, :]
    scale = 1 + (u(B, M) * 2 - 1) * 0.08 * a
    grid = torch.arange(T, device=dev, dtype=torch.float32)
    centre = u(B, M) * T
    src = (centre[..., None] + (grid - centre[..., None]) * scale[..., None]).clamp(0, T - 1)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp(max=T - 1)
    f = (src - i0)[..., None]
    x = torch.gather(x, 2, i0[..., None].expand(-1, -1, -1, C)) * (1 - f) + \
        torch.gather(x, 2, i1[..., None].expand(-1, -1, -1, C)) * f
    x = x * (1 + (u(B, M, 1, C) * 2 - 1) * 0.2 * a[..., None, None])
    tt = grid[None, None, :, None] / 100.0
    wander = u(B, M, 1, C) * 0.3 * a[..., None, None] * torch.sin(
        2 * math.pi * (0.05 + 0.45 * u(B, M, 1, C)) * tt + 6.3 * u(B, M, 1, C))
    x = x + wander
    x = x + torch.randn(x.shape, device=dev, generator=gen) * (u(B, M, 1, 1) * 0.15 * a[..., None, None])
    keep = mask & ~(u(B, M, C) < ldrop[None, :, None])
    none = ~keep.any(-1) & mask.any(-1)
    if none.any():
        # restore one valid lead: the first valid one with a random offset
        r = torch.argmax(mask.float() * (1 + u(B, M, C)), -1)
        keep = keep | (none[..., None] & F.one_hot(r, C).bool())
    return x * keep[:, :, None, :].float()


# ------------------------------------------------------------------ one grouped training
def slice_copy(dst, src, Md, Ms, mapping):
    """Copy per-model slices: dst model i <- src model mapping[i] (grouped layouts)."""
    with torch.no_grad():
        for (n, pd), (_, ps) in zip(list(dst.named_parameters()) + list(dst.named_buffers()),
                                    list(src.named_parameters()) + list(src.named_buffers())):
            if pd.dim() == 0:
                continue
            bd, bs = pd.shape[0] // Md, ps.shape[0] // Ms
            for i, j in enumerate(mapping):
                pd[i * bd:(i + 1) * bd].copy_(ps[j * bs:(j + 1) * bs])


def run_group(g: Group, models: list[tuple[Var, int, int]], z, meta, log=print, return_net=False,
              beats: np.ndarray | None = None):
    """models: (var, fold, seed). Returns list of metric dicts. ``beats`` (folds, windows, D):
    the per-fold beat vectors of ``export_beat_embeddings``; with them the fused embedding of
    what the daemon serves is scored too (``_fused`` rows)."""
    M = len(models)
    teacher = None
    if g.kd_teachers:
        K = g.kd_teachers
        tmodels = [(Var("teacher"), f, 100 + t) for f in range(4) for t in range(K)]
        tres, tnet = run_group(replace(g, kd_teachers=0, ema=0.0), tmodels, z, meta, log, True)
        teacher = Grouped(M * K, g).to(DEV)
        slice_copy(teacher, tnet, M * K, len(tmodels),
                   [models[i // K][1] * K + i % K for i in range(M * K)])
        teacher.eval()
        del tnet
    else:
        tres = []
    torch.manual_seed(1000 + M)
    classes = meta["classes"]
    nc = len(classes)
    folds = folds_of(meta)
    irecs = meta["irecs"]
    rec_person = np.array([r["person"] for r in irecs])
    ix = torch.tensor(z["ix"].astype(np.float32), device=DEV)          # (N, T, 3)
    imask = torch.tensor(z["imask"], device=DEV)
    irec = z["irec"]
    ilab = torch.tensor(z["ilab"], device=DEV)
    wperson = rec_person[irec]
    ax = torch.tensor(z["ax"].astype(np.float32), device=DEV)
    amask = torch.tensor(z["amask"], device=DEV)
    ay_np = z["ay"]
    ay = torch.tensor(ay_np, device=DEV)
    aperson = z["aperson"]
    N, NA = len(ix), len(ax)

    # per-model sampling weights over identity windows and activity windows; class masks
    wid = np.zeros((M, N))
    wact = np.zeros((M, NA))
    cmask = np.zeros((M, nc), bool)
    is_ecgid_cls = np.array([c.startswith("ecgid:") for c in classes])
    for m, (v, fold, seed) in enumerate(models):
        out = set(folds[fold])
        ok = ~np.isin(wperson, list(out))
        cmask[m] = ~np.isin(np.array(classes), list(out))
        if v.sampling == "window":
            wid[m, ok] = 1.0
        else:
            lab = z["ilab"]
            # person uniform (optionally ECG-ID share), then record, then window
            pc = np.where(cmask[m], 1.0, 0.0)
            if v.ecgid_share >= 0:
                e = cmask[m] & is_ecgid_cls
                o = cmask[m] & ~is_ecgid_cls
                pc[e] = v.ecgid_share / e.sum()
                pc[o] = (1 - v.ecgid_share) / o.sum()
            pc /= pc.sum()
            nrec_of_cls = np.zeros(nc)
            for c in range(nc):
                nrec_of_cls[c] = len(np.unique(irec[lab == c]))
            nwin_of_rec = np.bincount(irec, minlength=irec.max() + 1)
            wid[m] = np.where(ok, pc[lab] / np.maximum(nrec_of_cls[lab], 1) / nwin_of_rec[irec], 0)
        aok = ~np.isin(aperson, list(out))
        cnt = np.bincount(ay_np[aok], minlength=3)
        wact[m] = np.where(aok, 1.0 / np.maximum(cnt[ay_np], 1), 0.0)
    wid_t = torch.tensor(wid / wid.sum(1, keepdims=True), device=DEV, dtype=torch.float32)
    wact_t = torch.tensor(wact / wact.sum(1, keepdims=True), device=DEV, dtype=torch.float32)
    cmask_t = torch.tensor(cmask, device=DEV)

    vec = lambda f: torch.tensor([f(v) for v, _, _ in models], device=DEV, dtype=torch.float32)  # noqa: E731
    margin, scale, dropout = vec(lambda v: v.margin), vec(lambda v: v.scale), vec(lambda v: v.dropout)
    aug, ldrop = vec(lambda v: v.aug), vec(lambda v: v.ldrop)
    w_id, w_act = vec(lambda v: v.w_id), vec(lambda v: v.w_act)

    net = Grouped(M, g).to(DEV)
    gen = torch.Generator(device=DEV)
    gen.manual_seed(int(sum(s * 7919 + f for _, f, s in models)) % (2**31))
    # per-model seeds matter through init: re-init each model's slice from its own seed
    # (weights of grouped layers are stacked per model along dim 0)
    with torch.no_grad():
        for m, (_, fold, seed) in enumerate(models):
            tg = torch.Generator(device="cpu").manual_seed(seed * 100 + fold)
            for p in net.parameters():
                if p.dim() >= 2 and p.shape[0] % M == 0:
                    blk = p.shape[0] // M
                    sl = p[m * blk:(m + 1) * blk]
                    lim = sl.abs().max().item() if sl.numel() else 0
                    sl.copy_((torch.rand(sl.shape, generator=tg) * 2 - 1).to(DEV) * lim)
    centres = torch.randn(M, g.emb, nc, device=DEV, generator=gen).requires_grad_()
    params = list(net.parameters()) + [centres]
    opt = torch.optim.AdamW(params, lr=g.lr, eps=1e-7, weight_decay=g.wd) if g.wd else \
        torch.optim.Adam(params, lr=g.lr, eps=1e-7)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.98 * 0.5 * (1 + math.cos(math.pi * min(s, g.steps) / g.steps)) + 0.02)
    kdw = vec(lambda v: v.kd)
    ema = None
    if g.ema:
        import copy
        ema = copy.deepcopy(net)
        ema_p = list(ema.parameters())
    t0 = time.time()
    for step in range(g.steps):
        bi = torch.multinomial(wid_t, g.batch_id, replacement=True).T            # (B, M)
        ba = torch.multinomial(wact_t, g.batch_act, replacement=True).T
        xb = augment(ix[bi], imask[bi], aug, ldrop, gen)
        xa = augment(ax[ba], amask[ba], aug, ldrop, gen)
        x = torch.cat([xb, xa]).permute(0, 1, 3, 2)                             # (B, M, 3, T)
        keep = (torch.rand(len(x), M, 1, device=DEV, generator=gen) >= dropout[None, :, None]).float()
        drop = keep / (1 - dropout[None, :, None])
        emb, act = net(x, drop)
        e = emb[:g.batch_id]
        cos = torch.einsum("bme,men->bmn", e, F.normalize(centres, dim=1))
        y = ilab[bi]
        logits = scale[None, :, None] * (cos - margin[None, :, None] * F.one_hot(y, nc))
        logits = logits.masked_fill(~cmask_t[None], -1e4)
        l_id = F.cross_entropy(logits.reshape(-1, nc), y.reshape(-1), reduction="none").view(-1, M).mean(0)
        l_act = F.cross_entropy(act[g.batch_id:].reshape(-1, 3), ay[ba].reshape(-1),
                                reduction="none").view(-1, M).mean(0)
        loss = (w_id * l_id + w_act * l_act).sum()
        if teacher is not None:
            K = g.kd_teachers
            with torch.no_grad():
                te = teacher(x.repeat_interleave(K, dim=1))[0]              # (B, M*K, E)
                te = te.reshape(len(x), M, K * te.shape[-1]) / math.sqrt(K)
                st = torch.einsum("bme,cme->mbc", te, te)
            ss = torch.einsum("bme,cme->mbc", emb, emb)
            loss = loss + (kdw * ((ss - st) ** 2).mean((1, 2))).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema_p, list(net.parameters()), 1 - g.ema)
        if step % 500 == 0 or step == g.steps - 1:
            log(f"  step {step} l_id {l_id.mean().item():.3f} l_act {l_act.mean().item():.3f} {time.time()-t0:.0f}s")

    if ema is not None:
        # precise BN for the averaged weights: cumulative statistics over fresh training batches
        for mod in ema.modules():
            if isinstance(mod, nn.BatchNorm1d):
                mod.reset_running_stats()
                mod.momentum = None
        ema.train()
        with torch.no_grad():
            for _ in range(50):
                bi = torch.multinomial(wid_t, g.batch_id, replacement=True).T
                ba = torch.multinomial(wact_t, g.batch_act, replacement=True).T
                xb = augment(ix[bi], imask[bi], aug, ldrop, gen)
                xa = augment(ax[ba], amask[ba], aug, ldrop, gen)
                ema(torch.cat([xb, xa]).permute(0, 1, 3, 2))
    res = tres + evaluate(net, g, models, z, meta, "", beats)
    if ema is not None:
        res += evaluate(ema, g, models, z, meta, "_ema", beats)
    log(f"group {g} M={M} done in {time.time()-t0:.0f}s")
    return (res, net) if return_net else res


def evaluate(net, g, models, z, meta, suffix: str, beats: np.ndarray | None = None) -> list[dict]:
    """Score every model of the grouped ``net`` on its fold's gallery (``DevScorer``): alone,
    persons apart (``cal_``/``fold_``), fused with the fold's beats, and as seed ensembles."""
    M = len(models)
    # evaluation: every training ECG-ID window + calibration windows through every model
    net.eval()
    cx = z["cx"].astype(np.float32)
    ex_np = np.concatenate([z["ix"].astype(np.float32), cx])
    with torch.no_grad():
        embs = []
        for s in range(0, len(ex_np), 256):
            xx = torch.tensor(ex_np[s:s + 256], device=DEV)
            xx = xx[:, None].expand(-1, M, -1, -1).permute(0, 1, 3, 2)
            embs.append(net(xx)[0].float().cpu().numpy())
        E = np.concatenate(embs)                                                 # (Ne, M, emb)
    save = __import__("os").environ.get("SWEEP_SAVE_EMB")
    if save and not suffix:
        # the CNN embeddings of every exported window (training, then calibration), per model,
        # for analyses that need no GPU (fusion weights): one file per group
        np.savez_compressed(f"{save}-{g.steps}-{M}.npz", emb=E.astype(np.float16),
                            models=np.array([f"{v.name}:{f}:{s}" for v, f, s in models]))
    dev = DevScorer(z, meta)
    score = dev.score

    def row(name: str, fold: int, seed: int) -> dict:
        return {"var": name, "fold": fold, "seed": seed,
                **{k: getattr(g, k) for k in ("steps", "lr", "emb", "batch_id", "wd")},
                "widths": list(g.widths), "ema": g.ema if suffix else 0.0}

    def fused(cnn, fold: int):
        return fused_embedding(cnn, beats[fold], 0.5)

    res = []
    if beats is not None and not suffix:
        for fold in sorted({f for _, f, _ in models}):
            res.append({**row("beats_only", fold, 0),
                        **score(lambda idx, f=fold: beats[f][idx], dev.gallery(fold))})
    for m, (v, fold, seed) in enumerate(models):
        one = lambda idx, m=m: E[idx, m]  # noqa: E731
        out = row(v.name + suffix, fold, seed)
        out.update(score(one, dev.gallery(fold)))
        # the two halves apart: can the calibration persons pick a good seed?
        out.update(score(one, dev.calib, (10,), "cal_"))
        out.update(score(one, set(dev.folds[fold]), (10,), "fold_"))
        res.append(out)
        if beats is not None:
            res.append({**row(v.name + suffix + "_fused", fold, seed),
                        **score(fused(one, fold), dev.gallery(fold))})
    # seed ensembles: concatenated unit embeddings of all seeds of one (var, fold)
    ens = defaultdict(list)
    for m, (v, fold, seed) in enumerate(models):
        ens[(v.name, fold)].append(m)
    for (vn, fold), ms in ens.items():
        if len(ms) < 2:
            continue
        for k in sorted({2, len(ms)}):
            cat = lambda idx, ms=ms[:k]: np.concatenate([E[idx, m] for m in ms], axis=1) / np.sqrt(len(ms))  # noqa: E731
            res.append({**row(f"{vn}{suffix}_ens{k}", fold, 0), **score(cat, dev.gallery(fold))})
            if beats is not None:
                res.append({**row(f"{vn}{suffix}_ens{k}_fused", fold, 0),
                             **score(fused(cat, fold), dev.gallery(fold))})
    return res

