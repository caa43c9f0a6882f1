"""A diffusers user's script, run by the engine: hub ids from the local Hugging Face cache, diffusers' names.

    python examples/diffusers_style.py "a photo of a corgi" corgi.png

Needs DeepFloyd's snapshots in the cache (on a machine with network: `hf download DeepFloyd/IF-I-XL-v1.0`,
`hf download DeepFloyd/IF-II-L-v1.0`, after accepting the licence); the engine itself never downloads.
"""

import sys

import torch

import engine

prompt = sys.argv[1] if len(sys.argv) > 1 else "a photo of a corgi"
device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = engine.load("DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-II-L-v1.0", device=device,
                   torch_dtype=torch.float16 if device == "cuda" else torch.float32)
out = pipe(prompt, num_inference_steps=(50, 25), guidance_scale=(7.0, 4.0),
           generator=torch.Generator("cpu").manual_seed(0),
           on_step=lambda stage, step, total: print(f"\r{stage} {step}/{total}", end="", file=sys.stderr))
out.images[0].save(sys.argv[2] if len(sys.argv) > 2 else "corgi.png")
print(f"\n{', '.join(f'{name} {seconds:.2f}s' for name, seconds in out.timings.items())}", file=sys.stderr)
