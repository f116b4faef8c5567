import torch

from apogee.models.flavors import FLAVORS, get_flavor
from apogee.models.init import count_parameters, init_weights
from apogee.models.llama import Transformer, apply_rope, rope_cos_sin


def build(name="tiny", vocab=128, seed=0, **changes):
    import dataclasses

    args = dataclasses.replace(get_flavor(name).with_vocab(vocab), **changes)
    with torch.device("meta"):
        model = Transformer(args)
    init_weights(model, seed, torch.device("cpu"))
    return model


def test_logits_shape_and_parameter_count():
    model = build()
    logits = model(torch.randint(0, 128, (3, 17)))
    assert logits.shape == (3, 17, 128)
    assert count_parameters(model) == model.args.num_params()


def test_published_parameter_counts():
    # Llama 3 8B / 70B / 405B and Llama 3.2 1B, as published.
    assert round(get_flavor("llama3-8b").num_params() / 1e9, 2) == 8.03
    assert round(get_flavor("llama3-70b").num_params() / 1e9, 1) == 70.6
    assert round(get_flavor("llama3-405b").num_params() / 1e9, 0) == 406
    assert round(get_flavor("llama-1b").num_params() / 1e9, 2) == 1.24
    assert set(FLAVORS) >= {"debug", "shakespeare-char", "llama-1b", "llama3-8b", "llama3-70b", "llama3-405b", "dense-1t"}


def test_init_is_deterministic_and_seeded():
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name
    # Norm gains start at one; weights at the configured scale; residual outputs scaled by depth.
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))
    assert abs(a.layers["0"].attention.wq.weight.std().item() - 0.02) < 0.002
    assert a.layers["0"].feed_forward.w2.weight.std().item() < 0.02 / 2


def test_tied_embeddings_share_one_tensor():
    model = build(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert count_parameters(model) == model.args.num_params()


def test_causal_no_peeking_at_the_future():
    model = build()
    x = torch.randint(0, 128, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 128
    torch.testing.assert_close(model(x)[0, :8], model(y)[0, :8])


def test_rope_preserves_norm_and_is_relative():
    rope = rope_cos_sin(8, 32, 10000.0)
    q = torch.randn(1, 32, 2, 8)
    rq = apply_rope(q, rope)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # <R_m q, R_n k> depends on m - n only.
    k = torch.randn(1, 1, 1, 8)
    qq = q[:, :1, :1].expand(1, 32, 1, 8)
    kk = k.expand(1, 32, 1, 8)
    rq, rk = apply_rope(qq, rope), apply_rope(kk, rope)
    d1 = (rq[0, 5] * rk[0, 3]).sum()
    d2 = (rq[0, 12] * rk[0, 10]).sum()
    torch.testing.assert_close(d1, d2)


def test_gqa_matches_repeated_kv_heads():

    model = build()  # 4 heads, 2 kv heads
    attn = model.layers["0"].attention
    x = torch.randn(2, 10, model.args.dim)
    out = attn(x, model.rope)
    # Reference: repeat each kv head for its query group.
    hd = model.args.head_dim
    q = apply_rope(attn.wq(x).view(2, 10, 4, hd), model.rope).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(2, 10, 2, hd), model.rope).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.wv(x).view(2, 10, 2, hd).transpose(1, 2).repeat_interleave(2, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, attn.wo(ref.transpose(1, 2).reshape(2, 10, -1)))
