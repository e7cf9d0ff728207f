"""Extraction equals HF's router outputs and losses; mesh results equal single-device ones."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moe_grok.data.splits import next_token_targets  # noqa: E402  (after the skips: collects without them)
from moe_grok.extraction.routing import extract_dataset, extract_splits, make_extractor, tiling_batch_size  # noqa: E402
from moe_grok.model import params as model_lib  # noqa: E402
from moe_grok.model.hf import load_hf  # noqa: E402
from moe_grok.sharding import make_mesh  # noqa: E402

from hf_reference import save_hf_model  # noqa: E402
from mesh_devices import fit_mesh  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_model = save_hf_model(path, num_experts_per_tok=3, norm_topk_prob=True)
    config, params = load_hf(str(path))
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 96, (13, 9))
    mask = np.ones_like(tokens)
    mask[2, 5:] = 0
    mask[7, 2:] = 0
    return hf_model, config, params, tokens, mask


@pytest.fixture(scope="module")
def extractor(tiny):
    """extract_dataset's own default extractor (make_extractor(config), cached): the tests below run batches
    of 4 rows of 9 or 2 tokens and share its two compiled programs."""
    return make_extractor(tiny[1])


def hf_forward(hf_model, tokens, mask):
    """(HF model output, router softmax [B, S, L, E] float32 numpy)."""
    with torch.no_grad():
        out = hf_model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                       output_router_logits=True)
    b, s = tokens.shape
    return out, torch.stack([torch.softmax(r.float(), -1).reshape(b, s, -1) for r in out.router_logits], 2).numpy()


def hf_reference(hf_model, tokens, mask):
    """Per-sample token-mean router softmax, per-token top-k, and mean next-token NLL from HF."""
    out, probs = hf_forward(hf_model, tokens, mask)
    m = mask[:, :, None, None].astype(np.float64)
    mean_weights = (probs * m).sum(1) / m.sum(1)
    logp = torch.log_softmax(out.logits.double(), -1).numpy()
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    target = mask[:, 1:] * mask[:, :-1]
    loss = (nll * target).sum(1) / target.sum(1)
    top_w, top_idx = torch.topk(torch.as_tensor(probs), 3, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    return mean_weights, loss, top_idx.numpy(), top_w.numpy()


def test_extraction_equals_hf(tiny):
    hf_model, config, params, tokens, mask = tiny
    out = extract_dataset(config, params, tokens, mask, batch_size=4, per_token=True, progress=False)
    mean_weights, loss, top_idx, top_w = hf_reference(hf_model, tokens, mask)
    np.testing.assert_allclose(out["mean_weights"], mean_weights, atol=1e-5)
    np.testing.assert_allclose(out["loss"], loss, atol=1e-4)
    real = mask.astype(bool)
    np.testing.assert_array_equal(out["top_experts"][real], top_idx[real])
    np.testing.assert_allclose(out["top_weights"][real], top_w[real], atol=1e-5)
    np.testing.assert_allclose(out["mean_weights"].sum(-1), 1.0, atol=1e-5)


def test_scored_routing_entropy_covers_only_the_scored_positions(tiny, extractor):
    """The answer-position ("scored") view's entropy is the router softmax's entropy at the scored
    positions alone, not the all-token mean the "all" view uses."""
    hf_model, config, params, tokens, mask = tiny
    targets, _ = next_token_targets(tokens, mask)
    answer_position = 1  # every sample has at least 2 real tokens
    target_mask = np.zeros_like(mask)
    target_mask[:, answer_position] = 1
    out = extract_dataset(config, params, tokens, mask, targets, target_mask, batch_size=4, extractor=extractor,
                          progress=False)
    _, probs = hf_forward(hf_model, tokens, mask)
    entropy = -np.sum(probs * np.log(probs), axis=-1)  # [B, S, L]
    real = mask[:, :, None].astype(np.float64)
    np.testing.assert_allclose(out["scored_routing_entropy"], entropy[:, answer_position], atol=1e-4)
    np.testing.assert_allclose(out["routing_entropy"], (entropy * real).sum(1) / real.sum(1), atol=1e-4)
    # The answer position routes unlike the sample's average token: the two views differ.
    assert np.all(np.abs(out["scored_routing_entropy"] - out["routing_entropy"]) > 1e-3)


def test_padding_does_not_change_a_sample(tiny, extractor):
    _, config, params, tokens, mask = tiny
    short = extract_dataset(config, params, tokens[7:8, :2], None, batch_size=4, extractor=extractor, progress=False)
    padded = extract_dataset(config, params, tokens[7:8], mask[7:8], batch_size=4, extractor=extractor,
                             progress=False)
    np.testing.assert_allclose(short["mean_weights"], padded["mean_weights"], atol=1e-6)
    np.testing.assert_allclose(short["loss"], padded["loss"], atol=1e-6)


def test_mesh_extraction_equals_single_device(tiny, extractor):
    _, config, params, tokens, mask = tiny
    # single device: the shared program of 4-row batches (the mesh run's batches of 8 are 1 row per device)
    single = extract_dataset(config, params, tokens, mask, batch_size=4, extractor=extractor, progress=False)
    mesh = make_mesh(*fit_mesh(4, 2))
    placed = jax.tree.map(jax.device_put, params, model_lib.param_shardings(config, mesh))
    multi = extract_dataset(config, placed, tokens, mask, batch_size=8, mesh=mesh, progress=False)
    for key in single:
        np.testing.assert_allclose(multi[key], single[key], atol=1e-5)


@pytest.mark.parametrize("rows, batch, shards, expected", [(9409, 2048, 1, 1882), (9409, 1024, 1, 941),
                                                          (13, 4, 1, 4), (13, 8, 8, 8), (8, 8, 1, 8), (3, 32, 1, 3)])
def test_tiling_batch_size_keeps_the_batch_count_with_the_least_padding(rows, batch, shards, expected):
    size = tiling_batch_size(rows, batch, shards)
    assert size == expected and size % shards == 0
    assert -(-rows // size) == -(-rows // batch)  # as many batches as batch_size would take


def test_splits_streamed_together_equal_each_split_alone(tiny, extractor):
    """Splits of one length share batches, another length gets its own; every split's rows come
    back in order with the values extract_dataset gives it alone (up to float rounding)."""
    _, config, params, tokens, mask = tiny
    short = tokens[:8, :2]  # the shape of test_padding_does_not_change_a_sample's unpadded sample: compiled once
    targets, target_mask = next_token_targets(tokens[6:], mask[6:])
    splits = {"a": (tokens[:6], mask[:6], None, None), "short": (short, None, None, None),
              "b": (tokens[6:], mask[6:], targets, target_mask)}
    together = extract_splits(config, params, splits, batch_size=4, extractor=extractor, progress=False)
    assert list(together) == ["a", "short", "b"]
    for name, (split_tokens, split_mask, split_targets, split_target_mask) in splits.items():
        alone = extract_dataset(config, params, split_tokens, split_mask, split_targets, split_target_mask,
                                batch_size=4, extractor=extractor, progress=False)
        assert together[name].keys() == alone.keys()
        for key in alone:
            assert together[name][key].shape == alone[key].shape
            np.testing.assert_allclose(together[name][key], alone[key], rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named(tiny):
    _, config, params, tokens, mask = tiny
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 64"):
        extract_dataset(config, params, np.zeros((2, 65), int), progress=False)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 96\)"):
        extract_dataset(config, params, tokens + 96, progress=False)
    empty = mask.copy()
    empty[4] = 0
    with pytest.raises(ValueError, match=r"indices \[4\]"):
        extract_dataset(config, params, tokens, empty, progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        extract_dataset(config, params, np.zeros((0, 4), int), progress=False)



def test_a_second_extraction_compiles_nothing(tiny, caplog):
    """extract_dataset without an extractor reuses the compiled program of an earlier call with the same
    architecture (make_extractor is cached), so a second call, or the next checkpoint, compiles nothing."""
    _, config, params, tokens, mask = tiny
    assert make_extractor(config) is make_extractor(config)
    assert make_extractor(config) is not make_extractor(config, with_loss=False)

    def compiled_programs(weights, rows):
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level("WARNING"):
            out = extract_dataset(config, weights, tokens[:rows], mask[:rows], batch_size=7, progress=False)
        return out, [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]

    first, compiled = compiled_programs(params, 5)
    assert any("fn" in message for message in compiled), compiled  # the test sees a compilation when there is one
    next_checkpoint = jax.tree.map(lambda a: a * 0.5, params)  # other weights, the same architecture
    second, compiled = compiled_programs(next_checkpoint, 5)
    assert compiled == []
    assert not np.allclose(first["loss"], second["loss"])
    _, compiled = compiled_programs(params, 3)  # 3 rows in one padded batch of 7: the same shapes again
    assert compiled == []
