"""SAE training on the bundled shapes-world CLIP: the activation buffer, the three recipes, the
BatchTopK → JumpReLU conversion, bit-identical resumption and clear errors."""

import pytest
import torch

from clip_lens import HookedCLIP
from clip_lens.errors import HookNameError, IndexOutOfRangeError, InputError
from clip_lens.sae.activations import ActivationSource
from clip_lens.sae.model import SAE, SAEConfig
from clip_lens.sae.train import _resample, _TrainingSAE, evaluate_sae, train_sae
from clip_lens.toy.world import ShapesWorld, batch_images

HOOK = "blocks.2.hook_resid_post"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def images():
    world = ShapesWorld(seed=0)
    return batch_images([world.scene(i) for i in range(64)])


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    key = rows.double() @ torch.linspace(1, 2, rows.shape[1], dtype=torch.float64)
    return rows[key.argsort()]


def test_buffer_yields_the_rows_of_a_direct_run_with_cache_shuffled_within_its_bound(toy, images):
    source = ActivationSource(toy, images[:40], "blocks.1.attn.hook_z", positions="patches", batch_size=4,
                              buffer_size=1024, token_batch=100, epochs=1, seed=3)
    batches, peak = [], 0
    for batch in source:
        batches.append(batch)
        peak = max(peak, source.buffered + len(batch))
    rows = torch.cat(batches)
    _, cache = toy.run_with_cache(images[:40], names_filter="blocks.1.attn.hook_z", stop_at_layer=2)
    direct = cache["blocks.1.attn.hook_z"][:, 1:].flatten(2).reshape(-1, 128)  # heads side by side per patch
    assert rows.shape == direct.shape == (40 * 64, 128)
    torch.testing.assert_close(_sorted_rows(rows), _sorted_rows(direct), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rows[:100], direct[:100])  # shuffled, not in stream order
    assert {len(b) for b in batches[:-1]} == {100}
    assert peak <= 1024 and source.peak_rows <= 1024 and source._buffer.shape[0] == 1024
    in_order = torch.cat(list(ActivationSource(toy, images[:8], "blocks.1.attn.hook_z", positions="patches",
                                               batch_size=4, buffer_size=1024, token_batch=100, shuffle=False, epochs=1)))
    torch.testing.assert_close(in_order, direct[: 8 * 64], atol=1e-5, rtol=1e-5)


def test_positions_text_hooks_and_decomposition_terms(toy, images):
    def rows(hook=None, **kw):
        return torch.cat(list(ActivationSource(toy, kw.pop("data", images[:6]), hook, batch_size=3, buffer_size=4096,
                                               token_batch=2048, shuffle=False, epochs=1, **kw)))

    assert rows("blocks.0.mlp.hook_post", positions="cls").shape == (6, 512)
    assert rows(HOOK, positions=[0, 5]).shape == (12, 128)
    assert rows("hook_pooled").shape == (6, 128)
    heads = rows(term="heads", layer=3, head=1)
    torch.testing.assert_close(heads, toy.decompose(images[:6], heads=[3]).heads[:, 0, 1], atol=1e-5, rtol=1e-5)
    prompts = ["a red circle", "a small blue square on a striped background"]
    tokens = toy.to_tokens(prompts)
    eot = toy.text.pooled_positions(tokens)
    text_rows = rows("text.blocks.1.hook_resid_post", data=prompts)
    assert len(text_rows) == int((eot + 1).sum())  # every token up to each prompt's EOT, no padding
    pooled = rows("text.blocks.1.hook_resid_post", data=prompts, positions="pooled")
    _, cache = toy.run_with_cache(text=tokens, names_filter="text.blocks.1.hook_resid_post", return_type=None)
    torch.testing.assert_close(pooled, cache["text.blocks.1.hook_resid_post"][torch.arange(2), eot], atol=1e-5, rtol=1e-5)


def _source(toy, images, **kw):
    settings = dict(batch_size=16, buffer_size=4096, token_batch=256, seed=0)
    return ActivationSource(toy, images, HOOK, **{**settings, **kw})


def test_topk_training_lowers_mse_and_beats_the_untrained_sae(toy, images):
    result = train_sae(_source(toy, images), 256, architecture="topk", k=8, steps=150, progress=False,
                       dead_after=256 * 20)
    first, last = result.history[0], result.history[-1]  # history[0]: the SAE at initialisation
    assert last["mse"] < 0.5 * first["mse"]
    assert result.final["explained_variance"] > first["explained_variance"] + 0.3
    assert result.final["explained_variance"] > 0.7 and result.final["l0"] <= 8
    assert result.sae.cfg.architecture == "topk" and result.sae.cfg.k == 8 and result.sae.cfg.hook_name == HOOK
    torch.testing.assert_close(result.sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5, rtol=0)
    x = torch.cat(list(_source(toy, images[:32], epochs=1)))
    centred = x - x.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    pca = 1 - (centred - centred @ v[:8].T @ v[:8]).pow(2).sum() / centred.pow(2).sum()
    with torch.no_grad():
        sae_ev = 1 - (x - result.sae(x)).pow(2).sum() / centred.pow(2).sum()
    print(f"explained variance: top-{8} SAE {float(sae_ev):.3f}, PCA with 8 components {float(pca):.3f}")


def test_batchtopk_converts_to_a_jumprelu_that_reconstructs_like_training(toy, images):
    result = train_sae(_source(toy, images), 256, architecture="batchtopk", k=8, steps=150, progress=False,
                       dead_after=256 * 20)
    sae = result.sae
    assert sae.cfg.architecture == "jumprelu" and sae.threshold.unique().numel() == 1
    assert float(sae.threshold[0].detach()) == pytest.approx(result.history[-1]["threshold"], rel=0.05)
    x = next(iter(_source(toy, images, seed=5, token_batch=2048)))
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # the training-time activation: k × batch largest of the batch
        flat = torch.relu(pre).flatten()
        top = torch.topk(flat, 8 * len(x))
        trained = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre) @ sae.W_dec + sae.b_dec
        converted = sae(x)
    variance = (x - x.mean(0)).pow(2).sum()
    ev_trained = 1 - (x - trained).pow(2).sum() / variance
    ev_converted = 1 - (x - converted).pow(2).sum() / variance
    assert abs(float(ev_trained - ev_converted)) < 0.05
    assert float((converted - trained).pow(2).sum() / variance) < 0.1
    assert 4 <= float((sae.encode(x) > 0).sum(-1).float().mean()) <= 12


def test_relu_l1_reduces_l0(toy, images):
    free = train_sae(_source(toy, images), 256, architecture="relu", l1=0.0, steps=80, progress=False)
    sparse = train_sae(_source(toy, images), 256, architecture="relu", l1=1.0, steps=80, progress=False)
    assert sparse.final["l0"] < 0.6 * free.final["l0"]
    assert sparse.history[-1]["l0"] < 0.6 * sparse.history[0]["l0"]
    assert sparse.sae.cfg.architecture == "standard"


def test_dead_relu_features_are_resampled_towards_badly_reconstructed_inputs():
    generator = torch.Generator().manual_seed(0)
    sae = _TrainingSAE(16, 32, "relu", None, generator)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(64, 16, generator=generator)
    pre, f, x_hat = sae(x)
    (x - x_hat).pow(2).sum().backward()
    optimizer.step()
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    dead = torch.tensor([3, 7, 20])
    sae.since_fired[dead] = 1000
    err = torch.zeros_like(x)
    err[11] = 1.0  # only input 11 is badly reconstructed: every dead feature points at it
    assert _resample(sae, optimizer, x, err, dead_after=500, generator=generator) == 3
    target = (x[11] - sae.b_dec) / (x[11] - sae.b_dec).norm()
    for feature in dead.tolist():
        torch.testing.assert_close(sae.W_dec[feature].detach(), target.detach())
        assert float(sae.b_enc[feature].detach()) == 0 and float(optimizer.state[sae.W_dec]["exp_avg"][feature].abs().sum()) == 0
    alive = torch.ones(32, dtype=torch.bool)
    alive[dead] = False
    assert torch.equal(sae.W_dec[alive].detach(), before["W_dec"][alive]) and int(sae.since_fired.max()) == 0


def test_killed_and_resumed_run_ends_bit_identical(toy, images, tmp_path):
    def run(folder, data=images[:32], **kw):  # a small buffer, so the kill falls between refills of the mixing buffer
        source = _source(toy, data, batch_size=4, buffer_size=700, token_batch=128)
        return train_sae(source, 128, architecture="batchtopk", k=4, steps=24, checkpoint_every=5, progress=False,
                         dead_after=128 * 3, checkpoint_dir=tmp_path / folder, **kw)

    whole = run("whole")

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 13:
            raise Killed

    with pytest.raises(Killed):
        run("resumed", callback=kill)
    resumed = run("resumed")
    assert resumed.resumed_from == 10 and whole.resumed_from is None
    for name, value in whole.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    assert resumed.history == whole.history and resumed.final == whole.final
    assert any("aux_loss" in entry for entry in whole.history)  # AuxK was active
    assert SAE.load(tmp_path / "resumed" / "sae").cfg.architecture == "jumprelu"
    with pytest.raises(InputError, match="lr: checkpoint"):
        run("resumed", lr=1e-2)
    with pytest.raises(InputError, match="source.data_fingerprint: checkpoint"):
        run("resumed", data=images[32:])


def test_evaluate_sae_splices_and_compares_zero_shot_accuracy(toy, images):
    result = train_sae(_source(toy, images), 256, architecture="topk", k=8, steps=40, progress=False)
    evaluation = evaluate_sae(toy, result.sae, n_images=48)
    assert evaluation.n_rows == 48 * 65 and 0 < evaluation.explained_variance < 1
    assert evaluation.l0 <= 8 and 0 <= evaluation.dead_fraction < 1
    assert set(evaluation.zero_shot) == set(evaluation.zero_shot_clean) == {"colour", "shape", "size", "position", "background"}
    assert evaluation.zero_shot != evaluation.zero_shot_clean
    labels = torch.zeros(8, dtype=torch.long)
    classified = evaluate_sae(toy, result.sae, images[:8], texts=["a shape", "a red circle"], labels=labels)
    assert set(classified.zero_shot) == {"accuracy"}


def test_bad_inputs_raise_clear_errors(toy, images):
    with pytest.raises(HookNameError, match="blocks.2.hook_resid_post"):
        ActivationSource(toy, images, "blocks.2.hook_resid_pots")
    with pytest.raises(InputError, match="two forward batches of 1040 rows"):
        ActivationSource(toy, images, HOOK, batch_size=16, buffer_size=1000, token_batch=256).d_in
    with pytest.raises(InputError, match="token_batch=1024 must be at most half of buffer_size=1000"):
        ActivationSource(toy, images, HOOK, buffer_size=1000, token_batch=1024)
    with pytest.raises(InputError, match="positions"):
        ActivationSource(toy, images, HOOK, positions="middle")
    with pytest.raises(IndexOutOfRangeError, match="head=7"):
        ActivationSource(toy, images, term="heads", layer=1, head=7)
    bad = images[:8].clone()
    bad[5, 0, 3, 3] = float("nan")
    with pytest.raises(InputError, match=r"image #5 .*NaN"):
        list(ActivationSource(toy, bad, HOOK, batch_size=4, buffer_size=1024, token_batch=256, epochs=1))

    def overflow(resid, hook):  # finite pixels, but the third image of a batch overflows inside the model
        if len(resid) > 2:
            resid[2, 3] = float("inf")
        return resid

    with toy.hooks(fwd_hooks=[("blocks.0.hook_resid_post", overflow)]):
        with pytest.raises(InputError, match=r"blocks\.2\.hook_resid_post has NaN or inf activations for image #2"):
            list(ActivationSource(toy, images[:8], HOOK, batch_size=4, buffer_size=1024, token_batch=256, epochs=1))
    with pytest.raises(InputError, match="k, an integer"):
        train_sae(_source(toy, images), 64, architecture="topk", k=100, progress=False)
    with pytest.raises(InputError, match="l1"):
        train_sae(_source(toy, images), 64, architecture="relu", progress=False)
    with pytest.raises(InputError, match="ran out"):
        train_sae(_source(toy, images[:4], epochs=1), 64, architecture="topk", k=4, steps=50, progress=False)
    wrong_width = SAE(SAEConfig(d_in=128, d_sae=64, hook_name="blocks.1.mlp.hook_post"))
    with pytest.raises(InputError, match="d_in=128.*width 512"):
        evaluate_sae(toy, wrong_width, images[:4], zero_shot=False)


def test_kept_rows_give_the_same_stream_with_one_pass_of_forwards(toy, images):
    """keep=True: a data set that fits in the buffer is run through the model once; the stream of
    three epochs is the one of a source that runs the model every epoch."""
    def stream(keep):
        source = ActivationSource(toy, images[:24], HOOK, positions="cls", batch_size=4, buffer_size=64,
                                  token_batch=8, seed=5, keep=keep)
        calls = []
        rows = source._rows
        source._rows = lambda start, stop: calls.append(start) or rows(start, stop)
        batches = [next(source) for _ in range(9)]  # 72 rows: three epochs of 24 images
        return torch.cat(batches), calls

    kept, kept_calls = stream(True)
    plain, plain_calls = stream(False)
    assert torch.equal(kept, plain)
    assert sorted(kept_calls) == [0, 0, 4, 8, 12, 16, 20]  # the probe, then each batch once
    assert len(plain_calls) > len(kept_calls) + 6


def test_matryoshka_prefixes_make_the_first_features_reconstruct_on_their_own(toy, images):
    """With matryoshka=[8], the first 8 features alone explain more variance than the first 8 of a
    plain SAE trained the same way (which spread the signal over all 32)."""
    def first_eight_ev(matryoshka):
        source = _source(toy, images, token_batch=64, buffer_size=4096)
        sae = train_sae(source, 32, architecture="topk", k=6, steps=150, lr=3e-3, progress=False,
                        matryoshka=matryoshka).sae
        x = next(iter(_source(toy, images, token_batch=256, buffer_size=4096, seed=9)))
        with torch.no_grad():
            f = sae.encode(x)
            f[:, 8:] = 0
            err = (x - sae.decode(f)).pow(2).sum()
        return float(1 - err / (x - x.mean(0)).pow(2).sum())

    nested, plain = first_eight_ev([8]), first_eight_ev(None)
    assert nested > plain + 0.1, (nested, plain)
    source = _source(toy, images)
    for bad in ([8, 8], [40], [0, 4], (4.5,), "8"):
        with pytest.raises(InputError, match="matryoshka"):
            train_sae(source, 32, k=4, steps=2, matryoshka=bad, progress=False)
