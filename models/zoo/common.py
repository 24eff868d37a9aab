"""Shared parts of the zoo: weight files, the feature classifier of the metrics, a tiny text encoder, the
deterministic samplers (DDIM eta 0 for epsilon / v-prediction, Euler for flow) and training helpers.

Weight files are safetensors whose metadata key ``"lowbit"`` holds ``{"_type", "_version", "_data"}`` JSON (the
same layout as ``models/digits.py``); configs inside are checked against allowlists before anything is built.
Nothing here needs scikit-learn or scikit-image (training only).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...quant.errors import ConfigError, LoadError

HEADER_KEY = "lowbit"
FORMAT_VERSION = 1
DIR = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------- files
def save_file_with_header(tensors: dict, path, type_name: str, data: dict, dtype=None) -> None:
    """Write ``tensors`` (optionally cast floats to ``dtype``) with the ``lowbit`` JSON header."""
    from safetensors.torch import save_file

    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    header = {"_type": type_name, "_version": FORMAT_VERSION, "_data": data}
    save_file(out, str(path), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
    Path(path).chmod(0o644)


def read_file_with_header(path, type_name: str, retrain: str) -> tuple[dict, dict]:
    """``(tensors as fp32, header _data)``; raises :class:`LoadError` naming the file and the fix."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LoadError(f"zoo weights {path} are missing; reinstall lowbit or regenerate them with `{retrain}`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        header = json.loads(meta[HEADER_KEY])
    except (KeyError, ValueError) as exc:
        raise LoadError(f"{path}: no valid '{HEADER_KEY}' JSON header; regenerate it with `{retrain}`") from exc
    if not isinstance(header, dict) or header.get("_type") != type_name or header.get("_version") != FORMAT_VERSION:
        raise LoadError(f"{path}: expected _type {type_name!r} version {FORMAT_VERSION}, got "
                        f"{header.get('_type')!r} version {header.get('_version')!r}; regenerate it with `{retrain}`")
    data = header.get("_data")
    if not isinstance(data, dict):
        raise LoadError(f"{path}: header _data must be a JSON object; regenerate it with `{retrain}`")
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    return tensors, data


def sub_state(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_config(cfg, allowed: dict, what: str) -> dict:
    """``cfg`` must be a dict whose keys are in ``allowed`` and whose values are JSON scalars/lists of the
    allowed type (``allowed[key]`` is a type or tuple of types)."""
    if not isinstance(cfg, dict):
        raise LoadError(f"{what}: config must be a JSON object, got {type(cfg).__name__}")
    for k, v in cfg.items():
        if k not in allowed:
            raise LoadError(f"{what}: unknown config key {k!r} (allowed: {sorted(allowed)})")
        if not isinstance(v, allowed[k]) or isinstance(v, bool) != (allowed[k] is bool):
            raise LoadError(f"{what}: invalid value for {k!r}: {v!r}")
    return dict(cfg)


# ------------------------------------------------------------------------------------------- metric network
class FeatureNet(nn.Module):
    """Small CNN classifier whose penultimate layer defines the zoo's FID (features times a constant fixed at
    training time so the training images' features have mean per-dimension variance 1).

    Input ``[N, in_channels, S, S]`` in [-1, 1]; ``heads`` gives the class count of each classification head
    (one head for a class label, several for attributes such as colour / shape / position)."""

    def __init__(self, in_channels=1, image_size=16, channels=(32, 64), feature_dim=64, heads=(10,),
                 feature_scale=1.0):
        super().__init__()
        c0, c1 = (int(c) for c in channels)
        self.config = {"in_channels": int(in_channels), "image_size": int(image_size), "channels": [c0, c1],
                       "feature_dim": int(feature_dim), "heads": [int(h) for h in heads],
                       "feature_scale": float(feature_scale)}
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c0, 3, padding=1), nn.ReLU(), nn.Conv2d(c0, c0, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(c0, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.embed = nn.Linear(c1 * 16, feature_dim)
        self.drop = nn.Dropout(0.3)
        self.heads = nn.ModuleList(nn.Linear(feature_dim, h) for h in heads)

    def features(self, x):
        return self.embed(self.body(x)) * self.config["feature_scale"]

    def forward(self, x):
        """List of logits, one tensor per head."""
        h = self.drop(F.relu(self.embed(self.body(x))))
        return [head(h) for head in self.heads]


FEATURENET_KEYS = {"in_channels": int, "image_size": int, "channels": list, "feature_dim": int, "heads": list,
                   "feature_scale": float}


def build_featurenet(cfg: dict, state: dict) -> FeatureNet:
    net = FeatureNet(**check_config(cfg, FEATURENET_KEYS, "feature classifier"))
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


def train_featurenet(x, labels, *, heads, seed, steps, batch_size=64, lr=2e-3, augment=None, noise_std=0.05,
                     channels=(32, 64), feature_dim=64, log=print):
    """Train a :class:`FeatureNet` on images ``x [N, C, S, S]`` with integer labels ``[N, len(heads)]``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    labels = labels.view(labels.shape[0], -1)
    net = FeatureNet(x.shape[1], x.shape[-1], channels, feature_dim, heads)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    net.train()
    for step, idx in enumerate(batches(x.shape[0], batch_size, steps, g)):
        set_lr(opt, lr_at(step, steps, lr, warmup=50))
        xb = x[idx] if augment is None else augment(x[idx], g)
        xb = (xb + noise_std * torch.randn(xb.shape, generator=g)).clamp(-1, 1)
        loss = sum(F.cross_entropy(o, labels[idx, i]) for i, o in enumerate(net(xb)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 200 == 0:
            log(f"classifier step {step + 1}/{steps} loss {loss.item():.4f}")
    net.eval()
    with torch.no_grad():
        raw = torch.cat([net.embed(net.body(x[i:i + 500])) for i in range(0, x.shape[0], 500)]).double()
    net.config["feature_scale"] = round(float(1.0 / raw.var(0).mean().sqrt()), 6)
    return net.requires_grad_(False)


@torch.no_grad()
def features(net: FeatureNet, images, batch_size=500) -> torch.Tensor:
    x = torch.as_tensor(images).float().cpu()
    return torch.cat([net.features(x[i:i + batch_size]).double() for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def predictions(net: FeatureNet, images, batch_size=500) -> torch.Tensor:
    """``[N, len(heads)]`` argmax class of every head."""
    x = torch.as_tensor(images).float().cpu()
    out = []
    for i in range(0, x.shape[0], batch_size):
        out.append(torch.stack([o.argmax(1) for o in net(x[i:i + batch_size])], 1))
    return torch.cat(out)


def frechet(feats_a, feats_b) -> float:
    from ..metrics import frechet_distance

    return frechet_distance(feats_a, feats_b)


# ------------------------------------------------------------------------------------------- text encoder
class TinyTextEncoder(nn.Module):
    """Word-level text encoder trained here: token + position embeddings, one pre-norm transformer layer,
    final LayerNorm. ``forward(tokens [B, L]) -> (hidden [B, L, dim], pooled [B, dim])`` (pooled: the output
    at the BOS position). The empty prompt is BOS followed by PAD tokens."""

    def __init__(self, vocab: list, dim=64, max_len=5, heads=4):
        super().__init__()
        self.vocab = list(vocab)
        self.config = {"vocab": self.vocab, "dim": int(dim), "max_len": int(max_len), "heads": int(heads)}
        self.tok = nn.Embedding(len(self.vocab) + 2, dim)  # + PAD (0) and BOS (1)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.config["max_len"], dtype=torch.long)
        index = {w: i + 2 for i, w in enumerate(self.vocab)}
        for r, p in enumerate(prompts):
            words = p.split()
            if len(words) > self.config["max_len"] - 1:
                raise ConfigError(f"prompt {p!r} has {len(words)} words; this text encoder takes at most "
                                  f"{self.config['max_len'] - 1}")
            unknown = [w for w in words if w not in index]
            if unknown:
                raise ConfigError(f"prompt {p!r}: unknown words {unknown}; the vocabulary is {self.vocab}")
            ids[r, 0] = 1
            for j, w in enumerate(words):
                ids[r, j + 1] = index[w]
        return ids

    def forward(self, tokens):
        h = self.tok(tokens) + self.pos[: tokens.shape[1]]
        h = self.norm(self.layer(h))
        return h, h[:, 0]


TEXT_KEYS = {"vocab": list, "dim": int, "max_len": int, "heads": int}


def build_text_encoder(cfg: dict, state: dict) -> TinyTextEncoder:
    cfg = check_config(cfg, TEXT_KEYS, "text encoder")
    if not all(isinstance(w, str) for w in cfg["vocab"]):
        raise LoadError("text encoder: vocab must be a list of words")
    enc = TinyTextEncoder(**cfg)
    enc.load_state_dict(state, strict=True)
    return enc.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------- schedules and samplers
def alphas_cumprod(schedule: str, T: int = 1000, beta_start=1e-4, beta_end=0.02) -> torch.Tensor:
    """float64 ``alphas_cumprod [T]`` of a diffusers beta schedule ("linear", "scaled_linear", "squaredcos_cap_v2")."""
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    else:
        raise ConfigError(f"unknown beta schedule {schedule!r}; use linear, scaled_linear or squaredcos_cap_v2")
    return torch.cumprod(1 - betas, 0)


def ddim_timesteps(steps: int, T: int) -> list:
    """``round(linspace(T - 1, 0, steps))``: the timesteps of ``lowbit.quant.sample`` and the demo."""
    if not 1 <= steps <= T:
        raise ConfigError(f"steps={steps} is out of range: allowed 1..{T}")
    return [int(round(v)) for v in torch.linspace(T - 1, 0, steps).tolist()]


def to_x0_eps(out, x, a_t: float, prediction: str):
    """(x0, eps) from the network output for a VP model at ``alphas_cumprod`` value ``a_t``."""
    sa, s1 = math.sqrt(a_t), math.sqrt(1 - a_t)
    if prediction == "epsilon":
        return (x - s1 * out) / sa, out
    if prediction == "v_prediction":
        x0 = sa * x - s1 * out
        return x0, s1 * x + sa * out
    raise ConfigError(f"unknown prediction type {prediction!r}")


@torch.no_grad()
def ddim_sample(call, x, acp, steps: int, prediction: str, clip: float | None = None):
    """Deterministic DDIM (eta 0) from ``x`` (float32) over ``ddim_timesteps``. ``call(x, t) -> output``.
    ``clip`` clamps the predicted x0 (pixel models; diffusers' ``clip_sample``)."""
    ts = ddim_timesteps(steps, len(acp))
    for i, t in enumerate(ts):
        a_t = float(acp[t])
        a_prev = float(acp[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x0, eps = to_x0_eps(call(x, t), x, a_t, prediction)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def flow_sigmas(steps: int, shift: float = 1.0) -> list:
    """Euler sigmas for rectified flow: ``linspace(1, 0, steps + 1)`` with the SD3 time shift
    ``s' = shift * s / (1 + (shift - 1) * s)``."""
    if steps < 1:
        raise ConfigError(f"steps={steps} is out of range: allowed >= 1")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).tolist()


def unwrap(out):
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# ------------------------------------------------------------------------------------------- training helpers
def lr_at(step: int, total: int, base: float, warmup: int, final_frac: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def batches(n: int, batch_size: int, steps: int, g: torch.Generator):
    """``steps`` index batches drawn epoch by epoch from seeded permutations (the last partial batch of an
    epoch is completed from the next epoch's permutation)."""
    buf = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while buf.numel() < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=g)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


class EMA:
    """EMA of a module's parameters with the usual warm-up ``min(decay, (1 + step) / (10 + step))``."""

    def __init__(self, module, decay: float):
        import copy

        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.step = 0

    @torch.no_grad()
    def update(self, module):
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for pe, p in zip(self.module.parameters(), module.parameters()):
            pe.lerp_(p, 1 - d)
        for be, b in zip(self.module.buffers(), module.buffers()):
            be.copy_(b)
        self.step += 1


def save_grid(images, path, nrow: int = 8, scale: int = 4):
    """PNG grid of images ``[N, C, H, W]`` in [-1, 1] (training/inspection only)."""
    from PIL import Image

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + 1), nrow * (w + 1), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, r * (h + 1): r * (h + 1) + h, col * (w + 1): col * (w + 1) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def train_loop(net, loss_fn, *, steps: int, lr: float, ema_decay: float, seed: int, warmup: int = 100,
               extra_params=(), log=print, log_every: int = 100, clip: float = 1.0):
    """AdamW (wd 0), linear warm-up + cosine to 5%, grad-norm clip, EMA of ``net`` (and of the modules in
    ``extra_params``, e.g. a text encoder trained jointly). ``loss_fn(step, g) -> loss``. Returns the EMA
    copies ``[net_ema, *extra_ema]`` and a dict of training facts."""
    import time

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    modules = [net, *extra_params]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    emas = [EMA(m, ema_decay) for m in modules]
    for m in modules:
        m.train()
    t0, running = time.time(), 0.0
    for step in range(steps):
        set_lr(opt, lr_at(step, steps, lr, warmup))
        loss = loss_fn(step, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        for e, m in zip(emas, modules):
            e.update(m)
        running += loss.item()
        if (step + 1) % log_every == 0:
            el = time.time() - t0
            log(f"step {step + 1}/{steps} loss {running / log_every:.4f} "
                f"({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)")
            running = 0.0
    info = {"seed": seed, "steps": steps, "lr": lr, "warmup": warmup, "ema_decay": ema_decay,
            "optimizer": f"AdamW(wd=0), linear warmup + cosine to 5%, grad clip {clip}",
            "train_seconds": round(time.time() - t0, 1)}
    return [e.module for e in emas], info


def class_conditional_sample(zoo_model, denoiser, n: int, seed: int, steps: int, guidance, clip):
    """DDIM for a class-conditional pixel-space ``UNet2DModel`` zoo model (digits, rgb): labels
    ``zoo_model.labels_for(n)``, classifier-free guidance with the null class in one batched call (cond, uncond);
    the same (seed, n) gives the same noise and labels for any denoiser. Returns (images in [-1, 1], labels)."""
    g = 1.0 if guidance is None else float(guidance)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((n,) + zoo_model.image_shape, generator=gen)
    labels = zoo_model.labels_for(n)
    null = torch.full_like(labels, zoo_model.null_class)

    def call(x, t):
        if g == 1.0:
            return unwrap(denoiser(x, torch.full((n,), t, dtype=torch.long), class_labels=labels))
        out = unwrap(denoiser(torch.cat([x, x]), torch.full((2 * n,), t, dtype=torch.long),
                              class_labels=torch.cat([labels, null])))
        c, u = out.float().chunk(2)
        return u + g * (c - u)

    x = ddim_sample(call, x, zoo_model.acp, steps, zoo_model.prediction, clip=clip)
    return x.clamp(-1, 1), labels


def evaluate_text_model(m, samples: int, grid_path: str, log) -> dict:
    """After training a text-conditioned zoo model: sample ``samples`` images (seed 1, the default 25 steps) with
    the model's default guidance and without guidance, log the metrics, save a grid of the guided samples.
    Returns the header's ``evaluation`` entry."""
    import time

    evals = []
    for gs in (m.default_guidance, 1.0):
        t0 = time.time()
        imgs, labels = m.sample(m.denoiser, samples, seed=1, guidance=gs)
        r = {"guidance": gs, **m.metrics(imgs, labels), "seconds": round(time.time() - t0, 1)}
        log(f"eval: {samples} samples, 25 steps: {r}")
        evals.append(r)
        if gs == m.default_guidance:
            save_grid(imgs[:48], grid_path, nrow=12)
    return {"samples": samples, "steps": 25, "seed": 1, "runs": evals}

