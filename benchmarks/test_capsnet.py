"""A whole CapsNet step (the paper's MNIST model): "train" (forward, margin + reconstruction
loss, backward, Adam step) and "eval" (forward without grad), reported as images/s. The images
are random: the timing of a step does not depend on their values."""

import torch

import fastcaps
from benchmarks.harness import gpu_quantiles_ms, synchronize, triton_runs
from fastcaps.nn import CapsNet
from fastcaps.training import adam

TINY_MODEL = dict(
    image_size=12, conv_channels=8, conv_kernel=3, primary_types=4, primary_dim=4,
    primary_kernel=3, primary_stride=2, digit_dim=6, decoder_sizes=(16,),
)  # fmt: skip
BATCHES = {"cpu": [32, 128], "cuda": [128, 512]}


def capsnet_cases(device: str, tiny: bool) -> list[tuple[str, int, str]]:
    backends = ["reference", "torch"] + (["triton"] if triton_runs(device) else [])
    batches = [4] if tiny else BATCHES.get(device, [32])
    return [(b, batch, mode) for batch in batches for mode in ("train", "eval") for b in backends]


def pytest_generate_tests(metafunc):
    if "capsnet_case" in metafunc.fixturenames:
        from benchmarks.conftest import is_tiny
        from benchmarks.harness import benchmark_device

        cases = capsnet_cases(benchmark_device(), is_tiny(metafunc.config))
        ids = [f"capsnet-{b}-{mode}-B{batch}" for b, batch, mode in cases]
        metafunc.parametrize("capsnet_case", cases, ids=ids)


def test_capsnet_step(benchmark, record, device, tiny, capsnet_case):
    backend, batch, mode = capsnet_case
    torch.manual_seed(0)
    model = CapsNet(backend=backend, **(TINY_MODEL if tiny else {})).to(device)
    size = model.image_size
    images = torch.rand(batch, 1, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    optimizer = adam(model, 1e-3, torch.device(device))  # as the training tool sets it up

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        out = model(images, labels)
        loss = fastcaps.margin_loss(out.lengths, labels) + fastcaps.reconstruction_loss(
            out.reconstructions, images
        )
        loss.backward()
        optimizer.step()
        return loss

    def eval_step():
        with torch.no_grad():
            return model(images).lengths

    step = train_step if mode == "train" else eval_step
    provider = "triton-fused" if backend == "triton" else backend
    record(
        op="capsnet",
        provider=provider,
        mode=mode,
        layer=f"capsnet-B{batch}",
        shape={"name": "mnist", "B": batch},
        dtype="float32",
    )
    if tiny:
        assert torch.isfinite(step()).all()
    if device == "cuda" and not tiny:
        quantiles = gpu_quantiles_ms(step, None)
        record(do_bench_ms=quantiles, images_per_s=batch / (quantiles[0] / 1e3))

    def synchronized():
        step()
        synchronize(device)

    rounds = 1 if tiny else 3
    benchmark.pedantic(synchronized, rounds=rounds, warmup_rounds=0 if tiny else 1)
    if device != "cuda" and not tiny:
        record(images_per_s=batch / benchmark.stats.stats.median)
