"""Sparse dictionaries against the peer libraries: SAELens 6 (training forward, losses, gradients, files)
and EleutherAI sparsify (files, encode/decode, FVU and AuxK under matching definitions).

Same weights, same inputs. SAELens runs in float64 (its JumpReLU threshold stays float32 by design, so
the thresholds here are float32-representable and its gradient is compared at float32 precision).
"""

from __future__ import annotations

import pytest
import torch

from mechscope.core.errors import InputError
from mechscope.dictionaries import load_dictionary, save_saelens, save_sparsify
from mechscope.training.losses import compute_loss, topk_aux_loss
from tests.unit.test_dictionaries import make_dict

pytestmark = pytest.mark.peers
torch.set_num_threads(1)

B = 7


def _x(d_in: int, seed: int = 0, dtype=torch.float64, rows: int = B) -> torch.Tensor:
    return torch.randn(rows, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _dead(d_sae: int) -> torch.Tensor:
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[[0, 3, 4, 7, 9]] = True
    return dead


# -- SAELens: training forward pass, losses and gradients --------------------------------------------
@pytest.fixture(scope="module")
def sl():
    return pytest.importorskip("sae_lens")


def _copy_into(sae, d):
    with torch.no_grad():
        for name, p in d.named_parameters():
            getattr(sae, name).data.copy_(p.detach().to(getattr(sae, name).dtype))


def _saelens_training(sl, arch, d, **cfg):
    common = dict(d_in=d.cfg.d_in, d_sae=d.cfg.d_sae, dtype="float64", apply_b_dec_to_input=True)
    cls, cfg_cls = {
        "relu": (sl.StandardTrainingSAE, sl.StandardTrainingSAEConfig),
        "topk": (sl.TopKTrainingSAE, sl.TopKTrainingSAEConfig),
        "batchtopk": (sl.BatchTopKTrainingSAE, sl.BatchTopKTrainingSAEConfig),
        "jumprelu": (sl.JumpReLUTrainingSAE, sl.JumpReLUTrainingSAEConfig),
    }[arch]
    sae = cls(cfg_cls(**common, **cfg))
    _copy_into(sae, d)
    return sae


LOSS_NAMES = {"mse_loss": "mse", "l1_loss": "l1", "l0_loss": "l0", "auxiliary_reconstruction_loss": "aux"}


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_saelens_training_forward_losses_and_gradients(sl, arch):
    from sae_lens.saes.sae import TrainStepInput

    d = make_dict(arch, seed=11).train()
    if arch == "jumprelu":
        with torch.no_grad():  # SAELens keeps the threshold in float32
            d.threshold.copy_(d.threshold.float().double())
    cfg = {
        "relu": dict(l1_coefficient=0.7),
        "topk": dict(k=3, aux_loss_coefficient=0.5, rescale_acts_by_decoder_norm=False),
        "batchtopk": dict(k=3, aux_loss_coefficient=0.5, rescale_acts_by_decoder_norm=False),
        "jumprelu": dict(l0_coefficient=0.4, jumprelu_bandwidth=d.cfg.jumprelu_bandwidth),
    }[arch]
    sae = _saelens_training(sl, arch, d, **cfg)
    x = _x(6, seed=12)
    dead = _dead(12)
    coefficients = {"relu": {"l1": 0.7}, "jumprelu": {"l0": 0.4}}.get(arch, {})
    peer = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=dead,
                                                    n_training_steps=0, is_logging_step=False))
    peer.loss.backward()
    ours = compute_loss(d, x, l1_coefficient=0.7, l0_coefficient=0.4, aux_coefficient=0.5, dead=dead)
    ours.total.backward()

    torch.testing.assert_close(ours.pre, peer.hidden_pre)
    torch.testing.assert_close(ours.acts, peer.feature_acts)
    torch.testing.assert_close(ours.recons, peer.sae_out)
    assert {LOSS_NAMES[k] for k in peer.losses} == set(ours.terms)
    for k, v in peer.losses.items():
        torch.testing.assert_close(ours.terms[LOSS_NAMES[k]], v, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(ours.total, peer.loss)
    terms = {k: float(v.detach()) for k, v in ours.terms.items()}
    assert terms.get("aux", 1.0) > 0 and terms.get("l0", 1.0) > 0  # the aux and STE paths were exercised
    for name, p in d.named_parameters():
        q = getattr(sae, name)
        tol = dict(rtol=1e-5, atol=1e-6) if q.dtype == torch.float32 else {}
        torch.testing.assert_close(p.grad, q.grad.to(p.dtype), **tol, msg=lambda m, n=name: f"grad {n}: {m}")
    if arch == "jumprelu":
        assert d.threshold.grad.abs().sum() > 0


def test_saelens_topk_decoder_norm_rescaling_agrees_for_unit_decoders(sl):
    """SAELens's default TopK (rescale_acts_by_decoder_norm=True) ranks pre * |W_dec_i| and decodes
    acts / |W_dec_i|: the same forward and losses as mechscope's when decoder rows have unit norm."""
    from sae_lens.saes.sae import TrainStepInput

    d = make_dict("topk", seed=13).train()
    d.normalize_decoder()
    sae = _saelens_training(sl, "topk", d, k=3, aux_loss_coefficient=0.5, rescale_acts_by_decoder_norm=True)
    x = _x(6, seed=14)
    peer = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=_dead(12),
                                                    n_training_steps=0, is_logging_step=False))
    ours = compute_loss(d, x, aux_coefficient=0.5, dead=_dead(12))
    torch.testing.assert_close(ours.acts, peer.feature_acts)
    torch.testing.assert_close(ours.recons, peer.sae_out)
    torch.testing.assert_close(ours.total, peer.loss)


# -- SAELens: files, both ways -------------------------------------------------------------------------
SL_SAVE_CASES = {  # id -> make_dict args
    "relu": dict(arch="relu"),
    "relu-no-b_dec-sub": dict(arch="relu", apply_b_dec_to_input=False),
    "topk": dict(arch="topk"),
    "batchtopk": dict(arch="batchtopk"),
    "jumprelu": dict(arch="jumprelu"),
    "transcoder": dict(arch="relu", transcoder=True, d_out=5),
    "skip-transcoder": dict(arch="relu", transcoder=True, skip=True, d_out=5),
    "jumprelu-skip-transcoder": dict(arch="jumprelu", transcoder=True, skip=True, d_out=5),
    "batchtopk-transcoder": dict(arch="batchtopk", transcoder=True, d_out=5),
}


@pytest.mark.parametrize("case", list(SL_SAVE_CASES))
def test_mechscope_saved_saelens_loads_in_saelens(sl, tmp_path, case):
    args = dict(SL_SAVE_CASES[case])
    d = make_dict(args.pop("arch"), seed=15, **args).eval()
    save_saelens(d, tmp_path / "sl")
    sae = sl.SAE.load_from_disk(tmp_path / "sl")
    x = _x(d.cfg.d_in, seed=16)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), d.encode(x))
        torch.testing.assert_close(sae(x), d(x))
        assert (d.encode(x) != 0).any()
    back = load_dictionary(tmp_path / "sl")  # and back into mechscope: the same config and weights
    assert back.cfg == d.cfg
    for name, t in d.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def _sl_inference(sl, tmp_path, arch, cfg_cls, sae_cls, *, d_in=6, d_sae=12, seed=17, **cfg):
    from sae_lens.saes.sae import SAEMetadata

    meta = dict(model_name="tiny", hook_name="blocks.0.hook_resid_post")
    if "transcoder" in arch:
        meta = dict(model_name="tiny", hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")
    sae = sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, dtype="float64", metadata=SAEMetadata(**meta), **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)
    sae.eval()
    sae.save_model(tmp_path / arch)
    return sae, tmp_path / arch


def test_saelens_saved_folders_load_in_mechscope(sl, tmp_path):
    from sae_lens.saes import transcoder as tc

    cases = [
        ("standard", sl.StandardSAEConfig, sl.StandardSAE, {}),
        ("topk", sl.TopKSAEConfig, sl.TopKSAE, dict(k=3, rescale_acts_by_decoder_norm=True)),  # folded on load
        ("jumprelu", sl.JumpReLUSAEConfig, sl.JumpReLUSAE, {}),  # random thresholds, some negative: clamped
        ("transcoder", tc.TranscoderConfig, tc.Transcoder, dict(d_out=5, apply_b_dec_to_input=False)),
        ("skip_transcoder", tc.SkipTranscoderConfig, tc.SkipTranscoder, dict(d_out=5, apply_b_dec_to_input=False)),
        ("jumprelu_skip_transcoder", tc.JumpReLUSkipTranscoderConfig, tc.JumpReLUSkipTranscoder,
         dict(d_out=5, apply_b_dec_to_input=False)),
    ]
    x = _x(6, seed=18)
    for arch, cfg_cls, sae_cls, cfg in cases:
        sae, folder = _sl_inference(sl, tmp_path, arch, cfg_cls, sae_cls, **cfg)
        d = load_dictionary(folder)
        assert d.cfg.model_name == "tiny"
        if "transcoder" in arch:
            assert (d.cfg.hook_in, d.cfg.hook_out) == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
        with torch.no_grad():
            torch.testing.assert_close(d.encode(x), sae.encode(x), msg=lambda m, a=arch: f"{a}: {m}")
            torch.testing.assert_close(d(x), sae(x), msg=lambda m, a=arch: f"{a}: {m}")


def test_saelens_batchtopk_inference_file_loads_as_batchtopk(sl, tmp_path):
    """SAELens saves a trained BatchTopK as a JumpReLU with its threshold (and folds decoder norms)."""
    from sae_lens.saes.sae import TrainStepInput

    d0 = make_dict("batchtopk", seed=19).train()
    sae = _saelens_training(sl, "batchtopk", d0, k=3, rescale_acts_by_decoder_norm=True, topk_threshold_lr=0.5)
    for seed in range(3):  # move its threshold away from 0
        sae.training_forward_pass(TrainStepInput(sae_in=_x(6, seed=seed), coefficients={}, dead_neuron_mask=None,
                                                 n_training_steps=0, is_logging_step=False))
    sae.save_inference_model(tmp_path / "btk")
    d = load_dictionary(tmp_path / "btk", hook="blocks.0.hook_resid_post")
    assert d.cfg.architecture == "batchtopk" and d.cfg.k == 3 and not d.training
    ref = sl.SAE.load_from_disk(tmp_path / "btk")
    x = _x(6, seed=20)
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x), ref.encode(x))
        torch.testing.assert_close(d(x), ref(x))
        assert float(d.threshold.min()) > 0


def test_saelens_unsupported_files_are_refused(sl, tmp_path):
    _, folder = _sl_inference(sl, tmp_path, "gated", sl.GatedSAEConfig, sl.GatedSAE)
    with pytest.raises(InputError, match=r"SAELens architecture 'gated' .* mechscope reads \["):
        load_dictionary(folder)
    _, folder = _sl_inference(sl, tmp_path, "standard", sl.StandardSAEConfig, sl.StandardSAE,
                              normalize_activations="layer_norm")
    with pytest.raises(InputError, match="normalize_activations='layer_norm'"):
        load_dictionary(folder)
    with pytest.raises(InputError, match="SAELens has no TopK transcoder"):
        save_saelens(make_dict("topk", transcoder=True, d_out=5), tmp_path / "no")
    neg = make_dict("jumprelu")
    with torch.no_grad():
        neg.threshold[0] = -0.1
    with pytest.raises(InputError, match="negative thresholds"):
        save_saelens(neg, tmp_path / "no")


# -- sparsify -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp():
    return pytest.importorskip("sparsify")


def _scatter(top_acts, top_indices, d_sae):
    return torch.zeros(top_acts.shape[0], d_sae, dtype=top_acts.dtype).scatter(-1, top_indices, top_acts)


def _sparsify_coder(sp, *, transcode=False, skip=False, dtype=torch.float32, seed=21):
    cfg = sp.SparseCoderConfig(num_latents=12, k=3, transcode=transcode, skip_connection=skip)
    sae = sp.SparseCoder(6, cfg, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.5)
    return sae


@pytest.mark.parametrize("kind", ["sae", "skip-transcoder"])
def test_sparsify_saved_folder_loads_in_mechscope(sp, tmp_path, kind):
    transcoder = kind != "sae"
    sae = _sparsify_coder(sp, transcode=transcoder, skip=transcoder)
    folder = tmp_path / ("layers.1.mlp" if transcoder else "layers.1")
    sae.save_to_disk(folder)
    d = load_dictionary(folder)
    want_hooks = (("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out") if transcoder
                  else ("blocks.1.hook_resid_post", "blocks.1.hook_resid_post"))
    assert (d.cfg.architecture, d.cfg.k, d.cfg.hook_in, d.cfg.hook_out) == ("topk", 3, *want_hooks)
    x = _x(6, seed=22, dtype=torch.float32)
    with torch.no_grad():
        enc = sae.encode(x)
        torch.testing.assert_close(d.encode(x), _scatter(enc.top_acts, enc.top_indices, 12))
        torch.testing.assert_close(d.decode(d.encode(x), x) - (x @ d.W_skip if transcoder else 0),
                                   sae.decode(enc.top_acts, enc.top_indices))
        torch.testing.assert_close(d(x), sae(x).sae_out)


@pytest.mark.parametrize("case", ["sae", "sae-no-b_dec-sub", "skip-transcoder"])
def test_mechscope_saved_sparsify_loads_in_sparsify(sp, tmp_path, case):
    transcoder = case == "skip-transcoder"
    d = make_dict("topk", transcoder=transcoder, skip=transcoder, d_out=6 if transcoder else None, seed=23,
                  dtype="float32", apply_b_dec_to_input=case != "sae-no-b_dec-sub").eval()
    save_sparsify(d, tmp_path / "coder")
    sae = sp.SparseCoder.load_from_disk(tmp_path / "coder")
    x = _x(6, seed=24, dtype=torch.float32)
    with torch.no_grad():
        enc = sae.encode(x)
        torch.testing.assert_close(_scatter(enc.top_acts, enc.top_indices, 12), d.encode(x))
        torch.testing.assert_close(sae(x).sae_out, d(x))
    back = load_dictionary(tmp_path / "coder")  # hooks and config come back from the note
    assert back.cfg == d.cfg
    for name, t in d.state_dict().items():  # b_enc is folded and unfolded when b_dec is not subtracted
        torch.testing.assert_close(back.state_dict()[name], t, rtol=0, atol=1e-6 if name == "b_enc" else 0)


def test_sparsify_losses_and_gradients_under_matching_definitions(sp):
    """sparsify trains on FVU = sum ||e||^2 / total variance, mechscope on mean_t ||e_t||^2; its AuxK ranks
    ReLU'd pre-activations, is divided by the total variance too, and trains W_dec only (its fused encoder's
    backward drops the gradient of the pre-activations, so AuxK never reaches W_enc, b_enc, b_dec; mechscope's,
    like SAELens's, does). With those conversions (pre detached in the AuxK), and every row having >= k
    positive pre-activations (sparsify's encoder backward ignores the ReLU of a selected zero), values and
    gradients agree."""
    sae = _sparsify_coder(sp, seed=25)
    with torch.no_grad():
        sae.encoder.bias.add_(1.5)  # every row has >= k positive pre-activations
    folder_dict = _sparsify_to_mechscope(sae)
    x = _x(6, seed=26, dtype=torch.float32, rows=9)
    dead = _dead(12)
    out = sae(x, dead_mask=dead)
    (out.fvu + out.auxk_loss).backward()
    ours = compute_loss(folder_dict, x, aux_coefficient=0.0)
    total_var = (x - x.mean(0)).pow(2).sum()
    conv = x.shape[0] / total_var
    torch.testing.assert_close(out.fvu, ours.terms["mse"] * conv)
    aux = topk_aux_loss(folder_dict, ours.pre.relu().detach(), (x - ours.recons).detach(), dead)
    torch.testing.assert_close(out.auxk_loss, aux * conv)
    assert ((ours.pre > 0).sum(-1) >= 3).all()
    (ours.terms["mse"] * conv + aux * conv).backward()
    grads = {"W_enc": sae.encoder.weight.grad.T, "b_enc": sae.encoder.bias.grad, "W_dec": sae.W_dec.grad,
             "b_dec": sae.b_dec.grad}
    for name, g in grads.items():
        torch.testing.assert_close(getattr(folder_dict, name).grad, g, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def _sparsify_to_mechscope(sae):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "layers.0"
        sae.save_to_disk(folder)
        return load_dictionary(folder).train()


def test_sparsify_refusals(sp, tmp_path):
    with pytest.raises(InputError, match="sparsify has TopK sparse coders only"):
        save_sparsify(make_dict("jumprelu"), tmp_path / "x")
    sae = _sparsify_coder(sp)
    sae.save_to_disk(tmp_path / "not-a-hook")
    with pytest.raises(InputError, match="records no hook name"):
        load_dictionary(tmp_path / "not-a-hook")
    d = load_dictionary(tmp_path / "not-a-hook", hook="blocks.1.hook_mlp_out")
    assert d.cfg.hook_in == "blocks.1.hook_mlp_out"
