"""How tests/data/legacy_v1_all_stages was made: run once, with the code of commit 89d8f87 (before the
stage-registry redesign), from the repo root. Kept as a record; the test only loads its output."""
import torch, json, os, sys
sys.path.insert(0, ".")
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText
import riverone_hf
from riverone_hf import RiverOneConfig
from tests.tiny_models import FAST_AQLM, save_dense, tiny_internvl, pixel_values
import tempfile
torch.set_num_threads(1)
tmp = tempfile.mkdtemp()
dense = save_dense(tiny_internvl(), tmp + "/dense")
config = RiverOneConfig(
    minivit={"groups": [[0, 1]]},
    vqc={"target_modules": [r"model\.multi_modal_projector\.linear_2"], "n_wires": 2, "n_layers": 1, "rank": 2,
         "hidden_size": 4, "chunk_size": 8, "init_steps": 3, "baselines": False},
    aqlm={"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8, **FAST_AQLM},
)
model = AutoModelForImageTextToText.from_pretrained(dense, quantization_config=config)
out = "tests/data/legacy_v1_all_stages"
model.save_pretrained(out)
ids = torch.tensor([[1, 2, 3] + [5] + [7, 8, 9, 10]])
pix = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(input_ids=ids, pixel_values=pix).logits
save_file({"input_ids": ids, "pixel_values": pix, "logits": logits.contiguous()}, out + "/expected_outputs.safetensors")
print(os.listdir(out), sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)))
print(json.dumps({k: v["stage"] for k, v in model.config.quantization_config.quantization_map.items()}))
