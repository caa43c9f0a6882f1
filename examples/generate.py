"""First steps: generate with the packaged model, then with a cascade of your own.

    python examples/generate.py                       # the packaged shapes model
    python examples/generate.py /models/IF-I-XL-v1.0 /models/IF-II-L-v1.0
"""

import sys

import engine

if len(sys.argv) > 1:
    pipe = engine.load(*sys.argv[1:])  # stage directories in cascade order, or one dir with cascade.json
else:
    pipe = engine.default_pipeline()
if pipe.notice:
    print(f"note: {pipe.notice}")
print(pipe)

images = pipe.generate(["a large red circle on a blue background",
                        "a small yellow triangle at the top left on a black background"],
                       seed=0, num_images_per_prompt=2)
for i, image in enumerate(images):
    image.save(f"example-{i}.png")
print(f"wrote {len(images)} images of {images[0].size[0]}x{images[0].size[1]}: example-0.png ...")
