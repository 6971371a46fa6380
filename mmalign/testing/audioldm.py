"""A tiny, seeded, offline AudioLDM pipeline (diffusers ``AudioLDMPipeline``) for tests.

Modelled on diffusers' own ``AudioLDMPipelineFastTests.get_dummy_components``: a tiny CLAP text
encoder (``ClapTextModelWithProjection``), a UNet with ``class_embed_type="simple_projection"`` that
takes the CLAP text embedding as its class embedding, a tiny ``AutoencoderKL`` on 1-channel mel
spectrograms and a tiny ``SpeechT5HifiGan`` vocoder. The only difference is the tokenizer: diffusers
downloads ``hf-internal-testing/tiny-random-roberta``; here a RoBERTa byte-level BPE tokenizer is
written locally from the CLIP merges that open_clip ships
(:func:`mmalign.testing.tokenizers.roberta_tokenizer`).

Default sizes: 16 mel bins, a VAE scale factor of 2, a 2x2 vocoder upsampling at 16 kHz and a UNet
``sample_size`` of 16, so the default clip is 16 * 2 * 4 = 128 samples (8 ms) and the latents are
``B,4,16,8``.
"""
from __future__ import annotations

from typing import Any

import torch

from .tokenizers import roberta_tokenizer

_COMPONENTS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer", "vocoder")


def tiny_audioldm_pipeline(seed: int = 0, **overrides: Any):
    """A real ``diffusers.AudioLDMPipeline`` with tiny random weights seeded by ``seed`` (CPU, float32, eval).

    ``overrides`` per component name (``unet``, ``scheduler``, ``vae``, ``text_encoder``,
    ``tokenizer``, ``vocoder``): a dict updates that component's constructor/config arguments
    (e.g. ``unet={"sample_size": 32}``, ``vocoder={"sampling_rate": 8000}``, ``tokenizer={"num_merges": 500}``);
    any other value replaces the component (e.g. ``scheduler=PNDMScheduler(skip_prk_steps=True)``).
    """
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

    unknown = sorted(set(overrides) - set(_COMPONENTS))
    if unknown:
        raise TypeError(f"tiny_audioldm_pipeline: unknown overrides {unknown}; components are {list(_COMPONENTS)}")

    def conf(name: str, defaults: dict[str, Any]) -> dict[str, Any]:
        value = overrides.get(name)
        return {**defaults, **value} if isinstance(value, dict) else defaults

    def given(name: str) -> Any:
        value = overrides.get(name)
        return None if value is None or isinstance(value, dict) else value

    tokenizer = given("tokenizer")
    if tokenizer is None:
        tokenizer = roberta_tokenizer(**conf("tokenizer", {"num_merges": 1000, "model_max_length": 77}))

    text_dim = 16
    text_encoder = given("text_encoder")
    if text_encoder is None:
        torch.manual_seed(seed)
        text_config = ClapTextConfig(
            **conf(
                "text_encoder",
                dict(
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    vocab_size=len(tokenizer),
                    hidden_size=16,
                    intermediate_size=37,
                    layer_norm_eps=1e-05,
                    num_attention_heads=2,
                    num_hidden_layers=2,
                    max_position_embeddings=tokenizer.model_max_length + 2,  # RoBERTa positions start at pad+1
                    projection_dim=text_dim,
                ),
            )
        )
        text_encoder = ClapTextModelWithProjection(text_config)
    text_dim = text_encoder.config.projection_dim

    unet = given("unet")
    if unet is None:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            **conf(
                "unet",
                dict(
                    block_out_channels=(16, 32),
                    layers_per_block=1,
                    norm_num_groups=8,
                    sample_size=16,
                    in_channels=4,
                    out_channels=4,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                    # AudioLDM calls the UNet with encoder_hidden_states=None, so the "cross" attention
                    # attends to the block's own features: its width must equal the block's channels.
                    cross_attention_dim=(16, 32),
                    attention_head_dim=2,
                    class_embed_type="simple_projection",
                    projection_class_embeddings_input_dim=text_dim,
                    class_embeddings_concat=True,
                ),
            )
        )

    scheduler = given("scheduler")
    if scheduler is None:
        # the published cvssp/audioldm-s-full-v2 scheduler settings
        scheduler = DDIMScheduler(
            **conf(
                "scheduler",
                dict(
                    beta_start=0.00085,
                    beta_end=0.012,
                    beta_schedule="scaled_linear",
                    clip_sample=False,
                    set_alpha_to_one=False,
                    steps_offset=1,
                ),
            )
        )

    vae = given("vae")
    if vae is None:
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            **conf(
                "vae",
                dict(
                    block_out_channels=[8, 16],
                    in_channels=1,
                    out_channels=1,
                    norm_num_groups=8,
                    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
                    latent_channels=4,
                ),
            )
        )

    vocoder = given("vocoder")
    if vocoder is None:
        torch.manual_seed(seed)
        vocoder = SpeechT5HifiGan(
            SpeechT5HifiGanConfig(
                **conf(
                    "vocoder",
                    dict(
                        model_in_dim=16,
                        sampling_rate=16000,
                        upsample_initial_channel=16,
                        upsample_rates=[2, 2],
                        upsample_kernel_sizes=[4, 4],
                        resblock_kernel_sizes=[3, 7],
                        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
                        normalize_before=False,
                    ),
                )
            )
        )

    # Modules built from configs start in train mode; the CLAP encoder has dropout, so put everything
    # in eval mode as from_pretrained would (deterministic encodings).
    for module in (text_encoder, unet, vae, vocoder):
        module.eval()
    pipe = AudioLDMPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, vocoder=vocoder
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")  # already float32; a dtype cast here only makes diffusers warn


__all__ = ["tiny_audioldm_pipeline"]
