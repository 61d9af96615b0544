"""`llava-lite export`: a trained run as transformers' Llava format, or with its adapters merged into the LM."""

from __future__ import annotations

import argparse

from llava_lite.commands._generation_args import add_trust_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a run in transformers' Llava format, or merge its LoRA adapters",
        description=(
            "--format hf writes a folder that transformers' LlavaForConditionalGeneration (LlavaNext for an anyres "
            "run) and AutoProcessor load with no custom code (and so vLLM, SGLang and TGI): config, safetensors "
            "weights, tokenizer with <image> and the chat template, image processor. The tower must be a "
            "transformers CLIP or SigLIP model or an OpenAI-style open_clip ViT (converted to CLIP), the projector "
            "linear or mlp2x_gelu with no pixel shuffle; adapters are merged first. --format merged writes a "
            "llava_lite run folder with LoRA adapters merged into the LM "
            "weights. The output appears whole or not at all."
        ),
    )
    parser.add_argument("--model", required=True, help="a run folder (what `llava-lite train` saved)")
    parser.add_argument(
        "--format",
        required=True,
        choices=["hf", "merged"],
        help="hf: transformers' Llava format; merged: a run with its adapters merged into the LM",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="the folder to write: missing or empty, never the run or a folder inside it or holding it",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="hf: weight dtype (default: the LM's)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it is an earlier export (it holds the .llava_lite_export that export writes); "
        "any other non-empty folder is refused",
    )
    add_trust_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from llava_lite.interop.folders import check_output_folder
    from llava_lite.interop.hf_export import export_hf_llava
    from llava_lite.interop.merge import export_merged
    from llava_lite.model.llava import LlavaLiteModel

    check_output_folder(args.out, [args.model], args.overwrite)  # before the model loads
    if args.format == "merged":
        out = export_merged(args.model, args.out, args.overwrite, args.trust_remote_code)
        print(f"merged run written to {out}")
        return 0
    model = LlavaLiteModel.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export_hf_llava(model, args.out, dtype, args.overwrite, sources=[args.model])
    print(f"transformers Llava model written to {out}")
    return 0
