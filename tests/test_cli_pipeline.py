"""The command line on a local diffusers pipeline folder: ``lowbit quantize OUT --pipeline DIR --prompt ...`` and
``lowbit generate --pipeline DIR --quantized Q --out IMAGE.png [--compare]``, on tiny random-weight pipelines built
here and saved with ``save_pretrained(safe_serialization=True)`` (a Stable Diffusion one with its own tiny CLIP
tokenizer, and a class-conditional DiT one: nothing is downloaded). Each bad input is refused in one line with
exit status 2 and nothing written; the quantized denoiser really is quantized, differs from the float one and
stays close to it."""
import json
import os
import shutil

import pytest

from lowbit.cli import main
from test_cli import FAST_S, _run, _snapshot  # (a child run reporting whether torch was imported; the time bound)

pytestmark = pytest.mark.filterwarnings("ignore")

SIZE = "16"  # image size of the tiny pipelines' runs (their VAE does not downsample: 16x16 latents)
QUICK = ["--bits", "W8A8", "--method", "naive", "--precision", "rules", "--steps", "3", "--calib-steps", "2",
         "--size", SIZE]


def _tiny_sd(folder):
    """A StableDiffusionPipeline of random weights (UNet2DConditionModel 32/64 channels, 2-layer CLIP text model, a
    CLIP tokenizer over a 60-token vocabulary written here), saved as safetensors."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = folder.parent / (folder.name + "_vocab")
    tok_dir.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in ("a", "cat", "dog", "red", "blue", "photo", "of"):
        vocab[w + "</w>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32,), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=32, sample_size=16)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tok,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)


def _tiny_dit(folder):
    """A class-conditional DiTPipeline of random weights (no text encoder; DiT's null class is 1000)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32,), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=32, sample_size=8)
    DiTPipeline(transformer=tr, vae=vae, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False)).save_pretrained(
        str(folder), safe_serialization=True)


def _tiny_sd3(folder, vocab_dir):
    """A StableDiffusion3Pipeline of random weights without its T5 (text_encoder_3=None, saved as absent): a
    text-conditioned transformer with a flow-matching scheduler (no alphas_cumprod)."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)

    def text_encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=8))

    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                               pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)
    vae = AutoencoderKL(block_out_channels=(32,), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=32, sample_size=16, shift_factor=0.0, use_quant_conv=False,
                        use_post_quant_conv=False)
    StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                             text_encoder=text_encoder(), tokenizer=tok, text_encoder_2=text_encoder(), tokenizer_2=tok,
                             text_encoder_3=None, tokenizer_3=None).save_pretrained(str(folder),
                                                                                   safe_serialization=True)


def _tiny_ddpm(folder):
    """An unconditional DDPMPipeline (UNet2DModel): no prompt or class to calibrate with."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(block_out_channels=(32,), layers_per_block=1, down_block_types=("DownBlock2D",),
                       up_block_types=("UpBlock2D",), sample_size=8, in_channels=3, out_channels=3,
                       norm_num_groups=32)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(folder), safe_serialization=True)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, checkout_off_path):
    """Pipelines (tiny SD and DiT, and broken copies of SD for the refusals) and a file quantized from SD."""
    w = tmp_path_factory.mktemp("pipes")
    _tiny_sd(w / "sd")
    _tiny_dit(w / "dit")
    _tiny_ddpm(w / "ddpm")
    _tiny_sd3(w / "sd3", w / "sd_vocab")
    unet_w = "unet/diffusion_pytorch_model.safetensors"
    for name, change in (("sd_pickle", "bin"), ("sd_variant", "fp16"), ("sd_other", "config")):
        shutil.copytree(w / "sd", w / name)
        if change == "bin":  # pickle-only weights (never loaded: refused from the file names)
            (w / name / unet_w).unlink()
            (w / name / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
        elif change == "fp16":
            (w / name / unet_w).rename(w / name / "unet" / "diffusion_pytorch_model.fp16.safetensors")
        else:  # another UNet of the same class: the quantized file's recorded architecture does not fit it
            cfg = json.loads((w / name / "unet" / "config.json").read_text())
            cfg["layers_per_block"] = 2
            (w / name / "unet" / "config.json").write_text(json.dumps(cfg))
    (w / "nopipe").mkdir()
    (w / "prompts.txt").write_text("# calibration prompts\na red cat\n\na blue dog\n")
    (w / "empty.txt").write_text("# nothing\n\n")
    (w / "exists.safetensors").write_bytes(b"keep me")
    (w / "exists.png").write_bytes(b"keep me too")
    (w / "notlowbit.safetensors").write_bytes(_plain_safetensors())  # a safetensors file without LowBit metadata
    return w


def _plain_safetensors() -> bytes:
    import struct

    raw = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0\0\0\0"


@pytest.fixture(scope="module")
def q_sd(ws):
    """``lowbit quantize`` of the tiny SD pipeline (W8A8, naive, rules: the plumbing; quality is the zoo bench's),
    with its stderr."""
    p = str(ws / "q_sd.safetensors")
    import io
    from contextlib import redirect_stderr, redirect_stdout

    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        rc = main(["quantize", p, "--pipeline", str(ws / "sd"), "--prompt", "a red cat", "--prompts-file",
                   str(ws / "prompts.txt"), *QUICK])
    assert rc == 0, err.getvalue()
    return p, err.getvalue(), out.getvalue()


def _one_line_exit_2(r, words):
    err = r.stderr.rstrip("\n").splitlines()
    err = [ln for ln in err if ln.startswith("lowbit")]  # (libraries may warn on import: not ours)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(err) == 1 and "error:" in err[0] and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in err[0], (w, err[0])


Q = "q_sd.safetensors"
BAD = [  # refused before torch is imported: (argv, words of the one line)
    (["quantize", "o.safetensors", "--pipeline", "sd"], ["text-conditioned", "--prompt TEXT", "--prompts-file"]),
    (["quantize", "o.safetensors", "--pipeline", "nopipe", "--prompt", "a"], ["no model_index.json"]),
    (["quantize", "o.safetensors", "--pipeline", "missing", "--prompt", "a"], ["no such folder"]),
    (["quantize", "o.safetensors", "--pipeline", "sd/unet", "--prompt", "a"],
     ["model folder (UNet2DConditionModel)", "give --pipeline sd"]),
    (["quantize", "o.safetensors", "--pipeline", "sd_pickle", "--prompt", "a"],
     ["unet/ holds no safetensors weights, only diffusion_pytorch_model.bin", "never loads pickle",
      "safe_serialization=True"]),
    (["quantize", "o.safetensors", "--pipeline", "sd_variant", "--prompt", "a"],
     ["only the variant file diffusion_pytorch_model.fp16.safetensors", "without variant"]),
    (["quantize", "o.safetensors", "--pipeline", "sd", "--unet", "sd/unet", "--prompt", "a"],
     ["--pipeline and --unet together", "give one"]),
    (["quantize", "o.safetensors", "--prompt", "a"], ["--prompt applies to --pipeline only"]),
    (["quantize", "o.safetensors", "--pipeline", "sd", "--prompt", "a", "--calib-samples", "4"],
     ["--calib-samples 4 applies to the embedded model", "--prompt"]),
    (["quantize", "o.safetensors", "--pipeline", "sd", "--prompt", " "], ["--prompt is empty"]),
    (["quantize", "o.safetensors", "--pipeline", "sd", "--prompts-file", "empty.txt"], ["holds no prompts"]),
    (["quantize", "o.safetensors", "--pipeline", "sd", "--prompts-file", "nofile.txt"], ["no such file"]),
    (["quantize", "o.safetensors", "--pipeline", "sd", "--prompt", "a", "--size", "20"],
     ["--size", "multiple of 8"]),
    (["quantize", "o.safetensors", "--pipeline", "sd", "--prompt", "a", "--size", "big"], ["--size", "WxH"]),
    (["quantize", "o.safetensors", "--pipeline", "sd", "--prompt", "a", "--guidance", "-1"],
     ["--guidance", "use [0, 100] (default the pipeline's own)"]),  # (was: "default 1.0", the library's)
    (["generate", "--pipeline", "sd", "--quantized", Q, "--prompt", "a", "--out", "x.png", "--guidance", "x"],
     ["--guidance", "'x' is not a number", "(default the pipeline's own)"]),
    (["quantize", "exists.safetensors", "--pipeline", "sd", "--prompt", "a"], ["already exists", "--overwrite"]),
    (["quantize", "sd/unet/diffusion_pytorch_model.safetensors", "--pipeline", "sd", "--prompt", "a", "--overwrite"],
     ["is a file of the --pipeline folder", "never replaces the input"]),
    (["generate", "--pipeline", "sd", "--quantized", Q, "--prompt", "a cat", "--out", "exists.png"],
     ["exists.png already exists", "--overwrite"]),
    (["generate", "--pipeline", "sd", "--quantized", Q, "--prompt", "a cat", "--out", "x.jpg"],
     ["must end in .png"]),
    (["generate", "--pipeline", "sd", "--quantized", Q, "--out", "x.png"], ["text-conditioned", "--prompt"]),
    (["generate", "--pipeline", "dit", "--quantized", Q, "--prompt", "1", "--out", "x.png"],
     ["made from a UNet2DConditionModel", "transformer is a DiTTransformer2DModel"]),
    (["generate", "--pipeline", "sd_other", "--quantized", Q, "--prompt", "a", "--out", "x.png"],
     ["does not fit this pipeline's unet", "layers_per_block is 1, the pipeline's 2"]),
    (["generate", "--pipeline", "sd", "--quantized", "notlowbit.safetensors", "--prompt", "a", "--out", "x.png"],
     ["not a LowBit quantized file", "lowbit quantize"]),
    (["generate", "--pipeline", "sd", "--quantized", "missing.safetensors", "--prompt", "a", "--out", "x.png"],
     ["no such file"]),
    (["generate", "--pipeline", "sd", "--prompt", "a", "--out", "x.png"], ["required", "--quantized"]),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_pipeline_input_one_line_exit_2_before_any_work(ws, q_sd, tmp_path, argv, words):
    before = _snapshot(ws)
    r, dt, rep = _run(argv, ws, tmp_path)
    _one_line_exit_2(r, words)
    assert r.stdout == ""
    assert dt < FAST_S, f"took {dt:.1f} s"
    assert not rep["torch"], "torch was imported: work started before the input was checked"
    assert _snapshot(ws) == before, "something was written"


LATE = [  # found from the pipeline's class (diffusers and torch imported, no weights loaded) or its class table
    (["quantize", "o.safetensors", "--pipeline", "dit"], ["class-conditional", "--prompt"]),
    (["quantize", "o.safetensors", "--pipeline", "ddpm"], ["DDPMPipeline is unconditional", "CallRecorder"]),
    (["quantize", "o.safetensors", "--pipeline", "dit", "--prompt", "1", "--size", "64"],
     ["--size: DiTPipeline takes no height/width"]),
    (["quantize", "o.safetensors", "--pipeline", "dit", "--prompt", "cat"],
     ["--prompt 'cat'", "not a class of this DiTPipeline", "0..999"]),
]


@pytest.mark.parametrize("argv,words", LATE, ids=[" ".join(a) for a, _ in LATE])
def test_bad_pipeline_input_found_by_its_class_is_one_line_exit_2(ws, tmp_path, argv, words):
    before = _snapshot(ws)
    r, _, _ = _run(argv, ws, tmp_path)
    _one_line_exit_2(r, words)
    assert _snapshot(ws) == before, "something was written"


def test_quantize_pipeline_saves_a_quantized_denoiser_that_inspect_and_load_accept(ws, q_sd, capsys):
    import torch
    from diffusers import DiffusionPipeline

    from lowbit.quant import QuantLayer, load, read_header, record_pipeline_calls, unet_output
    from lowbit.quant.diffusers_pipeline import swapped_denoiser

    p, err, out = q_sd
    # the stages by name; three prompts (one --prompt, two from the file) x 3 steps
    for stage in ("loading torch and the pipeline", "recording calibration: 3 prompt(s) x 3 steps at 16x16",
                  "record calibration: 9/9", "quantizing to W8A8 with naive on", "saving"):
        assert stage in err, (stage, err)
    assert "saved W8A8 (naive) of unet (UNet2DConditionModel)" in out
    assert main(["inspect", p]) == 0
    text = capsys.readouterr().out
    header, _ = read_header(p)
    assert "loads      yes" in text and "UNet2DConditionModel" in text
    assert f"{len(header['layers'])} quantized layers" in text
    pipe = DiffusionPipeline.from_pretrained(str(ws / "sd"), use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    q = load(unet, p)
    quantized = {n for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    assert quantized == set(header["layers"]) and len(quantized) > 50
    # every Linear / Conv2d of the float model is quantized (rules keep the edges at 8 bits, not in float)
    assert not [n for n, m in q.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)
                and not any(n.startswith(k + ".") for k in quantized)]
    # on the UNet's own inputs (the library's recorder on the pipeline, another prompt and seed than calibration):
    # the quantized UNet is not the float one, and close to it at W8A8
    calls = record_pipeline_calls(pipe, ["a photo of a dog"], steps=3, seed=5, height=16, width=16)
    assert len(calls) == 3 and [c.step for c in calls] == [0, 1, 2]  # one call per step (CFG as one batch of 2)
    rels = []
    with torch.no_grad():
        for c in calls:
            args, kw = c.to("cpu", torch.float32)
            ref, got = unet_output(unet(*args, **kw)), unet_output(q(*args, **kw))
            rels.append(float((got - ref).norm() / ref.norm()))
    # (measured: 0.16, 0.028, 0.018 relative error, highest timestep first: naive min/max ranges on a random UNet)
    assert all(1e-4 < r < 0.3 for r in rels) and sum(rels) / len(rels) < 0.1, rels
    with swapped_denoiser(pipe, q):
        assert pipe.unet is q
    assert pipe.unet is unet


def test_existing_output_is_not_overwritten_without_overwrite(ws, q_sd, capsys):
    p = q_sd[0]
    mtime = os.path.getmtime(p)
    assert main(["quantize", p, "--pipeline", str(ws / "sd"), "--prompt", "a", *QUICK]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.path.getmtime(p) == mtime


def test_generate_writes_the_image_and_the_side_by_side_with_compare(ws, q_sd, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "cat.png"
    argv = ["generate", "--pipeline", str(ws / "sd"), "--quantized", q_sd[0], "--prompt", "a red cat", "--steps", "3",
            "--size", SIZE, "--out", str(out), "--compare"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    side = tmp_path / "cat_compare.png"
    img, both = Image.open(out), Image.open(side)
    assert img.size == (16, 16) and both.size == (16 + 4 + 16, 16)
    fp, qt = both.crop((0, 0, 16, 16)), both.crop((20, 0, 36, 16))
    assert list(qt.getdata()) == list(img.convert("RGB").getdata())  # the right half is the written image
    assert list(fp.getdata()) != list(qt.getdata())  # the quantized denoiser is not the float one
    psnr = float(cap.out.split("PSNR ")[1].split(" dB")[0])
    assert 15 < psnr < 100, cap.out  # same seed: close, not equal
    for stage in ("q_sd.safetensors onto the pipeline's unet", "full precision: generate: 3/3",
                  "quantized: generate: 3/3"):
        assert stage in cap.err, (stage, cap.err)
    # never replaced without --overwrite (checked before any work): both files kept
    m = (os.path.getmtime(out), os.path.getmtime(side))
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert (os.path.getmtime(out), os.path.getmtime(side)) == m


def test_class_conditional_transformer_pipeline_quantizes_and_generates(ws, tmp_path, capsys):
    """A DiT pipeline: the denoiser is pipe.transformer, each --prompt a class number."""
    from lowbit.quant import read_header

    p = str(tmp_path / "q_dit.safetensors")
    assert main(["quantize", p, "--pipeline", str(ws / "dit"), "--prompt", "1", "--prompt", "3", "--bits", "W8A8",
                 "--method", "naive", "--precision", "rules", "--steps", "3", "--calib-steps", "2"]) == 0
    cap = capsys.readouterr()
    assert "saved W8A8 (naive) of transformer (DiTTransformer2DModel)" in cap.out
    assert read_header(p)[0]["model"]["cls"] == "DiTTransformer2DModel"
    out = tmp_path / "dit.png"
    assert main(["generate", "--pipeline", str(ws / "dit"), "--quantized", p, "--prompt", "3", "--steps", "3",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 50 and not (tmp_path / "dit_compare.png").exists()


def test_pipeline_saved_in_fp16_quantizes_and_generates(ws, tmp_path, capsys):
    """A pipeline saved in half precision (save_pretrained after from_pretrained(torch_dtype=torch.float16), as most
    published checkpoints are): diffusers loads the UNet in float32 but transformers keeps the text encoder in fp16;
    every component must run in float32 (was: 'mat1 and mat2 must have the same dtype, but got Half and Float'
    while recording, exit 1)."""
    import torch
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "sd_fp16"
    StableDiffusionPipeline.from_pretrained(str(ws / "sd"), torch_dtype=torch.float16, use_safetensors=True,
                                            local_files_only=True).save_pretrained(str(folder),
                                                                                   safe_serialization=True)
    p = str(tmp_path / "q.safetensors")
    assert main(["quantize", p, "--pipeline", str(folder), "--prompt", "a red cat", *QUICK]) == 0, \
        capsys.readouterr().err
    out = tmp_path / "fp16.png"
    assert main(["generate", "--pipeline", str(folder), "--quantized", p, "--prompt", "a cat", "--steps", "2",
                 "--size", SIZE, "--out", str(out)]) == 0, capsys.readouterr().err
    assert out.stat().st_size > 50


def test_image_conditioned_pipeline_is_refused_in_one_line_naming_its_image_input(ws, tmp_path, capsys):
    """An img2img pipeline folder (an inpainting, ControlNet or refiner checkpoint is saved the same way): it takes
    prompts, but generates nothing without its input image. Refused (exit 2) at its first step, naming the image
    input and the way out (was: exit 1, 'check that --size, --steps and --guidance suit this pipeline'); its --size
    refusal no longer says the size is fixed by its model."""
    folder = tmp_path / "sd_img2img"
    shutil.copytree(ws / "sd", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionImg2ImgPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    before = _snapshot(tmp_path)
    assert main(["quantize", str(tmp_path / "q.safetensors"), "--pipeline", str(folder), "--prompt", "a cat",
                 "--steps", "2"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lowbit")]
    assert len(err) == 1, err
    for w in ("StableDiffusionImg2ImgPipeline failed while generating", "takes an input image (image=...)",
              "text-to-image pipeline folder", "CallRecorder"):
        assert w in err[0], (w, err[0])
    assert main(["quantize", str(tmp_path / "q.safetensors"), "--pipeline", str(folder), "--prompt", "a cat",
                 "--size", SIZE]) == 2
    assert "takes no height/width (its image size is fixed by its model or by its input image)" in \
        capsys.readouterr().err
    assert _snapshot(tmp_path) == before, "something was written"


def _tiny_pixart(folder):
    """A PixArtSigmaPipeline of random weights with a T5 encoder (its tokenizer a word-level Unigram written here:
    no sentencepiece) and sample_size 32, the smallest its resolution binning accepts (the 256 bins; an 8x VAE:
    256x256 images, 32x32 latents)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"] + ["\u2581" + w for w in ("a", "red", "cat", "blue", "dog")]
    tk = Tokenizer(models.Unigram([(w, 0.0 if i < 3 else -1.0) for i, w in enumerate(pieces)], unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok_file = folder.parent / (folder.name + "_tokenizer.json")
    tk.save(str(tok_file))
    tok = T5TokenizerFast(tokenizer_file=str(tok_file), pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                          model_max_length=16, extra_ids=0)
    torch.manual_seed(0)
    te = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16))
    tr = PixArtTransformer2DModel(sample_size=32, num_layers=1, patch_size=2, attention_head_dim=8,
                                  num_attention_heads=2, caption_channels=16, in_channels=4, cross_attention_dim=16,
                                  out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                  num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                  norm_elementwise_affine=False, norm_eps=1e-6)
    vae = AutoencoderKL(block_out_channels=(8,) * 4, in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, sample_size=256, layers_per_block=1)
    PixArtSigmaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(str(folder), safe_serialization=True)


def test_resolution_binning_pipeline_says_it_does_not_run_at_the_asked_size(tmp_path, capsys, checkout_off_path):
    """PixArt (and Sana) pipelines bin height/width to their native sizes and resize the image afterwards: --size 16
    of this one runs at 256x256, as --size 512 of PixArt-Sigma-1024 runs at 1024x1024. The stages say so (they said
    'at 16x16'), and the calibration runs are those of the binned size."""
    _tiny_pixart(tmp_path / "pixart")
    p = str(tmp_path / "q.safetensors")
    assert main(["quantize", p, "--pipeline", str(tmp_path / "pixart"), "--prompt", "a red cat", *QUICK]) == 0
    err = capsys.readouterr().err
    assert ("at 16x16 (asked: the PixArtSigmaPipeline runs at the nearest size of its resolution bins and resizes "
            "the image)") in err, err


def test_flow_matching_transformer_pipeline_with_the_defaults(ws, tmp_path, capsys):
    """SD3 (text-conditioned transformer, flow-matching scheduler) with quantize's --pipeline defaults (W4A8,
    lp+ptqd, precision rules): PTQD statistics keyed by the SD3 profile; generate --compare."""
    from lowbit.quant import read_header

    p = str(tmp_path / "q_sd3.safetensors")
    assert main(["quantize", p, "--pipeline", str(ws / "sd3"), "--prompt", "a red cat", "--steps", "4",
                 "--calib-steps", "3", "--size", SIZE]) == 0
    cap = capsys.readouterr()
    assert "quantizing to W4A8 with lp+ptqd" in cap.err and "PTQD statistics" in cap.err
    header = read_header(p)[0]
    assert header["model"]["cls"] == "SD3Transformer2DModel" and header["profile"] == "sd3"
    assert "ptqd" in header["extras"] and {m["w_bits"] for m in header["layers"].values()} == {4, 8}
    out = tmp_path / "sd3.png"
    assert main(["generate", "--pipeline", str(ws / "sd3"), "--quantized", p, "--prompt", "a blue dog", "--steps",
                 "4", "--size", SIZE, "--out", str(out), "--compare"]) == 0
    assert "PSNR" in capsys.readouterr().out and (tmp_path / "sd3_compare.png").exists()


def test_help_of_the_pipeline_options_is_fast_and_says_defaults(tmp_path):
    for cmd in ("quantize", "generate"):
        r, dt, rep = _run([cmd, "--help"], tmp_path, tmp_path)
        assert r.returncode == 0 and not rep["torch"] and dt < FAST_S
        text = " ".join(r.stdout.split())
        for w in ("--pipeline DIR", "--prompt TEXT", "--size WxH", "--guidance X", "default: the pipeline's own"):
            assert w in text, (cmd, w)
    q = " ".join(_run(["quantize", "--help"], tmp_path, tmp_path)[0].stdout.split())
    for w in ("--prompts-file FILE", "with --pipeline: lp+ptqd", "Calibration quality depends on the prompts"):
        assert w in q, w
    g = " ".join(_run(["generate", "--help"], tmp_path, tmp_path)[0].stdout.split())
    assert "--compare" in g and "IMAGE_compare.png" in g and "--quantized FILE.safetensors" in g
