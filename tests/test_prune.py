"""Structured MLP pruning: neuron selection, streamed checkpoint surgery, and its exact equivalence to masking."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_HIDDEN, TINY_INTER, TINY_LAYERS, randomize_
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_dist import cli
from distill_dist.errors import CheckpointError, ConfigError
from distill_dist.hf_checkpoint import PLAN_FILE, checkpoint_fingerprint, load_plan, plan_hash
from distill_dist.models import MLP_PROJ
from distill_dist.prune import keep_count, neuron_scores, prune_checkpoint, select_neurons


@torch.no_grad()
def prune_model_(model, kept: list[list[int]]) -> None:
    """The independent in-memory reference the streamed pruning is checked against: slice a loaded
    model's MLPs in place to the given per-layer neuron indices."""
    mlps = [layer.mlp for layer in model.model.layers]
    if len(kept) != len(mlps):
        raise CheckpointError(f"plan has {len(kept)} layers, model has {len(mlps)}")
    for mlp, ix in zip(mlps, kept):
        ix_t = torch.tensor(ix, dtype=torch.long)
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight = torch.nn.Parameter(lin.weight.index_select(0, ix_t))
            lin.out_features = len(ix)
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.index_select(1, ix_t))
        mlp.down_proj.in_features = len(ix)
    model.config.intermediate_size = len(kept[0])


def _quiet(*_a, **_k):
    pass


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                assert name not in out, f"{name} stored twice"
                out[name] = st.get_tensor(name)
    return out


def _load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _masked_original(src: Path, kept: list[list[int]], dtype=torch.float32):
    """The unpruned model with every dropped neuron's down_proj input column zeroed."""
    model = _load(src, dtype)
    with torch.no_grad():
        for layer, ix in zip(model.model.layers, kept):
            drop = sorted(set(range(layer.mlp.down_proj.weight.shape[1])) - set(ix))
            assert drop, "the test needs neurons to drop"
            layer.mlp.down_proj.weight[:, drop] = 0
    return model


def _random_ids(vocab: int, seed: int = 0, shape=(3, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


# ---------------------------------------------------------------- pure functions

@pytest.mark.parametrize("inter, ratio, round_to, expected", [
    (256, 0.5, 1, 128),
    (10, 0.25, 1, 3),          # ceil(2.5)
    (100, 0.3, 1, 30),         # 0.3 * 100 = 30.000000000000004 in floats: must not become 31
    (11008, 0.7, 1, 7706),     # 7705.6 -> 7706
    (192, 0.3, 64, 64),        # ceil(57.6) = 58 -> 64
    (256, 0.3, 64, 128),       # 77 -> 128
    (100, 1.0, 64, 100),       # rounding up never exceeds the original size
    (10, 0.01, 1, 1),          # at least one neuron
    (7, 1.0, 1, 7),
])
def test_keep_count(inter, ratio, round_to, expected):
    assert keep_count(inter, ratio, round_to) == expected


def test_select_neurons_ties_go_to_lower_index():
    s = torch.tensor([1.0, 2.0, 2.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    assert select_neurons(s, 1) == [4]
    assert select_neurons(s, 2) == [1, 4]
    assert select_neurons(s, 3) == [1, 2, 4]
    assert select_neurons(s, 5) == [0, 1, 2, 4, 5]
    assert select_neurons(torch.ones(6, dtype=torch.float64), 3) == [0, 1, 2]
    assert select_neurons(torch.tensor([5.0, 4.0, 3.0]), 3) == [0, 1, 2]  # ascending output


@pytest.mark.parametrize("score", ["gate_up_down", "gate_up", "down"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neuron_scores_match_float64_hand_computation(score, dtype):
    g = torch.Generator().manual_seed(7)
    inter, hidden = 12, 8
    gate = (torch.randn(inter, hidden, generator=g) * torch.linspace(0.5, 2, inter)[:, None]).to(dtype)
    up = torch.randn(inter, hidden, generator=g).to(dtype)
    down = (torch.randn(hidden, inter, generator=g) * torch.linspace(2, 0.5, inter)[None, :]).to(dtype)
    G, U, D = (t.double().tolist() for t in (gate, up, down))
    ref = []
    for j in range(inter):
        terms = []
        if score in ("gate_up_down", "gate_up"):
            terms += [G[j][h] ** 2 for h in range(hidden)] + [U[j][h] ** 2 for h in range(hidden)]
        if score in ("gate_up_down", "down"):
            terms += [D[h][j] ** 2 for h in range(hidden)]
        ref.append(math.sqrt(math.fsum(terms)))
    got = neuron_scores(gate, up, down, score)
    assert got.dtype == torch.float64 and got.shape == (inter,)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=0)
    ref_order = sorted(sorted(range(inter), key=lambda j: (-ref[j], j))[:5])
    assert select_neurons(got, 5) == ref_order


def test_neuron_scores_unknown_variant():
    t = torch.ones(2, 2)
    with pytest.raises(ValueError, match="unknown score"):
        neuron_scores(t, t, t, "l1")


# ---------------------------------------------------------------- equivalence to masking

@pytest.fixture(scope="module")
def pruned_tiny(tiny_olmo2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned_tiny") / "p30"
    plan = prune_checkpoint(tiny_olmo2_dir, out, 0.3, log=_quiet)
    return plan, out


def test_tiny_olmo2_pruned_equals_masked_original(tiny_olmo2_dir, pruned_tiny):
    plan, out = pruned_tiny
    k = keep_count(TINY_INTER, 0.3)
    assert plan["intermediate_size_after"] == k == 58
    assert [len(ix) for ix in plan["kept_indices"]] == [k] * TINY_LAYERS
    pruned = _load(out)
    ids = _random_ids(pruned.config.vocab_size)
    got = _logits(pruned, ids)
    ref = _logits(_masked_original(tiny_olmo2_dir, plan["kept_indices"]), ids)
    assert (got - ref).abs().max().item() < 1e-5
    # the check has power: the unmasked original is far away, so do other neuron choices
    assert (got - _logits(_load(tiny_olmo2_dir), ids)).abs().max().item() > 1e-2
    wrong = [sorted(set(range(TINY_INTER)) - set(ix))[:k] for ix in plan["kept_indices"]]
    assert (got - _logits(_masked_original(tiny_olmo2_dir, wrong), ids)).abs().max().item() > 1e-2


def test_tiny_olmo2_pruned_shapes_and_untouched_tensors(tiny_olmo2_dir, pruned_tiny):
    plan, out = pruned_tiny
    k = plan["intermediate_size_after"]
    model = _load(out)
    assert model.config.intermediate_size == k
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == k
    for layer in model.model.layers:
        assert tuple(layer.mlp.gate_proj.weight.shape) == (k, TINY_HIDDEN)
        assert tuple(layer.mlp.up_proj.weight.shape) == (k, TINY_HIDDEN)
        assert tuple(layer.mlp.down_proj.weight.shape) == (TINY_HIDDEN, k)
    _check_tensors(tiny_olmo2_dir, out, plan)


def _check_tensors(src: Path, out: Path, plan: dict) -> None:
    """Non-MLP tensors byte-identical; MLP tensors exactly the kept rows/columns of the source."""
    a, b = _tensors(src), _tensors(out)
    assert set(a) == set(b)
    n_untouched = 0
    for name, t in a.items():
        parts = name.split(".")
        if len(parts) == 6 and parts[3] == "mlp" and parts[4] in MLP_PROJ:
            ix = torch.tensor(plan["kept_indices"][int(parts[2])])
            if parts[4] == "down_proj" and parts[5] == "weight":
                expected = t.index_select(1, ix)
            elif parts[4] == "down_proj":
                expected = t
            else:
                expected = t.index_select(0, ix)
            assert torch.equal(b[name], expected), name
        else:
            assert b[name].dtype == t.dtype and b[name].shape == t.shape, name
            assert b[name].numpy().tobytes() == t.numpy().tobytes(), name
            n_untouched += 1
    # embeddings (TinyStories stores its tied embedding once, as lm_head.weight), norms, attention
    assert any("embed_tokens" in n or n == "lm_head.weight" for n in a)
    assert any("norm" in n for n in a) and any("self_attn" in n for n in a)
    assert n_untouched > 0


def test_in_memory_prune_matches_streamed_checkpoint(tiny_olmo2_dir, pruned_tiny):
    plan, out = pruned_tiny
    live = _load(tiny_olmo2_dir)
    prune_model_(live, plan["kept_indices"])
    streamed = _load(out)
    assert live.config.intermediate_size == plan["intermediate_size_after"]
    sd_live, sd_streamed = live.state_dict(), streamed.state_dict()
    assert sd_live.keys() == sd_streamed.keys()
    for name in sd_live:
        assert torch.equal(sd_live[name], sd_streamed[name]), name
    ids = _random_ids(live.config.vocab_size, seed=3)
    assert (_logits(live, ids) - _logits(streamed, ids)).abs().max().item() < 1e-6


def test_llama_with_mlp_bias_pruned_equals_masked(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=40,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         mlp_bias=True, tie_word_embeddings=True)).eval()
    randomize_(model, seed=5)
    with torch.no_grad():  # biases are 1-D: give them zero-mean values rather than 1 +- 0.2
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    src = tmp_path / "llama_bias"
    model.save_pretrained(src)
    plan = prune_checkpoint(src, tmp_path / "out", 0.5, score="gate_up", log=_quiet)
    k = 20
    pruned = _load(tmp_path / "out")
    for layer in pruned.model.layers:
        assert tuple(layer.mlp.gate_proj.bias.shape) == (k,) and tuple(layer.mlp.down_proj.bias.shape) == (32,)
    ids = _random_ids(len(tiny_tokenizer), seed=1)
    got = _logits(pruned, ids)
    assert (got - _logits(_masked_original(src, plan["kept_indices"]), ids)).abs().max().item() < 1e-5
    assert (got - _logits(_load(src), ids)).abs().max().item() > 1e-2
    # with biases: gate/up lose k weights rows + k bias entries; down keeps its H-wide bias
    H, L, I = 32, 2, 40
    assert plan["params"]["mlp_before"] == L * (3 * I * H + 2 * I + H)
    assert plan["params"]["mlp_after"] == L * (3 * k * H + 2 * k + H)
    _check_tensors(src, tmp_path / "out", plan)


# ---------------------------------------------------------------- the real TinyStories-656K (Llama)

def test_tinystories_pruned_equals_masked(tinystories_dir, tmp_path):
    out = tmp_path / "ts_pruned"
    plan = prune_checkpoint(tinystories_dir, out, 0.5, max_shard_mb=1, log=_quiet)
    src_cfg = json.loads((tinystories_dir / "config.json").read_text())
    H, I, L = src_cfg["hidden_size"], src_cfg["intermediate_size"], src_cfg["num_hidden_layers"]
    k = keep_count(I, 0.5)
    assert plan["intermediate_size_after"] == k and plan["architecture"] == "LlamaForCausalLM"
    # 2.6 MB of float32 at max 1 MiB per shard: a sharded output with an index
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    for p in shards:
        with safe_open(str(p), framework="pt") as st:
            sizes = [st.get_tensor(n).numel() * 4 for n in st.keys()]
        assert len(sizes) == 1 or sum(sizes) <= 1 << 20, p.name

    pruned = _load(out)
    assert pruned.config.intermediate_size == k
    for layer in pruned.model.layers:
        assert tuple(layer.mlp.down_proj.weight.shape) == (H, k)
    ids = _random_ids(pruned.config.vocab_size, shape=(3, 40))
    # float64: zeroed columns add exact zeros, so masking and slicing agree to rounding of 1e-16
    got64 = _logits(_load(out, torch.float64), ids)
    ref64 = _logits(_masked_original(tinystories_dir, plan["kept_indices"], torch.float64), ids)
    assert (got64 - ref64).abs().max().item() < 1e-9
    # float32: logits reach ~17 here, so allow float32 rounding relative to the logit scale
    got, ref = _logits(pruned, ids), _logits(_masked_original(tinystories_dir, plan["kept_indices"]), ids)
    assert (got - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
    assert (got - got64.float()).abs().max().item() < 1e-3
    assert (got - _logits(_load(tinystories_dir), ids)).abs().max().item() > 1e-1

    _check_tensors(tinystories_dir, out, plan)
    assert plan["source_fingerprint"] == checkpoint_fingerprint(tinystories_dir)
    p = plan["params"]
    assert p["mlp_before"] == 3 * I * H * L and p["mlp_after"] == 3 * k * H * L
    assert p["total_after"] == sum(t.numel() for t in _tensors(out).values())
    assert p["total_after"] == sum(t.numel() for t in pruned.parameters())  # tied embeddings: stored once
    # the tokenizer files beside the source come along
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == AutoTokenizer.from_pretrained(
        str(tinystories_dir)).get_vocab()


# ---------------------------------------------------------------- the plan

def test_plan_fingerprint_and_param_counts(tiny_olmo2_dir, pruned_tiny):
    plan, out = pruned_tiny
    assert plan["source_fingerprint"] == checkpoint_fingerprint(tiny_olmo2_dir)
    k, H, I, L = plan["intermediate_size_after"], TINY_HIDDEN, TINY_INTER, TINY_LAYERS
    p = plan["params"]
    assert p["mlp_before"] == 3 * I * H * L
    assert p["mlp_after"] == 3 * k * H * L
    assert p["total_before"] == sum(t.numel() for t in _tensors(tiny_olmo2_dir).values())
    assert p["total_after"] == sum(t.numel() for t in _tensors(out).values())
    assert p["total_before"] - p["total_after"] == p["mlp_before"] - p["mlp_after"]
    assert p["total_after"] == sum(t.numel() for t in _load(out).parameters())
    on_disk = load_plan(out)
    assert on_disk["plan_sha256"] == plan["plan_sha256"] == plan_hash(on_disk)
    assert on_disk["kept_indices"] == plan["kept_indices"]
    assert all(ix == sorted(set(ix)) and 0 <= ix[0] and ix[-1] < I for ix in plan["kept_indices"])


def test_plan_hash_stable_and_sensitive(tiny_olmo2_dir, pruned_tiny, tmp_path):
    plan, out = pruned_tiny
    again = prune_checkpoint(tiny_olmo2_dir, tmp_path / "elsewhere", 0.3, log=_quiet)
    assert again["plan_sha256"] == plan["plan_sha256"]
    assert again["kept_indices"] == plan["kept_indices"]
    assert checkpoint_fingerprint(tmp_path / "elsewhere") == checkpoint_fingerprint(out)  # byte-identical output
    other_ratio = prune_checkpoint(tiny_olmo2_dir, tmp_path / "r50", 0.5, log=_quiet)
    other_score = prune_checkpoint(tiny_olmo2_dir, tmp_path / "down", 0.3, score="down", log=_quiet)
    hashes = {plan["plan_sha256"], other_ratio["plan_sha256"], other_score["plan_sha256"]}
    assert len(hashes) == 3
    assert other_score["kept_indices"] != plan["kept_indices"]
    rounded = prune_checkpoint(tiny_olmo2_dir, tmp_path / "r64", 0.3, round_to=64, log=_quiet)
    assert rounded["intermediate_size_after"] == 64 and rounded["plan_sha256"] not in hashes


def test_load_plan_detects_edits(pruned_tiny, tmp_path):
    _, out = pruned_tiny
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert load_plan(copy)["plan_sha256"] == load_plan(out)["plan_sha256"]
    plan = json.loads((copy / PLAN_FILE).read_text())
    plan["kept_indices"][1][0] += 1
    (copy / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match="plan_sha256 does not match"):
        load_plan(copy)
    plan = json.loads((out / PLAN_FILE).read_text())
    plan["keep_ratio"] = 0.31
    (copy / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match="edited or corrupt"):
        load_plan(copy)
    plan = json.loads((out / PLAN_FILE).read_text())
    plan["provenance"]["source_path"] = "/moved/elsewhere"  # where it ran is not part of the plan
    (copy / PLAN_FILE).write_text(json.dumps(plan))
    assert load_plan(copy)["plan_sha256"] == plan["plan_sha256"]
    with pytest.raises(CheckpointError, match="no pruning_plan.json"):
        load_plan(tmp_path)


# ---------------------------------------------------------------- re-runs and refusals

def test_rerun_same_dir_is_nothing_to_do(tiny_olmo2_dir, tmp_path):
    out = tmp_path / "p"
    first = prune_checkpoint(tiny_olmo2_dir, out, 0.5, log=_quiet)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    msgs = []
    second = prune_checkpoint(tiny_olmo2_dir, out, 0.5, log=msgs.append)
    assert second["plan_sha256"] == first["plan_sha256"]
    assert len(msgs) == 1 and "nothing to do" in msgs[0] and first["plan_sha256"][:12] in msgs[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_different_ratio_into_existing_dir(tiny_olmo2_dir, tmp_path):
    out = tmp_path / "p"
    first = prune_checkpoint(tiny_olmo2_dir, out, 0.5, log=_quiet)
    with pytest.raises(CheckpointError, match=r"already holds a different pruning.*prune\.overwrite=true"):
        prune_checkpoint(tiny_olmo2_dir, out, 0.25, log=_quiet)
    with pytest.raises(CheckpointError, match="already holds a different pruning"):
        prune_checkpoint(tiny_olmo2_dir, out, 0.5, score="gate_up", log=_quiet)
    assert load_plan(out)["plan_sha256"] == first["plan_sha256"]  # untouched by the refusals
    second = prune_checkpoint(tiny_olmo2_dir, out, 0.25, overwrite=True, log=_quiet)
    assert load_plan(out)["plan_sha256"] == second["plan_sha256"] != first["plan_sha256"]
    assert _load(out).config.intermediate_size == keep_count(TINY_INTER, 0.25) == 48
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary dirs left behind"


def test_existing_unrelated_output_dir_is_not_deleted(tiny_olmo2_dir, tmp_path):
    out = tmp_path / "my_notes"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    try:
        prune_checkpoint(tiny_olmo2_dir, out, 0.5, log=_quiet)
    except CheckpointError:
        pass
    assert (out / "important.txt").is_file()


def test_rounding_that_keeps_every_neuron_is_refused_not_silent(tiny_olmo2_dir, tmp_path):
    """keep 0.9 of the tiny model's 192 neurons is 173; rounded up to a multiple of 256 it is all 192: a 'pruned'
    model that is the original. One line naming prune.round_to, and nothing written."""
    with pytest.raises(ConfigError, match=rf"^config field 'prune.round_to' = 256: keep ratio 0.9 of {TINY_INTER} MLP "
                                          rf"neurons rounds up to all {TINY_INTER}, which prunes nothing"):
        prune_checkpoint(tiny_olmo2_dir, tmp_path / "out", 0.9, round_to=256, log=_quiet)
    assert not (tmp_path / "out").exists()
    assert keep_count(TINY_INTER, 0.9, 16) < TINY_INTER  # a smaller multiple still prunes


def test_output_dir_equal_to_source_is_refused(tiny_olmo2_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_olmo2_dir, src)
    try:
        prune_checkpoint(src, src, 0.5, log=_quiet)
    except CheckpointError:
        pass
    assert json.loads((src / "config.json").read_text())["intermediate_size"] == TINY_INTER


def test_gpt2_without_gated_mlp_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match=r"GPT2LMHeadModel is not a gated-MLP decoder"):
        prune_checkpoint(tmp_path / "gpt2", tmp_path / "out", 0.5, log=_quiet)
    assert not (tmp_path / "out").exists()


def test_causal_lm_without_gated_mlp_is_refused(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=32)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight not found.*GPTNeoXForCausalLM has no gated MLP"):
        prune_checkpoint(tmp_path / "neox", tmp_path / "out", 0.5, log=_quiet)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="no config.json"):
        prune_checkpoint(tmp_path / "out", tmp_path / "out2", 0.5, log=_quiet)


# ---------------------------------------------------------------- the CLI with the real OLMo2 tokenizer

def test_cli_make_tiny_and_prune_with_olmo2_tokenizer(olmo2_tokenizer_file, tmp_path, capsys):
    teacher, out = tmp_path / "teacher", tmp_path / "pruned"
    assert cli.main(["make-tiny", f"model.path={teacher}", f"model.tokenizer={olmo2_tokenizer_file}",
                     "tiny.hidden_size=32", "tiny.intermediate_size=64", "tiny.num_heads=2",
                     "tiny.num_kv_heads=2"]) == 0
    assert cli.main(["prune", f"model.path={teacher}", f"model.tokenizer={olmo2_tokenizer_file}",
                     "prune.schedule=[0.5]", f"prune.output_dir={out}"]) == 0
    assert "distill-dist: error" not in capsys.readouterr().err
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    assert vocab >= 100278 and vocab % 64 == 0
    model = _load(out)
    assert model.config.vocab_size == vocab
    assert model.get_input_embeddings().weight.shape == (vocab, 32)
    assert model.config.intermediate_size == 32
    assert model.model.layers[0].mlp.up_proj.weight.shape == (32, 32)
    assert (out / "tokenizer.json").is_file() and (out / "distill_dist_prune.yaml").is_file()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 100278
    assert tok(" A", add_special_tokens=False)["input_ids"] == [362]
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>"
    assert load_plan(out)["source_fingerprint"] == checkpoint_fingerprint(teacher)
    # the resolved config is saved beside the output and reproduces it
    saved = (out / "distill_dist_prune.yaml").read_text()
    assert "schedule:\n  - 0.5" in saved and str(out) in saved


def test_make_tiny_default_vocab_is_olmo2_padding(olmo2_tokenizer):
    from distill_dist.config import TinyModelConfig
    from distill_dist.models import build_tiny_model

    model = build_tiny_model(TinyModelConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                                             num_kv_heads=1), olmo2_tokenizer)
    assert model.config.vocab_size == 100352


def test_prune_of_pruned_keeps_root_and_composes(tiny_olmo2_dir, pruned_tiny, tmp_path):
    """Iterative schedules prune a pruned checkpoint to a count relative to the original size."""
    plan1, first = pruned_tiny  # 0.3 -> 58 neurons
    k2 = keep_count(TINY_INTER, 0.2)
    plan2 = prune_checkpoint(first, tmp_path / "second", 0.2, keep=k2, log=_quiet)
    assert plan1["root_fingerprint"] == plan1["source_fingerprint"] == checkpoint_fingerprint(tiny_olmo2_dir)
    assert plan2["source_fingerprint"] == checkpoint_fingerprint(first)
    assert plan2["root_fingerprint"] == checkpoint_fingerprint(tiny_olmo2_dir)
    assert plan2["intermediate_size_before"] == 58 and plan2["intermediate_size_after"] == k2 == 39
    # kept indices of the second prune index into the first's survivors
    composed = [[ix1[j] for j in ix2] for ix1, ix2 in zip(plan1["kept_indices"], plan2["kept_indices"])]
    ids = _random_ids(512, seed=9)
    got = _logits(_load(tmp_path / "second"), ids)
    assert (got - _logits(_masked_original(tiny_olmo2_dir, composed), ids)).abs().max().item() < 1e-5
    with pytest.raises(CheckpointError, match="cannot keep 59 of 58"):
        prune_checkpoint(first, tmp_path / "third", 0.5, keep=59, log=_quiet)
    with pytest.raises(CheckpointError, match="cannot keep 0 of 58"):
        prune_checkpoint(first, tmp_path / "third", 0.5, keep=0, log=_quiet)
    assert not (tmp_path / "third").exists()
