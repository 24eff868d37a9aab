"""Zoo entry ``digits``: the embedded default model (``lowbit.models.digits``), class-conditional pixel-space
``UNet2DModel`` (1x16x16, linear betas, epsilon prediction, self-attention at 4x4, 11 class embeddings with the
null class 10 for classifier-free guidance). Metric: FID in the digit classifier's feature space against the
400 held-out digits, and class accuracy. Retrain: ``python -m lowbit.models.train_digits``.
"""
from __future__ import annotations


from . import ZooModel
from .common import alphas_cumprod, class_conditional_sample


class DigitsModel(ZooModel):
    name = "digits"
    prediction = "epsilon"
    num_classes = 10
    default_steps = 25
    default_guidance = 1.0
    image_shape = (1, 16, 16)

    def __init__(self):
        from .. import digits as D

        super().__init__(D.load_default_unet())
        cfg = D.read_header(D.DDPM_PATH, D.TYPE_DDPM)["scheduler_config"]
        self.null_class = D.NULL_CLASS
        self.acp = alphas_cumprod(cfg["beta_schedule"], cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"])
        self.clip = cfg["clip_sample_range"] if cfg.get("clip_sample") else None
        self.classifier = D.load_classifier()
        self._heldout = D.load_heldout()

    def sample(self, denoiser, n: int, seed: int, steps: int = 25, guidance: float | None = None):
        return class_conditional_sample(self, denoiser, n, seed, steps, guidance, clip=self.clip)

    def heldout(self):
        return self._heldout

    def features(self, images):
        from ..metrics import classifier_features

        return classifier_features(images, self.classifier)

    def metrics(self, images, labels) -> dict:
        from ..metrics import class_accuracy, fid

        return {"fid": fid(images, self._heldout[0], self.classifier),
                "acc": class_accuracy(images, labels, self.classifier)}


def build() -> DigitsModel:
    return DigitsModel()
