"""Int8 device-tier stages: quantization error, exact pass-through gradients, memory as the planner counts it."""

from __future__ import annotations

import pytest
import torch

from edgeray.model import build_model
from edgeray.model.presets import PRESETS
from edgeray.model.quant import Int8Embedding, Int8Linear, int8_state, quantize_int8_, stage_weight_bytes
from edgeray.model.stages import split_llama
from edgeray.topology import loads_topology
from edgeray.train.planner import BYTES_PER_PARAM_TRAINING, PlanError, _stage_weight_memory, plan_pipeline


def test_rows_quantize_within_half_a_step_and_requantize_to_the_same_int8():
    linear = torch.nn.Linear(64, 48)
    q = Int8Linear(linear)
    err = (q.dequantized() - linear.weight).abs()
    assert (err <= q.scale / 2 + 1e-7).all()
    assert (q.qweight.abs().amax(dim=1) == 127).all()  # each row's largest weight maps to +-127
    relin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        relin.weight.copy_(q.dequantized())
    assert torch.equal(Int8Linear(relin).qweight, q.qweight)  # resume from a checkpoint: same int8 values


def test_int8_stage_equals_the_model_with_its_dequantized_weights_frozen():
    torch.manual_seed(0)
    ids = torch.randint(3, 4096, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    model = build_model("tiny", seed=3)
    stages = split_llama(model, [2])
    quantize_int8_(stages[0])  # stage 0: embedding + layers 0-1 held in int8
    assert isinstance(stages[0].embed_tokens, Int8Embedding)
    assert {n for n, p in stages[0].named_parameters()} == {
        f"layers.{i}.{norm}.weight"
        for i in (0, 1)
        for norm in ("input_layernorm", "post_attention_layernorm")
    }
    # Reference: the plain model carrying the dequantized weights, those weights frozen.
    reference = build_model("tiny", seed=3)
    deq = {("model." + k if not k.startswith("lm_head") else k): v for k, v in int8_state(stages[0]).items()}
    _, unexpected = reference.load_state_dict(deq, strict=False)
    assert not unexpected and len(deq) == 1 + 2 * 7
    for name, p in reference.named_parameters():
        p.requires_grad_(name not in deq)
    ref_logits = reference(input_ids=ids, attention_mask=mask).logits
    ref_logits.sum().backward()

    hidden = stages[0](input_ids=ids, attention_mask=mask)
    received = hidden.detach().requires_grad_(True)
    logits = stages[1](hidden=received, attention_mask=mask)
    logits.sum().backward()
    hidden.backward(received.grad)  # gradients pass through the int8 stage to its norms
    assert (logits - ref_logits).abs().max() <= 1e-5
    ref = dict(reference.named_parameters())
    for stage, prefix in ((stages[0], "model."), (stages[1], "model.")):
        for name, p in stage.named_parameters():
            full = name if name.startswith("lm_head") else prefix + name
            if name.startswith("layers."):
                idx, _, tail = name.removeprefix("layers.").partition(".")
                full = f"model.layers.{stage.start + int(idx)}.{tail}"
            assert (p.grad - ref[full].grad).abs().max() <= 1e-5, full


@pytest.mark.parametrize("layers", [(0, 2), (1, 3), (2, 4), (0, 4)])
def test_planner_memory_matches_the_bytes_an_int8_stage_really_holds(layers):
    preset = PRESETS["tiny"]
    a, b = layers
    stage = split_llama(build_model("tiny"), [x for x in (a, b) if 0 < x < 4])[0 if a == 0 else 1]
    assert (stage.start, stage.stop) == (a, b)
    fp32_stored = stage_weight_bytes(stage)
    quantize_int8_(stage)
    trainable = sum(p.numel() for p in stage.parameters())
    rotary = sum(b.numel() * 4 for b in stage.rotary_emb.buffers())  # rotary tables, not weights
    # planner = stored weights + gradients and two AdamW moments (12 bytes) of what still trains
    assert _stage_weight_memory(preset, a, b, True) == stage_weight_bytes(stage) - rotary + 12 * trainable
    assert _stage_weight_memory(preset, a, b, False) == (fp32_stored - rotary) * BYTES_PER_PARAM_TRAINING // 4
    assert stage_weight_bytes(stage) < 0.27 * fp32_stored


def test_plan_shows_int8_device_stages_and_their_saving_and_int8_can_make_a_plan_fit():
    doc = (
        "name: m\nregions:\n"
        "  - {name: cell, tier: device, nodes: [{name: phone, memory_gb: 0.06}]}\n"
        "  - {name: mec, tier: regional, nodes: [{name: mec-1, memory_gb: 4}]}\n"
        "links:\n  - {between: [cell, mec], latency_ms: 10, bandwidth_mbps: 50}\n"
    )
    topo = loads_topology(doc)
    kwargs = {"preset": "small", "stages": 2, "data_node": "phone", "micro_batch_size": 1, "seq_len": 32}
    plan = plan_pipeline(topo, **kwargs)
    assert plan.int8_stages == (0,)
    phone = plan.stages[0]
    assert phone.memory_bytes < phone.node_memory_bytes < phone.fp32_memory_bytes
    row = plan.table().splitlines()[1]
    assert "int8" in row and f"{(phone.fp32_memory_bytes - phone.memory_bytes) / 2**20:.1f}" in row
    with pytest.raises(PlanError, match=r"(?s)phone needs .*short by .*int8"):
        plan_pipeline(topo, int8_tiers=frozenset(), **kwargs)
