"""The costed plan: its counts against real transformers models, torch's FLOP counter, autograd's saved
tensors and DeepSpeed's ZeRO-3 estimator; the sweep parser, the CLI and its errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM

from distill_dist.config import load_config
from distill_dist.plan import (OLMO2_7B, Hardware, ModelShape, activation_bytes, costed_plan, forward_flops,
                               main, measure_lengths, model_states, render_markdown, student_shape,
                               sweep_from_script, train_flops)

SMALL = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, eos_token_id=0, pad_token_id=0, bos_token_id=0)
OLMO2_7B_CONFIG = dict(model_type="olmo2", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=100352, tie_word_embeddings=False)


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,tied", [("olmo2", False), ("llama", False), ("llama", True)])
def test_params_match_real_models(arch, tied):
    cls, config_cls = (Olmo2ForCausalLM, Olmo2Config) if arch == "olmo2" else (LlamaForCausalLM, LlamaConfig)
    config = config_cls(**SMALL, tie_word_embeddings=tied)
    model = cls(config)
    assert ModelShape.from_config(config).params() == _numel(model)
    assert ModelShape.from_config(config.to_dict()) == ModelShape.from_config(config)


@pytest.mark.parametrize("arch,tied", [("olmo2", False), ("llama", True)])
def test_plan_prices_a_frozen_embedding_as_the_engine_freezes_it(arch, tied):
    """train.freeze_embeddings: the plan's trainable count is what is left trainable once the input embedding
    is frozen as the student engine freezes it (a tied head with it, an untied one still trains); its states
    shrink by exactly the embedding's gradient, master and Adam bytes (16 B/param in bf16, it keeps its 2)."""
    cls, config_cls = (Olmo2ForCausalLM, Olmo2Config) if arch == "olmo2" else (LlamaForCausalLM, LlamaConfig)
    model = cls(config_cls(**SMALL, tie_word_embeddings=tied))
    model.get_input_embeddings().weight.requires_grad_(False)
    shape = ModelShape.from_config(model.config)
    plans = {f: costed_plan(load_config(None, ["prune.schedule=[1.0]", "model.dtype=bfloat16",
                                               f"train.freeze_embeddings={f}"]),
                            model.config.to_dict(), hw=Hardware(gpus_per_node=4)) for f in ("false", "true")}
    one_gpu = plans["true"]["one_gpu"]
    assert one_gpu["full"]["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert one_gpu["full"]["trainable_params"] == shape.params() - SMALL["vocab_size"] * SMALL["hidden_size"]
    embedding = SMALL["vocab_size"] * SMALL["hidden_size"]
    states = {f: plans[f]["memory_per_gpu"]["model_states_steady"] for f in plans}
    assert states["false"] - states["true"] == pytest.approx(16 * embedding / 4)
    assert one_gpu["lora"]["trainable_params"] == plans["false"]["one_gpu"]["lora"]["trainable_params"]
    md = render_markdown(plans["true"])
    assert "full recovery with the embeddings frozen" in md and "model states (embedding frozen" in md
    assert "embeddings frozen" not in render_markdown(plans["false"])


def test_7b_params_match_a_meta_olmo2_and_pruning_rule():
    """At the real width: an Olmo2ForCausalLM with OLMo2-7B's config built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Olmo2ForCausalLM(Olmo2Config(**OLMO2_7B_CONFIG))
    shape = ModelShape.from_config(OLMO2_7B_CONFIG)
    assert shape == OLMO2_7B and shape.params() == _numel(model)
    student = student_shape(shape, 0.5, 64)
    assert student.intermediate == 5504 and student.params() < shape.params()
    with torch.device("meta"):
        pruned = Olmo2ForCausalLM(Olmo2Config(**{**OLMO2_7B_CONFIG, "intermediate_size": student.intermediate}))
    assert student.params() == _numel(pruned)


def test_forward_and_train_flops_match_torch_flop_counter():
    """Eager attention, LM head at every position (supervised = L): matmul + attention FLOPs counted by torch;
    backward = 2x forward."""
    torch.manual_seed(0)
    model = Olmo2ForCausalLM._from_config(Olmo2Config(**SMALL), attn_implementation="eager")
    shape = ModelShape.from_config(model.config)
    B, L = 2, 40
    ids = torch.randint(0, 512, (B, L))
    with FlopCounterMode(display=False) as fwd:
        logits = model(input_ids=ids).logits
    assert fwd.get_total_flops() == pytest.approx(B * forward_flops(shape, L, L), rel=1e-6)
    with FlopCounterMode(display=False) as both:
        model(input_ids=ids).logits.float().pow(2).mean().backward()
    assert both.get_total_flops() == pytest.approx(B * train_flops(shape, L, L), rel=0.01)
    assert logits.shape == (B, L, 512)


def test_activation_formula_against_saved_tensors():
    """Bytes autograd saves for backward in an OLMo2 forward (parameters excluded), fp32, vs the formula.
    Tolerance 15%: CPU sdpa also saves its L x L mask/probabilities (the formula assumes flash attention)."""
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(Olmo2Config(**SMALL))
    shape = ModelShape.from_config(model.config)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    B, L = 2, 48
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 512, (B, L)))
    predicted = activation_bytes(shape, B * L, positions=1, p=4, chunk=1024, checkpointing=False)["layers"]
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.15)


def test_model_states_bracket_deepspeed_estimator():
    """DeepSpeed's estimate (no offload, the row estimate_zero3_model_states_mem_needs_all_cold prints for
    offload_param=none, offload_optimizer=none) counts 18 B/param + 4 B x largest layer. Ours: 18 B/param
    steady (bf16 param, fp32 gradient: ds_configs accumulate in fp32), 22 B at the optimizer step (the fp32
    gradient flattened), + bf16 param and grad of the gathered layer; so DeepSpeed's figure equals our
    steady one and lies within 25% of the peak."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    for keep in (1.0, 0.5):
        s = student_shape(OLMO2_7B, keep, 64)
        _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(s.params(), s.largest_module(), num_gpus_per_node=8,
                                                             cpu_offload=False, cpu_offload_params=False)
        states = model_states(s.params(), world=8, p=2, fused_adam=True)
        gathered = 2 * 2 * s.largest_module()
        low, high = states["steady"] + gathered, states["peak"] + gathered
        assert low == pytest.approx(ds_gpu, rel=1e-9) and ds_gpu < high
        assert ds_gpu == pytest.approx(high, rel=0.25)  # the step's fp32 gradient copy: 4 of 22 B/param
    fp32 = model_states(10**9, world=2, p=4, fused_adam=False)
    assert fp32["steady"] == 16 * 10**9 / 2 and fp32["peak"] == 24 * 10**9 / 2  # no master copy; unfused temp


def test_sweep_parser(tmp_path):
    script = tmp_path / "reproduce.sh"
    script.write_text('KEEP_RATIOS=${KEEP_RATIOS:-0.9 0.4}\nDATA_SIZES=${DATA_SIZES:-10}\nSEEDS=${SEEDS:-1 2 3}\n')
    sweep = sweep_from_script(script)
    assert (sweep["keep_ratios"], sweep["data_sizes"], sweep["seeds"]) == ([0.9, 0.4], [10], [1, 2, 3])
    assert sweep_from_script(tmp_path / "missing.sh")["source"] == "built-in defaults"


def test_lengths_measured_on_data(synthetic_data_dir, tiny_tokenizer):
    cfg = load_config(None, [f"data.path={synthetic_data_dir}", "data.max_length=64"])
    one = measure_lengths(cfg, tiny_tokenizer, micro_batch=1)
    four = measure_lengths(cfg, tiny_tokenizer, micro_batch=4)
    assert one["kl"]["rows"] == 200 and one["kl"]["mean_padded_tokens"] == pytest.approx(one["kl"]["mean_tokens"])
    assert four["kl"]["mean_padded_tokens"] > four["kl"]["mean_tokens"]  # rows differ in length
    assert one["kl"]["mean_supervised"] == 1.0 and one["kl"]["max_tokens"] <= 64


def test_plan_scales_with_its_assumptions():
    cfg = load_config(None, ["model.dtype=bfloat16", "prune.round_to=64"])
    base = costed_plan(cfg, OLMO2_7B_CONFIG)
    faster = costed_plan(cfg, OLMO2_7B_CONFIG, hw=Hardware(mfu=0.7))
    h, h2 = base["sweep"]["gpu_hours"], faster["sweep"]["gpu_hours"]
    assert h2["total_live"] == pytest.approx(h["total_live"] / 2)
    # Live KL pays a teacher forward per sequence of every KL arm; the cache pays it once per train row.
    assert h["total_live"] - h["total_cache"] == pytest.approx(h["teacher_live"] - h["teacher_cache"])
    m16 = costed_plan(load_config(None, ["model.dtype=bfloat16"]), OLMO2_7B_CONFIG, hw=Hardware(gpus_per_node=16))
    assert m16["memory_per_gpu"]["model_states"] < base["memory_per_gpu"]["model_states"]
    assert "GPU-hours, live teacher" in render_markdown(base)


def test_cli(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(OLMO2_7B_CONFIG))
    assert main(["--model-config", str(config), "--json", "model.dtype=bfloat16", "data.path=/nonexistent"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["teacher"]["params"] == OLMO2_7B.params() and plan["tokens"]["kl"]["rows"] == 9741
    assert main(["--mfu", "2"]) == 2
    assert "--mfu must be in (0, 1]" in capsys.readouterr().err


GATHER_PROBE = r"""
import json, sys, torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from distill_dist import runtime
from distill_dist.config import load_config
from distill_dist.engines import teacher_engine
d, max_live = sys.argv[1], int(sys.argv[2])
zo = "zero_optimization."
cfg = load_config(None, [f"model.path={d}", "model.dtype=float32", "train.ds_overrides={%sstage3_max_live_parameters: "
                         "%d, %sstage3_prefetch_bucket_size: 1000, %sstage3_param_persistence_threshold: 0}" % (zo, max_live, zo, zo)])
runtime.init(5)
engine = teacher_engine(d, cfg)
params, peaks = list(engine.module.parameters()), []
def hook(*_):
    peaks[-1] = max(peaks[-1], sum(p.ds_numel for p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE))
for m in engine.module.modules():
    if not list(m.children()):
        m.register_forward_pre_hook(hook)
        m.register_forward_hook(hook)
ids = torch.randint(0, 500, (2, 16))
batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), rows=torch.arange(2), cols=torch.full((2,), 15))
with torch.no_grad():
    for _ in range(3):
        peaks.append(0)
        engine(**batch)
print("PEAKS " + json.dumps(peaks))
"""


@pytest.mark.parametrize("max_live", [10**9, 300_000])
def test_gathered_parameters_match_a_zero3_forward(tmp_path, max_live):
    """A ZeRO-3 teacher forward (world of one, CPU, tiny prefetch bucket, nothing persistent): once the trace
    is recorded, the parameters held whole at once reach min(max_live + largest, traced) -- the whole body
    when max_live allows it, far above the largest module + prefetch bucket that the plan used to assume."""
    import os
    import subprocess
    import sys

    from distill_dist.plan import gathered_params

    config = Olmo2Config(**{**SMALL, "num_hidden_layers": 4})
    Olmo2ForCausalLM(config).save_pretrained(tmp_path / "t")
    shape = ModelShape.from_config(config)
    traced = shape.params() - shape.vocab * shape.hidden  # the head is not in the engine's forward
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29400 + os.getpid() % 500))
    out = subprocess.run([sys.executable, "-c", GATHER_PROBE, str(tmp_path / "t"), str(max_live)], env=env,
                         capture_output=True, text=True, timeout=300)
    peaks = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("PEAKS "))[6:])
    bound = gathered_params(traced, shape.largest_module(), max_live)
    assert peaks[0] <= 2 * shape.largest_module() + 1000  # the first forward fetches module by module
    assert max(peaks[1:]) <= bound  # after the trace: the prefetcher runs ahead, never past the bound
    if max_live < traced:  # the cap binds: held at it
        assert max(peaks[1:]) >= max_live
    else:  # the lead grows by a parameter at every module without one: 2/3 of the body by the last layer
        assert max(peaks[1:]) > 0.5 * traced > 2 * shape.largest_module() + 1000


def test_calibration_pass_is_costed():
    """L2 scores cost no model pass; activation/wanda one forward (no head) per calibration text; taylor the
    forward with the head plus the backward to the activations; the sweep adds one pass per ratio x score."""
    base = ["prune.calibration=train", "prune.calibration_samples=100", "model.path=/nonexistent"]
    sweep = {"keep_ratios": [0.5, 0.3], "data_sizes": [10], "seeds": [0], "scores": ["gate_up_down", "taylor"],
             "source": "test"}
    plans = {sc: costed_plan(load_config(None, base + [f"prune.score={sc}"]), sweep=sweep)
             for sc in ("gate_up_down", "activation", "taylor")}
    L = plans["taylor"]["tokens"]["kl"]["mean_tokens"]
    assert plans["gate_up_down"]["calibration"]["flops"] == 0
    assert plans["activation"]["calibration"]["flops"] == pytest.approx(100 * forward_flops(OLMO2_7B, L, 0))
    assert plans["taylor"]["calibration"]["flops"] == pytest.approx(200 * forward_flops(OLMO2_7B, L, L - 1))
    assert plans["taylor"]["calibration"]["memory_per_gpu"] > plans["activation"]["calibration"]["memory_per_gpu"]
    sw = plans["gate_up_down"]["sweep"]
    assert sw["flops"]["calibration"] == pytest.approx(2 * plans["taylor"]["calibration"]["flops"])
    assert sw["runs"] == 2 * 2 * 2  # ratios x scores x arms
    assert sw["flops"]["total_cache"] == pytest.approx(sw["flops"]["students"] + sw["flops"]["teacher_cache"]
                                                       + sw["flops"]["evals"] + sw["flops"]["calibration"])
    assert "calibration pass, prune.score=taylor" in render_markdown(plans["taylor"])


def test_teacher_placement_is_the_plans_choice():
    """Replicated when the whole teacher fits beside the student (no teacher all-gather: the cached run's
    traffic), ZeRO-3 shards when it does not; the table shows both and the choice."""
    from distill_dist.plan import choose_placement

    cfg = load_config(None, ["model.dtype=bfloat16", "prune.round_to=64"])
    plan = costed_plan(cfg, OLMO2_7B_CONFIG)
    tp, m = plan["teacher_placement"], plan["memory_per_gpu"]
    assert tp["choice"] == "replicated" and "fits" in tp["why"]  # 80 GB GPUs, 8 of them
    assert tp["replicated"]["memory"] - tp["sharded"]["memory"] == pytest.approx(
        m["teacher_replicated"] - m["teacher_shard"] - m["teacher_gathered"])
    assert m["teacher_replicated"] == 2 * OLMO2_7B.params()
    assert tp["replicated"]["traffic"] == plan["zero3_bytes_per_step"]["cache"]["total"]
    assert tp["sharded"]["traffic"] > tp["replicated"]["traffic"]
    small = costed_plan(cfg, OLMO2_7B_CONFIG, hw=Hardware(gpu_mem_gb=32))  # 35.2 GB replicated, 25.2 sharded
    assert small["teacher_placement"]["choice"] == "sharded" and "> 90% of 32 GB" in small["teacher_placement"]["why"]
    assert choose_placement(m, None) == ("sharded", "no GPU to size a replicated teacher against: ZeRO-3 shards")
    assert choose_placement(m, 1e12, "sharded")[0] == "sharded"
    table = render_markdown(plan)
    assert "live teacher sharded (ZeRO-3)" in table and "live teacher replicated" in table
    assert "| teacher placement (teacher.placement=auto, 80 GB GPUs) | replicated: " in table
