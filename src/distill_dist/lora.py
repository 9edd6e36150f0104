"""LoRA recovery (train.adapter=lora): peft adapters on the pruned student's linear projections, the base frozen.

Why: full recovery keeps ~14-18 B per parameter of weights, gradients and optimizer state (a multi-GPU node
at 7B); with adapters the base costs its weights only and the gradients and optimizer state are those of
the adapters (`distill-dist plan` prices both), so one GPU recovers a 7B-class student. The recipe is the
same for both adapters: the student is wrapped here before the DeepSpeed engine sees it (ZeRO-3
partitions the new adapter parameters, the optimizer gets only trainable ones), and the export merges
each adapter into its base weight (peft's own delta, W + B A * alpha/r) while gathering, so `final/` is a
standard checkpoint with the pruned shapes that eval, export and report read as they read a full run's.
The adapters alone are written beside it in peft's format (`adapter/`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import ConfigError

ADAPTER_DIR = "adapter"  # under the run dir: adapter_config.json + adapter_model.safetensors (PeftModel.from_pretrained)
ADAPTER_NAME = "default"
COUNTS = ("trainable_params", "trainable_share")  # what `describe` adds to the settings


def settings(tr) -> dict:
    """The adapter settings a run records (run_meta.json `adapter`): what resume and the report compare.
    A full run records train.freeze_embeddings with them (what trains is the adapter's business)."""
    if tr.adapter == "full":
        return {"kind": "full", "freeze_embeddings": tr.freeze_embeddings}
    return {"kind": "lora", "rank": tr.lora_rank, "alpha": tr.lora_alpha, "dropout": tr.lora_dropout,
            "targets": list(tr.lora_targets)}


def settings_of(meta: dict) -> dict:
    """A run's recorded adapter settings without the counts (a run recorded without them was a full run, one
    recorded without freeze_embeddings a full run that trained its embeddings)."""
    recorded = {k: v for k, v in meta.get("adapter", {"kind": "full"}).items() if k not in COUNTS}
    return ({"freeze_embeddings": False} | recorded) if recorded["kind"] == "full" else recorded


def label(adapter: dict | None) -> str:
    """How the report names the adapter of an arm: '' for full recovery, else e.g. 'LoRA r16'."""
    adapter = adapter or {"kind": "full"}
    return "" if adapter["kind"] == "full" else f"LoRA r{adapter['rank']}"


def _meta_model(student_dir: str):
    """The student's modules on the meta device: names, shapes and counts without reading a weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_dir))


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the whole dotted name, or its ending after a dot."""
    return name == target or name.endswith("." + target)


def describe(student_dir: str, tr) -> dict:
    """The run's adapter settings with its trainable-parameter count and share, decided from the student's
    config alone (every rank, before any engine). A target matching no linear module of the body (the LM head
    is not adaptable: the fused loss reads its weight directly) is one ConfigError."""
    model = _meta_model(student_dir)
    total = sum(p.numel() for p in model.parameters())
    out = settings(tr)
    if tr.adapter == "full":  # a tied LM head is the embedding's tensor, counted once in `total`
        trainable = total - (model.get_input_embeddings().weight.numel() if tr.freeze_embeddings else 0)
        return out | {"trainable_params": trainable, "trainable_share": trainable / total}
    head = model.get_output_embeddings()
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    for target in tr.lora_targets:
        if not any(_matches(n, target) for n in linear):
            names = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise ConfigError(f"config field 'train.lora_targets': '{target}' matches no linear module of "
                              f"{student_dir} (its linear modules: {', '.join(names)})")
    adapted = [m for n, m in linear.items() if any(_matches(n, t) for t in tr.lora_targets)]
    trainable = sum(tr.lora_rank * (m.in_features + m.out_features) for m in adapted)
    return out | {"trainable_params": trainable, "trainable_share": trainable / total}


def wrap(lm, tr):
    """Inject LoRA adapters into `lm` in place (peft), base parameters frozen; returns the PeftModel around it.
    The adapters' initial values come from train.seed on every rank, so every rank (and a resumed run) starts
    from the same adapters whatever the global RNG has done."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=tr.lora_rank, lora_alpha=tr.lora_alpha, lora_dropout=tr.lora_dropout,
                        target_modules=list(tr.lora_targets), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tr.seed)
        return get_peft_model(lm, config, adapter_name=ADAPTER_NAME)


def _lora_layers(lm) -> dict:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in lm.named_modules() if isinstance(m, LoraLayer)}


def is_adapted(lm) -> bool:
    return any(".lora_A." in n for n, _ in lm.named_parameters())


def merged_parameters(lm) -> list[tuple[str, list, object]]:
    """(standard checkpoint name, parameters to gather, value) per tensor of the merged model, in
    named_parameters order: a plain parameter is itself; an adapted layer's weight is its frozen base plus
    peft's delta of its adapter (`get_delta_weight`: the exact update `merge_and_unload` adds), and the
    adapter parameters are not written. `value()` is called with the listed parameters gathered."""
    params = list(lm.named_parameters())
    if not is_adapted(lm):
        return [(n, [p], lambda p=p: p) for n, p in params]
    layers = _lora_layers(lm)
    out = []
    for name, p in params:
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") and leaf == "weight":
            layer = layers[owner.removesuffix(".base_layer")]
            pair = [layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight]
            out.append((name.replace(".base_layer.", "."), [p, *pair],
                        lambda p=p, layer=layer: p + layer.get_delta_weight(ADAPTER_NAME).to(p.dtype)))
        else:
            out.append((name.replace(".base_layer.", "."), [p], lambda p=p: p))
    return out


def adapter_parameters(lm) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in lm.named_parameters() if ".lora_" in n]


def write_adapter(peft_model, gathered: dict[str, torch.Tensor], out: Path) -> None:
    """The adapters in peft's own layout (`PeftModel.from_pretrained(student, out)` loads them): names from
    peft's get_peft_model_state_dict, given the gathered values keyed as the PeftModel names them."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(peft_model, state_dict={f"base_model.model.{n}": t for n, t in gathered.items()},
                                      adapter_name=ADAPTER_NAME)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    peft_model.peft_config[ADAPTER_NAME].save_pretrained(str(out))
