"""The local-model workload's options (flags of the trainer; ``--model`` selects this workload)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol import field_metadata


@dataclass
class HFModelOptions:
    model: str | None = field(default=None, metadata=field_metadata(
        "local Hugging Face checkpoint directory (instead of --benchmark digits)"))
    modality: str = field(default="chameleon", metadata=field_metadata(
        "image tokens of --model: chameleon|anole|emu3 (from its vocabulary; Emu3's generation layout)|"
        "janus (placeholders, and codes numbered after the text vocabulary)|"
        "'LO:HI,begin=ID,end=ID'"))
    data: str | None = field(default=None, metadata=field_metadata(
        "comma-separated task JSONL files (tasks in file order, then first-record order)"))
    eval_data: str | None = field(default=None, metadata=field_metadata(
        "comma-separated held-out JSONL files scored by exact match, tasks matched by name: test/gqa.jsonl for "
        "gqa.jsonl (default: --data)"))
    gen_data: str | None = field(default=None, metadata=field_metadata(
        "comma-separated JSONL generation stream for KD (caption + image codes, image part scored)"))
    gen_prompts: tuple[str, ...] = field(default=(), metadata=field_metadata(
        "prompt token files (.json/.pt) drawn after the last task", nargs="*"))
    image_tokens: int = field(default=1024, metadata=field_metadata(
        "codes per image of --gen-prompts (emu3: each prompt file's height and width)"))
    decoder: str | None = field(default=None, metadata=field_metadata(
        "module:function mapping an image's generated ids (LongTensor) to pixels (float [3, H, W] in [0, 1]) "
        "for --gen-prompts PNGs (Chameleon/Anole: transformers has no VQ decoder; emu3: the checkpoint's by default)",
        metavar="MODULE:FUNCTION"))
    on_bad_record: str = field(default="refuse", metadata=field_metadata(
        "bad JSONL records (listed with file:line): stop before training, or drop them", choices=("refuse", "skip")))
