"""LowBit core: host-agnostic quantization of diffusion UNets.

Verbs (everything else is private):
  quantize(model, QuantConfig, calib)        naive PTQ baseline -> quantized copy (fake-quant mode)
  quantize_(model, QuantConfig, calib)       the same, in place (swapped in only on success)
  deploy_(qmodel) / undeploy_(qmodel)        pack to integers and run on kernels (each layer's kernel chosen by
                                             measured speed, copies within DEFAULT_COPY_BUDGET_MB) / back to fake-quant
  tune_kernels_(qmodel, copy_budget_mb)      arm the kernel autotuner again (another budget; None: no bound)
  save(qmodel, path) / load(model, path)     safetensors + versioned JSON header (load_model(path): no float model)
  CallRecorder, timestep_aware_subset        calibration data along full-precision trajectories
  record_pipeline_calls(pipe, prompts)       the same on a diffusers pipeline (diffusers_pipeline.py)
  pipeline.run(model, calls, PipelineConfig) the whole method (quantize, reconstruct, fine-tune, PTQD, deploy)
"""
from .config import (BitwidthSchedule, FinetuneConfig, LayerRule, PTQDConfig, QuantConfig, ReconConfig,
                     ACT_BITS_NONE, DEFAULT_COPY_BUDGET_MB)
from .config import Spec, arg_spec, check_verb_args, field_spec, specs
from .errors import ConfigError, Interrupted, LoadError, LowBitError, NumericalError
from .calib import Call, CallRecorder, run_calls, timestep_aware_subset, unet_output
from . import diffusers_pipeline
from .diffusers_pipeline import denoiser_of, record_pipeline_calls
from .context import QuantContext, get_context
from .layers import QuantConv2d, QuantLayer, QuantLinear, quant_layers
from .api import (calibrate_activations, deploy_, kernel_copy_bytes, quantize, quantize_, structural_copy,
                  tune_kernels_, undeploy_, weight_bytes)
from .io import load, load_model, save, read_header, register_extra
from . import ptqd, sampling
from .ptqd import PTQDStats, attach_stats, collect_stats, get_stats
from .sampling import guided_eps_fn, sample, SAMPLERS
from .schedule import auto_schedule, measure_snr
from .recon import reconstruct
from . import efficientdm
from .efficientdm import finetune, merge_, save_adapters, load_adapters
from . import pipeline
from .export_comfy import export_comfy
from .export_gguf import export_gguf
from .pipeline import PipelineConfig, Result
