"""Quality metrics of the default digits model.

``fid`` is the **FID in the classifier's feature space**: the Frechet distance between Gaussians fitted to the
``feature_dim``-d penultimate features of our small digit CNN (``digits_classifier.safetensors``), not
Inception-v3 features, so its values are only comparable with each other (same classifier, same sample
counts). The matrix square root uses symmetric eigen-decompositions in float64 torch (no scipy).

``noisy_mask`` / ``noisy_fraction`` count "salt-and-pepper" samples: a sample is noisy when its mean
|Laplacian| (``laplacian_energy``) exceeds the largest one of a set of real images (default: the 400 held-out
digits). Real digits are smooth strokes on a flat -1 background, so speckles on the background push a sample
above every real digit; FID and class accuracy barely see a few such samples.
"""
from __future__ import annotations

import torch

_CLASSIFIER = None


def _classifier(classifier=None):
    global _CLASSIFIER
    if classifier is not None:
        return classifier
    if _CLASSIFIER is None:
        from .digits import load_classifier

        _CLASSIFIER = load_classifier()
    return _CLASSIFIER


def _images(images) -> torch.Tensor:
    x = torch.as_tensor(images).float().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images [N, 1, H, W] in [-1, 1], got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def classifier_features(images, classifier=None, batch_size: int = 500) -> torch.Tensor:
    """Penultimate-layer features ``[N, D]`` (float64) of the digit classifier for images in [-1, 1]."""
    clf = _classifier(classifier)
    x = _images(images)
    out = [clf.features(x[i : i + batch_size]).double() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, clf.config["feature_dim"], dtype=torch.float64)


@torch.no_grad()
def classifier_logits(images, classifier=None, batch_size: int = 500) -> torch.Tensor:
    clf = _classifier(classifier)
    x = _images(images)
    return torch.cat([clf(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[Na, D]``, ``[Nb, D]``:
    ``|mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A^1/2 B A^1/2)^1/2)`` (covariances with ``N - 1``)."""
    a = torch.as_tensor(feats_a).double()
    b = torch.as_tensor(feats_b).double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need two [N >= 2, D] feature sets with equal D, got {tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = torch.cov(a.T).reshape(a.shape[1], a.shape[1])
    cov_b = torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    sa = _sqrtm_psd(cov_a)
    w = torch.linalg.eigvalsh((sa @ cov_b @ sa + (sa @ cov_b @ sa).T) / 2)
    tr_covmean = w.clamp(min=0).sqrt().sum()
    d = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return float(d.clamp(min=0))


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_energy(images) -> torch.Tensor:
    """Mean |Laplacian| of each image ``[N, C, H, W]`` (``[N]`` float32; 3x3 kernel per channel, edges
    replicated, so a flat image scores 0 up to its border)."""
    x = torch.as_tensor(images).float().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    k = _LAPLACIAN.view(1, 1, 3, 3).repeat(c, 1, 1, 1)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
    return y.abs().mean((1, 2, 3))


def noisy_mask(samples, reference=None) -> torch.Tensor:
    """``[N]`` bool: samples whose ``laplacian_energy`` exceeds the largest of the ``reference`` images
    (default: the 400 held-out real digits), i.e. rougher than every real image."""
    if reference is None:
        from .digits import load_heldout

        reference = load_heldout()[0]
    return laplacian_energy(samples) > laplacian_energy(reference).max()


def noisy_fraction(samples, reference=None) -> float:
    """Fraction of ``samples`` rougher than every ``reference`` image (``noisy_mask``); 0 for clean samples."""
    return float(noisy_mask(samples, reference).float().mean())


def fid(samples, reference=None, classifier=None) -> float:
    """FID in the classifier's feature space between ``samples`` and ``reference`` images (both ``[N, 1, 16, 16]``
    in [-1, 1]; default reference: the 400 held-out real digits). Lower is better; depends on sample counts."""
    if reference is None:
        from .digits import load_heldout

        reference = load_heldout()[0]
    clf = _classifier(classifier)
    return frechet_distance(classifier_features(samples, clf), classifier_features(reference, clf))


def class_accuracy(samples, labels, classifier=None) -> float:
    """Fraction of ``samples`` the digit classifier assigns to their intended class ``labels``."""
    labels = torch.as_tensor(labels).long().flatten().cpu()
    pred = classifier_logits(samples, classifier).argmax(1)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.shape[0]} samples but {labels.numel()} labels")
    return float((pred == labels).float().mean())
