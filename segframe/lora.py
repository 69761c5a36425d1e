"""LoRA on the backbone through peft: add adapters, merge and unload them, count trainable parameters.

Adapters are injected in place into the backbone's timm module with
`peft.inject_adapter_in_model`, so there is no PeftModel wrapper: state-dict keys stay those
of the model (`...attn.qkv.base_layer.weight`, `...attn.qkv.lora_A.default.weight`) and the
same module tree is rebuilt from the config alone. peft (and the transformers it imports, over a
second of every process start) is imported only where adapters are added: before that no module can
hold a peft layer.
"""

from __future__ import annotations

import re
import sys

from torch import nn

from segframe.config import LoraConfig
from segframe.errors import ConfigError

ADAPTER = "default"


def target_regex(target_modules: list[str]) -> str:
    """Module names inside the transformer blocks -> a regex peft matches against full module paths.

    `qkv` -> `blocks.N.attn.qkv`; `proj` -> `blocks.N.attn.proj` but never `patch_embed.proj`;
    `fc1` -> `blocks.N.mlp.fc1`. Names are literal (regex characters are escaped).
    """
    if not target_modules:
        raise ConfigError("lora.target_modules is empty: name at least one module, e.g. [qkv]")
    names = "|".join(re.escape(t) for t in target_modules)
    return rf"(?:.*\.)?blocks\.\d+\.(?:[\w.]+\.)?(?:{names})"


def _block_linears(module: nn.Module) -> list[str]:
    return sorted({name.split(".")[-1] for name, m in module.named_modules()
                   if isinstance(m, nn.Linear) and re.search(r"blocks\.0\.", name)})


def _tuner_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """module's peft layers (name, layer); none while peft was never imported."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(module: nn.Module) -> bool:
    return bool(_tuner_layers(module))


def add_lora(module: nn.Module, lora: LoraConfig) -> nn.Module:
    """Inject LoRA adapters (rank `lora.r`) into `module`'s block layers named by `lora.target_modules`.

    peft freezes every other parameter of `module` and leaves the adapters trainable; the
    adapters' B matrices start at zero, so outputs are unchanged until training moves them.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=target_regex(lora.target_modules),
        bias="none",
    )
    try:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    except ValueError as exc:
        if "not found" not in str(exc) and "Target modules" not in str(exc):
            raise
        raise ConfigError(
            f"lora.target_modules {lora.target_modules} match no layer of the backbone's blocks; "
            f"linear layers in a block: {', '.join(_block_linears(module))}"
        ) from None
    return module


def merge_lora(module: nn.Module) -> int:
    """Merge every LoRA adapter into its base layer and put the base layer back; returns the count.

    Afterwards the module tree and state-dict keys are those of the model without LoRA.
    """
    tuners = _tuner_layers(module)
    for name, layer in tuners:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    return len(tuners)


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name


def parameter_counts(parts: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """part name -> (trainable, total) parameters; `backbone` splits off its LoRA adapters as `lora`."""
    counts: dict[str, tuple[int, int]] = {}
    for part, module in parts.items():
        groups: dict[str, list[int]] = {}
        for name, p in module.named_parameters():
            key = "lora" if part == "backbone" and is_lora_parameter(name) else part
            trainable, total = groups.setdefault(key, [0, 0])
            groups[key] = [trainable + (p.numel() if p.requires_grad else 0), total + p.numel()]
        for key, (trainable, total) in groups.items():
            counts[key] = (trainable, total)
        counts.setdefault(part, (0, 0))
    return counts


def format_counts(counts: dict[str, tuple[int, int]], detailed: bool = False) -> str:
    """peft's one-line summary, plus one line per part when `detailed`."""
    trainable = sum(t for t, _ in counts.values())
    total = sum(n for _, n in counts.values())
    pct = 100 * trainable / total if total else 0.0
    lines = [f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"]
    if detailed:
        for part, (t, n) in counts.items():
            lines.append(f"  {part:<10} {t:>13,} / {n:>13,} ({100 * t / n if n else 0.0:.2f}%)")
    return "\n".join(lines)
