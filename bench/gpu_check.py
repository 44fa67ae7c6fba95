"""GPU check (run on a CUDA machine): AqlmLinear's aqlm CUDA/Triton kernels against the dequantized
matmul, their decode speed against dense fp16, and from_pretrained/save/reload on a tiny Qwen3 on GPU.

    python bench/gpu_check.py
"""

import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import riverone_hf  # noqa: E402
from riverone_hf import AqlmLinear, RiverOneConfig  # noqa: E402
from riverone_hf.aq.layout import QuantizedWeight, pack_codes  # noqa: E402


def random_layer(num_codebooks, nbits, out_features, in_features, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**nbits, (out_features, in_features // 8, num_codebooks), generator=gen)
    codebooks = torch.randn(num_codebooks, 2**nbits, 1, 8, generator=gen) / (8 * num_codebooks) ** 0.5
    scales = torch.rand(out_features, 1, 1, 1, generator=gen) * 0.1 + 0.01
    q = QuantizedWeight(pack_codes(codes, nbits), codebooks, scales)
    return AqlmLinear.from_quantized(q, bias=None, dtype=dtype).to(device)


def cuda_ms(fn, repeats=50):
    times = []
    for _ in range(5):
        fn()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernels():
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| scheme | shape | batch | max rel err vs dequantized | aqlm kernel ms | dense fp16 ms | ratio dense/aqlm |")
    print("|---|---|---|---|---|---|---|")
    for num_codebooks, nbits in [(2, 8), (1, 8), (1, 16)]:
        for out_features, in_features in [(9728, 2560), (2560, 9728)]:
            layer = random_layer(num_codebooks, nbits, out_features, in_features, "cuda", torch.float16)
            weight = layer.dequantize().detach()
            for batch in (1, 16):
                x = torch.randn(batch, in_features, device="cuda", dtype=torch.float16)
                with torch.no_grad():
                    ours = layer(x).float()
                    ref = F.linear(x.float(), weight.float())
                    err = ((ours - ref).abs().max() / ref.abs().max()).item()
                    t_aqlm = cuda_ms(lambda: layer(x))
                    t_dense = cuda_ms(lambda: F.linear(x, weight))
                print(f"| {num_codebooks}x{nbits} | {in_features}->{out_features} | {batch} | {err:.2e} | "
                      f"{t_aqlm:.4f} | {t_dense:.4f} | {t_dense / t_aqlm:.2f} |")


def gradients():
    layer = random_layer(2, 8, 256, 512, "cuda", torch.float32)
    layer.codebooks.requires_grad_(True)
    layer.scales.requires_grad_(True)
    layer(torch.randn(4, 512, device="cuda")).square().sum().backward()
    print("grad into codebooks/scales on cuda:", layer.codebooks.grad.abs().sum().item() > 0,
          layer.scales.grad.abs().sum().item() > 0)


def end_to_end():
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=128, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=512, head_dim=64)
    with tempfile.TemporaryDirectory() as tmp:
        Qwen3ForCausalLM(config).save_pretrained(f"{tmp}/dense")
        cfg = RiverOneConfig(aqlm={"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8,
                                   "beam_size": 4, "max_epochs": 2})
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(f"{tmp}/dense", quantization_config=cfg,
                                                     dtype=torch.float16, device_map="cuda")
        seconds = time.perf_counter() - start
        ids = torch.randint(0, 128, (2, 16), device="cuda")
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        model.save_pretrained(f"{tmp}/q")
        again = AutoModelForCausalLM.from_pretrained(f"{tmp}/q", device_map="cuda")
        with torch.no_grad():
            same = torch.equal(again(input_ids=ids).logits, logits)
        print(f"tiny Qwen3 on GPU: quantized 14 Linears in {seconds:.1f} s, layer device "
              f"{model.model.layers[0].mlp.up_proj.codes.device}, reload identical logits: {same}")


if __name__ == "__main__":
    kernels()
    gradients()
    end_to_end()
