"""What tests and benchmarks build on: tiny random IF-architecture models written in diffusers' layout
(random_models.py), the same in the layouts DeepFloyd and Stability publish (published_layouts.py), and
diffusers' own pipelines over them as the reference oracle (reference.py)."""
