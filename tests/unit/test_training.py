"""The trainer: recovery of known sparse features, exact resume, several dictionaries from one pass,
and the failures that must leave checkpoints intact (NaN, full disk, bad configuration)."""

from __future__ import annotations

import errno
import json

import pytest
import torch

import mechscope

from mechscope.core.errors import DiskFullError, InputError
from mechscope.dictionaries import DictionaryConfig, load_dictionary
from mechscope.training import DictionarySpec, TrainConfig, Trainer, TrainingDivergedError, train

D, N_TRUE, K_TRUE = 16, 32, 3


def ground_truth(seed: int = 123) -> torch.Tensor:
    """N_TRUE unit feature directions in D dimensions (more features than dimensions: superposition)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(N_TRUE, D, generator=g)
    return f / f.norm(dim=-1, keepdim=True)


def synthetic_source(features: torch.Tensor, batch: int = 512, offset: float = 0.3, corrupt_step: int | None = None):
    """Batch t: each feature active with probability K_TRUE/N_TRUE, coefficient U(0, 1); a pure function of t."""

    def source(start: int):
        t = start
        while True:
            g = torch.Generator().manual_seed(1000 + t)
            mask = torch.rand(batch, N_TRUE, generator=g) < K_TRUE / N_TRUE
            x = (torch.rand(batch, N_TRUE, generator=g) * mask) @ features + offset
            if t == corrupt_step:
                x[3, 2] = float("nan")
            yield {"h": x}
            t += 1

    return source


def mean_max_cos(features: torch.Tensor, W_dec: torch.Tensor) -> float:
    dec = W_dec.detach() / W_dec.detach().norm(dim=-1, keepdim=True)
    return float((features @ dec.T).max(1).values.mean())


def spec(name="s", arch="topk", k=6, d_sae=64, **kw) -> DictionarySpec:
    return DictionarySpec(name, DictionaryConfig(arch, D, d_sae, "h", k=k if "topk" in arch else None), **kw)


@pytest.mark.parametrize("arch,kw", [("topk", dict(lr=3e-3)), ("relu", dict(lr=3e-3, l1_coefficient=0.3))])
def test_training_recovers_known_sparse_features(tmp_path, arch, kw):
    feats = ground_truth()
    cfg = TrainConfig(n_tokens=512 * 1000, batch_tokens=512, log_every_steps=100, dead_after_tokens=20_000)
    out = train(spec(arch=arch, **kw), cfg, synthetic_source(feats), tmp_path, progress=False)
    mmcs = mean_max_cos(feats, out["s"].W_dec)
    assert mmcs > 0.9, f"{arch}: mean max cosine similarity {mmcs:.3f}"
    # the saved dictionary reads raw activations (normalisation folded in) and reconstructs them
    d = load_dictionary(tmp_path / "s")
    x = next(synthetic_source(feats)(5000))["h"]
    fvu = float((d(x).detach() - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert fvu < 0.3 and abs(fvu - last["fvu"]) < 0.1, (fvu, last["fvu"])


def _weights(folder):
    d = load_dictionary(folder)
    return {k: v.clone() for k, v in d.state_dict().items()}


def test_killed_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    feats = ground_truth()
    cfg = TrainConfig(n_tokens=512 * 30, batch_tokens=512, log_every_steps=1, checkpoint_every_steps=10,
                      dead_after_tokens=2048)
    specs = [spec("a", "topk"), spec("b", "jumprelu", l0_coefficient=0.01)]
    train(specs, cfg, synthetic_source(feats), tmp_path / "full", progress=False)

    class Killed(Exception):
        pass

    def kill(step):
        if step == 15:
            raise Killed

    with pytest.raises(Killed):
        Trainer(specs, cfg, tmp_path / "resumed", on_step=kill, progress=False).fit(synthetic_source(feats))
    with pytest.raises(InputError, match="resume=True"):  # an existing run is never silently overwritten
        train(specs, cfg, synthetic_source(feats), tmp_path / "resumed", progress=False)
    train(specs, cfg, synthetic_source(feats), tmp_path / "resumed", resume=True, progress=False)

    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    resumed = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(full) == 60 and resumed == full
    for name in ("a", "b"):
        wa, wb = _weights(tmp_path / "full" / name), _weights(tmp_path / "resumed" / name)
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)


def test_resume_errors(tmp_path):
    feats = ground_truth()
    cfg = TrainConfig(n_tokens=512 * 4, batch_tokens=512, checkpoint_every_steps=2)
    with pytest.raises(InputError, match="no checkpoint"):
        train(spec(), cfg, synthetic_source(feats), tmp_path, resume=True, progress=False)
    train(spec(), cfg, synthetic_source(feats), tmp_path, progress=False)
    with pytest.raises(InputError, match="another configuration"):
        train(spec(k=5), cfg, synthetic_source(feats), tmp_path, resume=True, progress=False)


def test_several_dictionaries_from_one_pass_equal_training_each_alone(tmp_path):
    feats = ground_truth()
    cfg = TrainConfig(n_tokens=512 * 12, batch_tokens=512, log_every_steps=4)
    a, b = spec("a", "topk", k=4, d_sae=48), spec("b", "relu", d_sae=64, l1_coefficient=0.5)
    together = train([a, b], cfg, synthetic_source(feats), tmp_path / "both", progress=False)
    alone = train(b, cfg, synthetic_source(feats), tmp_path / "alone", progress=False)
    for k, v in alone["b"].state_dict().items():
        assert torch.equal(v, together["b"].state_dict()[k]), k


def test_nan_in_activations_stops_with_a_clear_error_and_intact_checkpoint(tmp_path):
    cfg = TrainConfig(n_tokens=512 * 10, batch_tokens=512, checkpoint_every_steps=3, norm_estimation_batches=2)
    with pytest.raises(TrainingDivergedError, match="NaN/inf") as e:
        train(spec(), cfg, synthetic_source(ground_truth(), corrupt_step=7), tmp_path, progress=False)
    assert "batch 7" in str(e.value)
    t = Trainer([spec()], cfg, tmp_path)
    assert t.latest_checkpoint().name == "step_00000006"
    train(spec(), cfg, synthetic_source(ground_truth()), tmp_path, resume=True, progress=False)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch as st

    cfg = TrainConfig(n_tokens=512 * 10, batch_tokens=512, checkpoint_every_steps=2)
    real = st.save_file
    calls = {"n": 0}

    def flaky(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4)
            with open(filename, "wb") as f:
                f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", flaky)
    with pytest.raises(DiskFullError, match="intact"):
        train(spec(), cfg, synthetic_source(ground_truth()), tmp_path, progress=False)
    monkeypatch.setattr(st, "save_file", real)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_00000002"], ckpts  # no half-written folder next to it
    train(spec(), cfg, synthetic_source(ground_truth()), tmp_path, resume=True, progress=False)
    assert load_dictionary(tmp_path / "s").cfg.metadata["resumed_from_step"] == 2


def test_memory_budget_is_checked_before_any_work(tmp_path):
    cfg = TrainConfig(n_tokens=4096, batch_tokens=4096, memory_budget_bytes=2**20)
    called = []

    def source(start):
        called.append(start)
        yield {}

    with pytest.raises(InputError, match="MiB") as e:
        train(spec(d_sae=4096), cfg, source, tmp_path, progress=False)
    assert "batch activations" in str(e.value) and not called and not any(tmp_path.iterdir())


def test_bfloat16_compute_trains(tmp_path):
    feats = ground_truth()
    cfg = TrainConfig(n_tokens=512 * 200, batch_tokens=512, dtype="bfloat16", log_every_steps=50)
    out = train(spec(lr=3e-3), cfg, synthetic_source(feats), tmp_path, progress=False)
    assert out["s"].W_enc.dtype == torch.float32  # master weights stay fp32
    fp32 = TrainConfig(n_tokens=512 * 200, batch_tokens=512, log_every_steps=50)
    train(spec(lr=3e-3), fp32, synthetic_source(feats), tmp_path / "fp32", progress=False)
    last = [json.loads(p.read_text().splitlines()[-1])["fvu"]
            for p in (tmp_path / "metrics.jsonl", tmp_path / "fp32" / "metrics.jsonl")]
    assert last[0] < 0.25 and abs(last[0] - last[1]) < 0.03, last  # bf16 compute tracks fp32
    assert (tmp_path / "training_curves.html").read_text().count("plotly") > 2


def test_config_errors_name_the_field():
    with pytest.raises(InputError, match="batch_tokens"):
        TrainConfig(n_tokens=100, batch_tokens=0)
    with pytest.raises(InputError, match="dtype"):
        TrainConfig(n_tokens=4096, dtype="float16")
    with pytest.raises(InputError, match="k"):
        DictionaryConfig("topk", 8, 16, "h")
    with pytest.raises(InputError, match="unique"):
        Trainer([spec(), spec()], TrainConfig(n_tokens=4096), "/tmp/unused")


def test_trains_from_a_live_activation_stream_and_resumes_exactly(tmp_path):
    """A stream from a model (no harvest): the resumed run replays the stream to the same batches."""
    from mechscope.data import ActivationStream
    from tests.conftest import tiny_hooked

    model = tiny_hooked("llama")
    contexts = torch.randint(0, 128, (48, 12), generator=torch.Generator().manual_seed(0))
    hook = "blocks.1.hook_resid_post"
    specs = [DictionarySpec("s", DictionaryConfig("topk", 64, 128, hook, k=8))]
    cfg = TrainConfig(n_tokens=128 * 8, batch_tokens=128, log_every_steps=1, checkpoint_every_steps=3)
    stream = lambda: ActivationStream(model, [hook], contexts, batch_tokens=128, buffer_tokens=512,  # noqa: E731
                                      forward_batch_contexts=4, epochs=None)
    full = train(specs, cfg, stream(), tmp_path / "full", progress=False)

    def kill(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(specs, cfg, tmp_path / "resumed", on_step=kill, progress=False).fit(stream())
    resumed = train(specs, cfg, stream(), tmp_path / "resumed", resume=True, progress=False)
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "resumed" / "metrics.jsonl").read_text()
    for k, v in full["s"].state_dict().items():
        assert torch.equal(v, resumed["s"].state_dict()[k]), k

    with pytest.raises(mechscope.InputError, match="yields 128 tokens a batch but TrainConfig.batch_tokens is 64"):
        train(specs, TrainConfig(n_tokens=512, batch_tokens=64), stream(), tmp_path / "mismatch", progress=False)
    with pytest.raises(mechscope.InputError, match="cannot train from a list"):
        train(specs, cfg, [1, 2], tmp_path / "bad-source", progress=False)


def test_wandb_logging_when_a_project_is_set(tmp_path, monkeypatch):
    """With wandb_project set, every logged metrics line also goes to W&B (a stand-in module records calls)."""
    import sys
    import types

    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, row, step):
            calls["log"].append((step, row))

        def finish(self):
            calls["finish"] += 1

    fake = types.SimpleNamespace(init=lambda **kw: calls["init"].append(kw) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = TrainConfig(n_tokens=512 * 4, batch_tokens=512, log_every_steps=2, wandb_project="proj")
    train(spec(), cfg, synthetic_source(ground_truth()), tmp_path, progress=False)
    assert calls["init"][0]["project"] == "proj" and calls["finish"] == 1
    assert [s for s, _ in calls["log"]] == [2, 4] and "s/fvu" in calls["log"][0][1]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert calls["log"][1][1]["s/fvu"] == lines[1]["fvu"]


def test_training_device_is_checked_and_cuda_matches_cpu(tmp_path):
    """``device=`` trains where asked and writes CPU files; without CUDA, asking for it is refused up front."""
    feats = ground_truth()
    cfg = TrainConfig(n_tokens=512 * 20, batch_tokens=512, log_every_steps=10)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available here; use device='cpu'"):
            Trainer([spec()], cfg, tmp_path / "gpu", device="cuda")
        out = Trainer([spec()], cfg, tmp_path / "cpu", progress=False, device="cpu").fit(synthetic_source(feats))
        assert out["s"].W_dec.device.type == "cpu"
        return
    a = Trainer([spec()], cfg, tmp_path / "cpu", progress=False, device="cpu").fit(synthetic_source(feats))["s"]
    b = Trainer([spec()], cfg, tmp_path / "gpu", progress=False, device="cuda").fit(synthetic_source(feats))["s"]
    assert b.W_dec.device.type == "cpu" and (a.W_dec - b.W_dec).abs().max() < 1e-4
